"""Storage: any fsspec URL (local path, file://, s3://, gs://, memory://) for pyarrow and Ray.

`filesystem(url)` gives the fsspec filesystem and the bare path; `arrow_filesystem(url)`
wraps it for pyarrow and Ray Data (`filesystem=`). Local paths use pyarrow's native local
filesystem. For S3-compatible servers other than AWS, `AWS_ENDPOINT_URL` (or
`S3_ENDPOINT_URL`) names the endpoint; it is captured in the filesystem object so Ray
workers that unpickle it reach the same server.

Writes are atomic: `atomic_write` writes a temporary sibling and renames (local) or uploads
in one PUT (object stores), so a reader never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

PARQUET_SUFFIX = ".parquet"


def _storage_options(url: str) -> dict:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (no protocol)."""
    url = os.fspath(url)
    fs, path = fsspec.core.url_to_fs(url, **_storage_options(url))
    return fs, path.rstrip("/") or path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `url`, fit for pyarrow.parquet and Ray Data."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without losing its protocol."""
    return posixpath.join(os.fspath(url).rstrip("/"), *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def list_files(url: str, suffix: str = PARQUET_SUFFIX) -> list[str]:
    """Files under `url` (recursively) ending in `suffix`, sorted, as full URLs; `url` may be one file.

    Hidden and temporary files (a name starting with '.' or '_') are left out: they are
    partial writes or metadata, never shards.
    """
    fs, path = filesystem(url)
    if fs.isfile(path):
        return [url]
    if not fs.exists(path):
        return []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = []
    for file_path in fs.find(path):
        name = posixpath.basename(file_path)
        if not name.endswith(suffix) or name.startswith((".", "_")):
            continue
        rel = posixpath.relpath(file_path, path)
        if any(part.startswith((".", "_")) for part in rel.split("/")[:-1]):
            continue
        found.append(file_path if isinstance(fs, LocalFileSystem) else f"{protocol}://{file_path}")
    return sorted(found)


def arrow_files(url: str) -> tuple[pafs.FileSystem, list[str]]:
    """A pyarrow filesystem and the paths inside it of the Parquet files under `url` (maybe none)."""
    fs, _ = arrow_filesystem(url)
    return fs, [filesystem(u)[1] for u in list_files(url)]


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator:
    """Open `url` for writing so that it appears whole under its name or not at all."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # Object stores publish an object only when its upload completes: writing to the
        # final key is already all-or-nothing, and a rename there would be a copy.
        with fs.open(path, mode) as f:
            yield f


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
