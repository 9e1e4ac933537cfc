"""The dataset on disk: one LMDB per resolution plus `manifest.json`. Owns the record format.

Layout of a prepared dataset directory::

    manifest.json        written last; its presence means the dataset is complete
    rejects.csv          every input that did not become a record, with its reason
    keys/data.mdb        side table: ordinal -> record key (source key, `#<n>` per face)
    res-0004/data.mdb    one LMDB per resolution, 4 .. target
    ...

Records are keyed by ordinal: record `i` is stored under `ordinal_key(i)` (8 bytes,
big-endian) in every resolution, so a reader opens in O(1) (no key enumeration) and reads
record `i` with one lookup. Records follow the sorted source keys (faces of one photo
largest first). Each value is one image, RGB, either `raw` (3*H*W bytes, channel-major,
exactly the tensor layout) or `png`. Writers append in order, one process per LMDB;
readers are read-only, lock-free, memory-mapped and opened lazily per process (safe for
DataLoader workers and Ray processes). The torch-free half (keys, writer, manifest, shared
readers) is `lmdb_records`, re-exported here.
"""

from __future__ import annotations

import io
import os

import lmdb
import numpy as np
import torch
from PIL import Image

from preprocessing.lmdb_records import (
    ENCODINGS,
    KEYS_DIR,
    MANIFEST,
    ORDINAL_KEY_ORDER,
    LmdbWriter,
    available_resolutions,
    close_readers,
    encode_record,
    keys_dir,
    open_reader,
    ordinal_key,
    read_manifest,
    record_format,
    resolution_dir,
    write_json_atomic,
    write_manifest,
)

__all__ = [
    "ENCODINGS",
    "KEYS_DIR",
    "MANIFEST",
    "ORDINAL_KEY_ORDER",
    "LmdbImageDataset",
    "LmdbWriter",
    "available_resolutions",
    "close_readers",
    "decode_record",
    "encode_record",
    "keys_dir",
    "open_reader",
    "ordinal_key",
    "read_manifest",
    "record_format",
    "resolution_dir",
    "write_json_atomic",
    "write_manifest",
]


def decode_record(value: bytes | memoryview, encoding: str, resolution: int) -> torch.Tensor:
    """torch.uint8 tensor [3, H, W] from stored bytes."""
    if encoding == "raw":
        expected = 3 * resolution * resolution
        if len(value) != expected:
            raise ValueError(f"raw record has {len(value)} bytes, expected {expected}")
        return torch.frombuffer(bytearray(value), dtype=torch.uint8).view(3, resolution, resolution)
    arr = np.asarray(Image.open(io.BytesIO(bytes(value))).convert("RGB"))
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class LmdbImageDataset(torch.utils.data.Dataset):
    """Records of one resolution as torch.uint8 tensors [3, H, W], in record order.

    Opens in O(1): the length comes from the manifest, record `i` is one keyed lookup.
    Picklable: the LMDB is opened on first use in each process (and reopened after a fork).
    """

    def __init__(self, dataset_dir: str | os.PathLike, resolution: int) -> None:
        manifest = read_manifest(dataset_dir)
        if resolution not in [int(r) for r in manifest["resolutions"]]:
            raise ValueError(
                f"{dataset_dir} has no resolution {resolution}; it has {manifest['resolutions']}"
            )
        fmt = manifest.get("record_format", {})
        if fmt.get("key_order") != ORDINAL_KEY_ORDER:
            raise ValueError(
                f"{dataset_dir} was written by an older `progan prepare` (records keyed by "
                "name); re-run `progan prepare SOURCE "
                f"{dataset_dir} --resolution {max(manifest['resolutions'])} --force`"
            )
        self.path = resolution_dir(dataset_dir, resolution).resolve()
        self.keys_path = keys_dir(dataset_dir).resolve()
        self.resolution = resolution
        self.encoding = fmt["encoding"]
        self.length = int(manifest["counts"][str(resolution)])
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def _open(self) -> lmdb.Environment:
        env = open_reader(self.path)  # shared per process; a dict lookup after the first call
        if env is not self._env or self._pid != os.getpid():
            self._env, self._pid = env, os.getpid()
            entries = env.stat()["entries"]
            if entries != self.length:
                raise RuntimeError(
                    f"{self.path} holds {entries} records, manifest says {self.length}"
                )
        return env

    def __len__(self) -> int:
        return self.length

    def _check(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(f"record {i} out of range 0..{self.length - 1}")
        return i

    def key(self, i: int) -> str:
        """The record key of index i (source path, `#n` per face in multi-face mode)."""
        with open_reader(self.keys_path).begin() as txn:
            return txn.get(ordinal_key(self._check(i))).decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> torch.Tensor:
        env = self._open()
        with env.begin(buffers=True) as txn:
            value = txn.get(ordinal_key(self._check(int(i))))
            return decode_record(value, self.encoding, self.resolution)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_env=None, _pid=None)
        return state
