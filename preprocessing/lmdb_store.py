"""The dataset on disk: one LMDB per resolution plus `manifest.json`. Owns the record format.

Layout of a prepared dataset directory::

    manifest.json        written last; its presence means the dataset is complete
    rejects.csv          every input that did not become a record, with its reason
    res-0004/data.mdb    one LMDB per resolution, 4 .. target
    ...

Each LMDB maps a record key (the source key, with `#<n>` appended per face in multi-face
mode) to one image, RGB, either `raw` (3*H*W bytes, channel-major, exactly the tensor
layout) or `png`. Record `i` is the i-th key in byte order, so every resolution holds the
same keys at the same indices. Writers are single-process; readers are read-only,
lock-free, memory-mapped and opened lazily per process (safe for DataLoader workers and
Ray processes).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from PIL import Image

MANIFEST = "manifest.json"
ENCODINGS = ("raw", "png")
MAX_KEY_BYTES = 500  # LMDB's default key limit is 511 bytes


def resolution_dir(dataset_dir: str | os.PathLike, resolution: int) -> Path:
    """`<dataset_dir>/res-0004`, `res-0008`, ... for one resolution."""
    return Path(dataset_dir) / f"res-{resolution:04d}"


def encode_record(image: np.ndarray, encoding: str) -> bytes:
    """Bytes stored for one HxWx3 uint8 image."""
    if encoding == "raw":
        return np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    if encoding == "png":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown record encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_record(value: bytes | memoryview, encoding: str, resolution: int) -> torch.Tensor:
    """torch.uint8 tensor [3, H, W] from stored bytes."""
    if encoding == "raw":
        expected = 3 * resolution * resolution
        if len(value) != expected:
            raise ValueError(f"raw record has {len(value)} bytes, expected {expected}")
        return torch.frombuffer(bytearray(value), dtype=torch.uint8).view(3, resolution, resolution)
    arr = np.asarray(Image.open(io.BytesIO(bytes(value))).convert("RGB"))
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def record_key(key: str) -> bytes:
    """LMDB key bytes for a record key; ValueError when too long for LMDB."""
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key longer than {MAX_KEY_BYTES} bytes")
    return raw


class LmdbWriter:
    """Puts records into the per-resolution LMDBs; one writer process at a time.

    Puts are idempotent (same key, same bytes overwrite), so a shard redone after a crash
    leaves no duplicates. The map grows automatically when full.
    """

    def __init__(self, dataset_dir: str | os.PathLike, resolutions: Iterable[int]) -> None:
        self.envs: dict[int, lmdb.Environment] = {}
        for res in resolutions:
            path = resolution_dir(dataset_dir, res)
            close_readers([path])
            path.mkdir(parents=True, exist_ok=True)
            self.envs[res] = lmdb.open(
                str(path), map_size=1 << 28, readahead=False, meminit=False, max_dbs=0
            )

    def put(self, records: list[tuple[str, dict[int, bytes]]]) -> None:
        """Write records ({resolution: bytes} per key), one transaction per resolution."""
        for res, env in self.envs.items():
            items = [(record_key(k), payloads[res]) for k, payloads in records]
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for k, v in items:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)

    def counts(self) -> dict[int, int]:
        """Number of records per resolution."""
        return {res: env.stat()["entries"] for res, env in self.envs.items()}

    def close(self) -> None:
        """Flush and close every LMDB."""
        for env in self.envs.values():
            env.sync(True)
            env.close()
        self.envs.clear()


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """Write `data` as JSON to `path` through a temporary file and a rename, so a reader (or
    a crash) never sees half a file. `dumps` goes to `json.dumps` (indent, sort_keys...).
    The project's one atomic JSON writer: manifests, prepare progress, run and sweep state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, **dumps) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_manifest(dataset_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically."""
    write_json_atomic(Path(dataset_dir) / MANIFEST, manifest, indent=2, sort_keys=True)


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """The manifest of a finished dataset; FileNotFoundError with a clear message if none."""
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


class LmdbImageDataset(torch.utils.data.Dataset):
    """Records of one resolution as torch.uint8 tensors [3, H, W], in key order.

    Picklable: the LMDB is opened on first use in each process (and reopened after a fork).
    """

    def __init__(self, dataset_dir: str | os.PathLike, resolution: int) -> None:
        manifest = read_manifest(dataset_dir)
        if resolution not in [int(r) for r in manifest["resolutions"]]:
            raise ValueError(
                f"{dataset_dir} has no resolution {resolution}; it has {manifest['resolutions']}"
            )
        self.path = resolution_dir(dataset_dir, resolution).resolve()
        self.resolution = resolution
        self.encoding = manifest["record_format"]["encoding"]
        self.length = int(manifest["counts"][str(resolution)])
        self._env: lmdb.Environment | None = None
        self._keys: list[bytes] | None = None
        self._pid: int | None = None

    def _open(self) -> lmdb.Environment:
        env = open_reader(self.path)  # shared per process; a dict lookup after the first call
        if env is not self._env or self._pid != os.getpid():
            self._env, self._pid = env, os.getpid()
            with env.begin() as txn:
                self._keys = list(txn.cursor().iternext(keys=True, values=False))
            if len(self._keys) != self.length:
                raise RuntimeError(
                    f"{self.path} holds {len(self._keys)} records, manifest says {self.length}"
                )
        return env

    def __len__(self) -> int:
        return self.length

    def key(self, i: int) -> str:
        """The record key of index i (source path, `#n` per face in multi-face mode)."""
        self._open()
        return self._keys[i].decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> torch.Tensor:
        env = self._open()
        with env.begin(buffers=True) as txn:
            value = txn.get(self._keys[i])
            return decode_record(value, self.encoding, self.resolution)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_env=None, _keys=None, _pid=None)
        return state
