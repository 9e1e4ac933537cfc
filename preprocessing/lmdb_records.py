"""The record format on disk, without torch: ordinal keys, the key table, the writer, the
manifest and the shared per-process LMDB readers. `lmdb_store` adds the torch reader and
re-exports all of this; merge tasks import only this module (no torch to load)."""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from PIL import Image

from preprocessing.object_store import is_uri
from progan.files import atomic_file

MANIFEST = "manifest.json"
KEYS_DIR = "keys"
ENCODINGS = ("raw", "png")
#: `record_format.key_order` of datasets written by this code; older datasets lack it.
ORDINAL_KEY_ORDER = "ordinal: record i under 8-byte big-endian i; record keys in keys/"


def resolution_dir(dataset_dir: str | os.PathLike, resolution: int) -> Path:
    """`<dataset_dir>/res-0004`, `res-0008`, ... for one resolution."""
    return Path(dataset_dir) / f"res-{resolution:04d}"


def keys_dir(dataset_dir: str | os.PathLike) -> Path:
    """`<dataset_dir>/keys`: the side table ordinal -> record key."""
    return Path(dataset_dir) / KEYS_DIR


def ordinal_key(index: int) -> bytes:
    """LMDB key of record `index`: 8 bytes big-endian, so byte order = index order."""
    return struct.pack(">Q", index)


def record_format(encoding: str) -> dict[str, str]:
    """The manifest's `record_format` entry for records written by this module."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown record encoding {encoding!r}; expected one of {ENCODINGS}")
    layout = "RGB uint8, channel-major [3, H, W]" if encoding == "raw" else "PNG, RGB"
    return {"encoding": encoding, "layout": layout, "key_order": ORDINAL_KEY_ORDER}


def encode_record(image: np.ndarray, encoding: str) -> bytes:
    """Bytes stored for one HxWx3 uint8 image."""
    if encoding == "raw":
        return np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    if encoding == "png":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown record encoding {encoding!r}; expected one of {ENCODINGS}")


def _open_for_writing(path: Path, map_size: int) -> lmdb.Environment:
    close_readers([path])
    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=map_size, readahead=False, meminit=False, max_dbs=0)


def _append(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Append (key, value) pairs in key order in one transaction, growing the map if full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k, v in items:
                    if not txn.put(k, v, append=True, overwrite=False):
                        raise ValueError(f"record {k.hex()} exists already")
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


class LmdbWriter:
    """Appends records, in their final order, to the per-resolution LMDBs and the key table.

    `append(records)` gives the next ordinals to `records` ((record key, {resolution:
    bytes}) pairs) in the order given (prepare: source-key order, faces largest first).
    With `keys=False` only the resolutions are written, so one writer per resolution may
    run in parallel (one of them with the key table). Only for writing a fresh dataset; one
    writer process per LMDB. The map grows automatically when full.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        resolutions: Iterable[int],
        *,
        keys: bool = True,
        map_size: int = 1 << 28,
    ) -> None:
        self.envs: dict[int, lmdb.Environment] = {
            res: _open_for_writing(resolution_dir(dataset_dir, res), map_size)
            for res in resolutions
        }
        self.keys = _open_for_writing(keys_dir(dataset_dir), 1 << 24) if keys else None
        self.next = min((e.stat()["entries"] for e in self.envs.values()), default=0)

    def append(self, records: list[tuple[str, dict[int, bytes]]]) -> None:
        """Write records as ordinals next, next+1, ...; one transaction per LMDB."""
        if not records:
            return
        names = [k for k, _ in records]
        ordinals = [ordinal_key(self.next + i) for i in range(len(records))]
        for res, env in self.envs.items():
            values = [payloads[res] for _, payloads in records]
            _append(env, list(zip(ordinals, values, strict=True)))
        if self.keys is not None:
            encoded = [k.encode("utf-8", "surrogateescape") for k in names]
            _append(self.keys, list(zip(ordinals, encoded, strict=True)))
        self.next += len(records)

    def counts(self) -> dict[int, int]:
        """Number of records per resolution."""
        return {res: env.stat()["entries"] for res, env in self.envs.items()}

    def close(self) -> None:
        """Flush and close every LMDB."""
        for env in [*self.envs.values(), *([self.keys] if self.keys is not None else [])]:
            env.sync(True)
            env.close()
        self.envs.clear()
        self.keys = None


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """Write `data` as JSON to `path` through a temporary file and a rename, so a reader (or
    a crash) never sees half a file. `dumps` goes to `json.dumps` (indent, sort_keys...).
    The project's one atomic JSON writer: manifests, prepare progress, run and sweep state."""
    with atomic_file(path) as f:
        f.write((json.dumps(data, **dumps) + "\n").encode("utf-8"))
    return Path(path)


def write_manifest(dataset_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically."""
    write_json_atomic(Path(dataset_dir) / MANIFEST, manifest, indent=2, sort_keys=True)


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """The manifest of a finished dataset (a folder, or a URI in object storage);
    FileNotFoundError with a clear message if none."""
    if is_uri(dataset_dir):
        from preprocessing.staging import read_remote_manifest

        return read_remote_manifest(str(dataset_dir))
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir} has no {MANIFEST}: not a finished prepared dataset")
    return json.loads(path.read_text(encoding="utf-8"))


def available_resolutions(dataset_dir: str | os.PathLike) -> list[int]:
    """Resolutions of a finished dataset, ascending."""
    return sorted(int(r) for r in read_manifest(dataset_dir)["resolutions"])


# py-lmdb allows one open Environment per path and process: readers share it.
_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def open_reader(path: Path) -> lmdb.Environment:
    """One resolution's LMDB read-only, lock-free, memory-mapped, without readahead; shared
    by every reader of that path in this process (reopened in a forked child). Pass resolved
    paths: this runs on every record read."""
    key = os.fspath(path)
    entry = _READERS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[1]
    if entry is not None:  # inherited through fork: closing only unmaps it in this child
        entry[1].close()
    env = lmdb.open(
        str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048
    )
    _READERS[key] = (os.getpid(), env)
    return env


def close_readers(paths: Iterable[Path]) -> None:
    """Close this process's shared readers of `paths` (before writing to them)."""
    for path in paths:
        entry = _READERS.pop(str(Path(path).resolve()), None)
        if entry is not None and entry[0] == os.getpid():
            entry[1].close()
