"""One finished shard on disk: `_progress/shard-NNNNNN.bin`, written by the worker that made
it, read once by the merge.

Format: one line of JSON (shard number, record keys, per-record payload sizes by
resolution, rejects, stage timings, nodes), then every payload back to back, record by
record, resolutions ascending. Written to a temporary name, fsynced and renamed, so the file
exists only complete: its presence is the shard's done-mark for resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preprocessing.rejects import Reject
from progan.files import atomic_file

PROGRESS = "_progress"
Record = tuple[str, dict[int, bytes]]  # record key, {resolution: encoded image}


@dataclass
class ShardResult:
    """Records and rejects of one shard, with stage timings (seconds) and the nodes used."""

    shard: int
    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)


def shard_path(out_dir: str | os.PathLike, shard: int) -> Path:
    """Where shard `shard`'s file lives in a dataset being prepared."""
    return Path(out_dir) / PROGRESS / f"shard-{shard:06d}.bin"


def write_shard(out_dir: str | os.PathLike, result: ShardResult) -> Path:
    """Write `result` atomically; returns its path."""
    path = shard_path(out_dir, result.shard)
    resolutions = sorted(result.records[0][1]) if result.records else []
    header = {
        "shard": result.shard,
        "resolutions": resolutions,
        "keys": [k for k, _ in result.records],
        "sizes": [[len(p[r]) for r in resolutions] for _, p in result.records],
        "rejects": [asdict(r) for r in result.rejects],
        "timings": result.timings,
        "nodes": result.nodes,
    }
    with atomic_file(path, fsync=True) as fh:  # its presence marks the shard done
        fh.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        for _, payloads in result.records:
            for r in resolutions:
                fh.write(payloads[r])
    return path


def read_header(path: Path) -> dict:
    """The JSON header of a shard file (keys, sizes, rejects, timings, nodes)."""
    with open(path, "rb") as fh:
        return json.loads(fh.readline())


def read_shard(path: Path, resolutions: list[int] | None = None) -> ShardResult:
    """A shard file back as a ShardResult; only `resolutions` (default: all) are loaded."""
    with open(path, "rb") as fh:
        header = json.loads(fh.readline())
        have = header["resolutions"]
        want = set(have if resolutions is None else resolutions)
        records = []
        for key, sizes in zip(header["keys"], header["sizes"], strict=True):
            payloads = {}
            for res, size in zip(have, sizes, strict=True):
                if res in want:
                    payloads[res] = fh.read(size)
                else:
                    fh.seek(size, os.SEEK_CUR)
            records.append((key, payloads))
    return ShardResult(
        header["shard"],
        records=records,
        rejects=[Reject(**r) for r in header["rejects"]],
        timings=header["timings"],
        nodes=header["nodes"],
    )
