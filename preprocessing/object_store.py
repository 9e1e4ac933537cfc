"""Files at a local path or a URI that pyarrow understands (`s3://`, `gs://`, `file://`).

One small vocabulary for everything that may live in object storage: prepared datasets
(`progan prepare ... s3://bucket/celeba-128`, read by `staging`) and Ray storage
(pipeline.driver.storage). A URI may carry pyarrow's options as a query string
(`s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http` for an S3-compatible server);
`join` keeps it at the end. Credentials come from the node's environment (AWS_ACCESS_KEY_ID,
an instance role, ...), as for Ray's own storage.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 8 << 20  # bytes per read while copying and hashing


def is_uri(value: str | os.PathLike) -> bool:
    """'s3://bucket/x', 'file:///x': not a plain path."""
    return "://" in str(value)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a path or a URI (a URI's query string stays at the end)."""
    if not is_uri(base):
        return os.path.join(os.fspath(base), *parts)
    split = urlsplit(str(base))
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(split._replace(path=path))


def display(uri: str | os.PathLike) -> str:
    """A URI for messages: without `user:password@` and without its query string."""
    if not is_uri(uri):
        return str(uri)
    split = urlsplit(str(uri))
    return urlunsplit(split._replace(netloc=split.netloc.rpartition("@")[2], query=""))


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a URI or a local path."""
    import pyarrow.fs

    if not is_uri(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).absolute())
    return pyarrow.fs.FileSystem.from_uri(str(uri))


def size_of(uri: str | os.PathLike) -> int | None:
    """The size of the file at `uri` in bytes; None if there is none."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pyarrow.fs.FileType.File else None


def read_bytes(uri: str | os.PathLike) -> bytes:
    """A small file's bytes (FileNotFoundError if there is none)."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a small file at `uri` (parents created; an object appears whole or not at all)."""
    fs, path = filesystem(uri)
    fs.create_dir(str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local: Path, uri: str) -> str:
    """Copy a local file to `uri`; returns its sha256 (computed while it streams)."""
    fs, path = filesystem(uri)
    fs.create_dir(str(Path(path).parent), recursive=True)
    digest = hashlib.sha256()
    with open(local, "rb") as source, fs.open_output_stream(path) as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


def download(uri: str, target: Path) -> str:
    """Copy `uri` to `target`, which appears only once complete (progan.files.atomic_file);
    returns its sha256, computed while it streams."""
    from progan.files import atomic_file

    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as source, atomic_file(target) as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    """sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
