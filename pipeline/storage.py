"""Storage: any fsspec URL (local path, file://, s3://, gs://, memory://) for pyarrow and Ray.

`filesystem(url)` gives the fsspec filesystem and the bare path; `arrow_filesystem(url)`
wraps it for pyarrow and Ray Data (`filesystem=`). Local paths use pyarrow's native local
filesystem. For S3-compatible servers other than AWS, `AWS_ENDPOINT_URL` (or
`S3_ENDPOINT_URL`) names the endpoint; it is captured in the filesystem object so Ray
workers that unpickle it reach the same server.

Writes are atomic: `atomic_write` writes a temporary sibling and renames (local) or uploads
in one PUT (object stores), so a reader never sees a half-written file under its final name.

Object-store faults (503 SlowDown, 500 InternalError, reset connections, timeouts) are retried
by botocore, configured here rather than by a loop of our own: `S3_ATTEMPTS` attempts per
request at most, each failed one logged with its URL (logger `pipeline.storage`). A request
that still fails raises `StorageFailed` naming the URL; the job runner ends the job with it,
as it does on a full disk (`storage_failure`). The other layers add no retries of their own
on top: s3fs retries throttling and connection errors again after botocore gives up, but
`StorageFailed` is not among the errors it retries; pyarrow and Ray (Data and Train) reach S3
through this s3fs filesystem (`arrow_filesystem`), not pyarrow's own S3 client, and Ray Data's
`retried_io_errors` and `write_file_retry_on_errors` match only that client's messages.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError

PARQUET_SUFFIX = ".parquet"
TAR_SUFFIX = ".tar"

log = logging.getLogger(__name__)

# Attempts per S3 request (the first and its retries). botocore's "legacy" mode, not
# "standard": standard stops retrying once its retry quota (a token bucket shared by the
# client) runs dry, which a storm of throttling on a busy job empties. Legacy backs off
# 2^n x a random second: at most about 15 s of waiting in all before a request fails for good.
S3_ATTEMPTS = 5


class _S3Config(dict):
    """botocore `Config` arguments for s3fs (`config_kwargs`). A class of this module, not a
    plain dict, so that a Ray worker unpickling an s3fs filesystem imports this module, and
    with it the retry hook below, before the filesystem makes its first session."""


S3_CONFIG = _S3Config(retries={"mode": "legacy", "total_max_attempts": S3_ATTEMPTS})


class StorageFailed(OSError):
    """A storage request that failed on every attempt; the message names its URL."""


_FAILED_LINE = re.compile(r"storage request failed after \d+ attempts: .*")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def _note_failed_attempt(attempts: int, request_dict: dict, response=None, caught_exception=None,
                         **_: Any) -> None:
    """botocore's `needs-retry` event for every S3 request: log a failed attempt with its URL,
    and raise `StorageFailed` once the last attempt failed too (the retry handler that runs
    beside this one decides the retry itself; errors a caller handles, 4xx, pass by)."""
    if caught_exception is not None:
        cause = f"{type(caught_exception).__name__}: {caught_exception}"
    else:
        status = (response[0].status_code if response else 0) or 0
        if status < 500:
            return
        error = (response[1] or {}).get("Error", {}) if len(response) > 1 else {}
        cause = f"{status} {error.get('Code', '')} {error.get('Message', '')}".strip()
    where = f"{request_dict.get('method', '?')} {request_dict.get('url', '?')}"
    if attempts >= S3_ATTEMPTS:
        raise StorageFailed(f"storage request failed after {attempts} attempts: {where}: {cause}")
    log.warning("storage request failed (attempt %d of %d, retrying): %s: %s", attempts, S3_ATTEMPTS, where, cause)


def _hook_s3_retries() -> None:
    # Every botocore session registers the built-in handlers when it is made, in this process
    # or a Ray worker that imports this module: s3fs's sessions included, with no session of ours.
    from botocore import handlers

    spec = ("needs-retry.s3", _note_failed_attempt, handlers.REGISTER_LAST)
    if spec not in handlers.BUILTIN_HANDLERS:
        handlers.BUILTIN_HANDLERS.append(spec)


_hook_s3_retries()


def storage_failure(error: BaseException) -> str | None:
    """What a user needs to know when `error` is the storage failing, not the project: a
    request that failed on every attempt (`StorageFailed`, naming its URL) or a full disk; else
    None. Looks through the chain of causes, and through Ray's wrapping of an error raised in a
    task or worker, which may keep only its text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        found = _FAILED_LINE.search(text)  # Ray's re-raised error is one too, its text a traceback
        if found:
            return found.group(0)
        if isinstance(error, StorageFailed):
            return text
        if getattr(error, "errno", None) in _DISK_FULL or any(mark in text for mark in _DISK_FULL_TEXT):
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            return (f"no space left on the device{where}: free some space and run the same command again "
                    f"(what was finished is kept; nothing is published as finished before all of it is)")
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def _storage_options(url: str) -> dict:
    if url.startswith(("s3://", "s3a://")):
        options = {"config_kwargs": S3_CONFIG}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        return options
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
    # Asked afresh, as a listing is: s3fs would answer from a listing of the parent cached
    # earlier in this process, before another process (a job, a Ray worker) wrote the file.
    fs.invalidate_cache(path)
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
