"""Merge the shard files into the one LMDB per resolution that the trainer reads.

Each resolution is merged by its own task (in parallel), appending every shard's records in
shard order under ordinals 0, 1, 2, ...; the task for the smallest resolution also writes
the key table. Appending sorted keys is LMDB's fastest write path, so the merge costs about
as much as copying the bytes (docs/benchmarks.md). A merge always starts from scratch: an
interrupted one leaves no manifest, and the rerun merges again.

Why merge rather than read the shard files through an index: the trainer then opens one
memory-mapped file per resolution however many shards there were (30M photos at 256 per
shard would be ~117k files per reader process), and reads stay one B-tree lookup.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from preprocessing.lmdb_records import LmdbWriter, keys_dir, resolution_dir
from preprocessing.shard_file import read_header, read_shard, shard_path


def merge_resolution(out_dir: str, shards: int, resolution: int, with_keys: bool) -> int:
    """Write `res-NNNN` (and `keys/` when `with_keys`) from shard files 0..shards-1.

    Returns the number of records written.
    """
    out = Path(out_dir)
    paths = [shard_path(out, i) for i in range(shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard files missing in {out}: {missing[:5]}")
    shutil.rmtree(resolution_dir(out, resolution), ignore_errors=True)
    if with_keys:
        shutil.rmtree(keys_dir(out), ignore_errors=True)
    total = 0
    for path in paths:
        header = read_header(path)
        if header["resolutions"]:
            i = header["resolutions"].index(resolution)
            total += sum(sizes[i] for sizes in header["sizes"])
    map_size = max(1 << 20, int(total * 1.3) + (64 << 20))
    writer = LmdbWriter(out, [resolution], keys=with_keys, map_size=map_size)
    try:
        for path in paths:
            writer.append(read_shard(path, [resolution]).records)
        return writer.counts()[resolution]
    finally:
        writer.close()
