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
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError

PARQUET_SUFFIX = ".parquet"
TAR_SUFFIX = ".tar"


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


# Files that mark a folder as one of this project's outputs: a latent dataset (the embed
# job's claim and success marker), decoded images, a report, nearest neighbours, a training
# run, ingested or synthetic shards. A listing of a parent folder skips such folders, so an
# output that a user put inside an input folder is never read back as input data.
OUTPUT_MARKERS = ("_embed.json", "_SUCCESS.json", "_decode.json", "_report.json", "_neighbours.json",
                  "_ingest_summary.json", "_synth_summary.json", "run.json")


def list_files_detailed(url: str, suffix: str | tuple[str, ...] = PARQUET_SUFFIX) -> tuple[list[str], list[str]]:
    """(files under `url` ending in `suffix` (or one of several), sorted full URLs; the sub-folders
    skipped as outputs).

    `url` may be one file. Hidden and temporary files and folders (a name starting with '.'
    or '_') are left out: they are partial writes or metadata, never shards. So are the
    sub-folders holding one of `OUTPUT_MARKERS`; the folder `url` itself may be an output.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # other processes (Ray workers, other jobs) write here: list afresh
    if fs.isfile(path):
        return [url], []
    if not fs.exists(path):
        return [], []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    candidates, outputs = [], set()
    for file_path in fs.find(path):
        rel = posixpath.relpath(file_path, path)
        folder, name = posixpath.split(rel)
        if name in OUTPUT_MARKERS and folder:
            outputs.add(folder)
        if not name.endswith(suffix) or name.startswith((".", "_")):
            continue
        if any(part.startswith((".", "_")) for part in folder.split("/") if part):
            continue
        candidates.append((rel, file_path))
    found = [file_path if isinstance(fs, LocalFileSystem) else f"{protocol}://{file_path}"
             for rel, file_path in candidates
             if not any(rel.startswith(folder + "/") for folder in outputs)]
    return sorted(found), sorted(outputs)


def list_files(url: str, suffix: str = PARQUET_SUFFIX) -> list[str]:
    """Files under `url` (recursively) ending in `suffix`, sorted, as full URLs (see list_files_detailed)."""
    return list_files_detailed(url, suffix)[0]


def _location(url: str) -> tuple[str, str]:
    """(filesystem protocol, absolute normalised path) of a URL, to compare two URLs' places."""
    fs, path = filesystem(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(path)
    return protocol, posixpath.normpath("/" + path.lstrip("/"))


def check_apart(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Refuse an output folder that is, holds or sits inside an input folder (by flag name).

    An output inside an input is read back as input by the next run; an input inside an
    output can be overwritten or removed by the job. Checked before any work.
    """
    for out_flag, out_url in outputs.items():
        if not out_url:
            continue
        out_protocol, out_path = _location(out_url)
        for in_flag, in_url in inputs.items():
            if not in_url:
                continue
            in_protocol, in_path = _location(in_url)
            if in_protocol != out_protocol:
                continue
            if out_path == in_path:
                where = "is"
            elif out_path.startswith(in_path.rstrip("/") + "/"):
                where = "is inside"
            elif in_path.startswith(out_path.rstrip("/") + "/"):
                where = "holds"
            else:
                continue
            raise InputError(f"{out_flag} {out_url} {where} {in_flag} {in_url}: keep outputs apart from inputs "
                             f"(an output inside an input is read back as input); choose another {out_flag}")


def arrow_files(url: str) -> tuple[pafs.FileSystem, list[str]]:
    """A pyarrow filesystem and the paths inside it of the Parquet files under `url` (maybe none)."""
    fs, _ = arrow_filesystem(url)
    return fs, [filesystem(u)[1] for u in list_files(url)]


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def _parent_made(fs: Any, path: str) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)


@contextlib.contextmanager
def _published_locally(path: str, mode: str, publish: Callable[[str, str], None]) -> Iterator:
    """Open a temporary file beside local `path`; once the body has written it, fsync it and
    `publish(temporary, path)` (a rename, a hard link). The temporary name never outlives it."""
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator:
    """Open `url` for writing so that it appears whole under its name or not at all."""
    fs, path = filesystem(url)
    _parent_made(fs, path)
    if isinstance(fs, LocalFileSystem):
        with _published_locally(path, mode, os.replace) as f:
            yield f
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


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `url` only if it does not exist yet, atomically; False when it already did.

    Locally a hard link of a complete temporary file (link fails if the name is taken);
    on S3 a conditional PUT (If-None-Match: *), which S3 and its compatible stores honour;
    elsewhere fsspec's own create mode (an existence check, then a write).
    """
    fs, path = filesystem(url)
    _parent_made(fs, path)
    try:
        if isinstance(fs, LocalFileSystem):
            with _published_locally(path, "wb", os.link) as f:
                f.write(data)
        else:
            fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


def read_bytes(url: str) -> bytes:
    # One GET, not open-then-read: s3fs's file reads are conditional on the ETag it saw at
    # open, so a file replaced in between (a lease heartbeat, say) would fail the read.
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
