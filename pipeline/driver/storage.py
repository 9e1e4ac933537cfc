"""Ray Train storage: the one place every node of a cluster shares.

`run.storage_path` is a local or shared path, or a URI that pyarrow understands (`s3://`,
`gs://`, `file://`), and is used as given. Each phase is a Ray Train run named
`<run id>-<phase>` under it; its checkpoints are directories in the layout of
pipeline.phases.checkpoints. A phase starts from the previous phase's final checkpoint,
named here by a URI (or an absolute path) that every node can open, never by a file on the
driver's disk. The driver's run directory holds only what the driver and the user need.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, is_uri


class StorageError(RuntimeError):
    """Storage is unusable (full, unwritable, unreadable), in one line."""


def storage_root(cfg: PipelineConfig, run_dir: Path) -> str:
    """`run.storage_path` as given (absolute if a path), else `<run dir>/ray`."""
    configured = cfg.run.storage_path
    if configured is None:
        return str(run_dir / "ray")
    return configured if is_uri(configured) else str(Path(configured).absolute())


def checkpoint_uri(storage: str, ray_name: str, checkpoint_path: str) -> str:
    """The storage URI (or path) of a checkpoint of the Ray run `ray_name`."""
    return f"{storage.rstrip('/')}/{ray_name}/{Path(checkpoint_path).name}"


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a URI or a local path."""
    import pyarrow.fs

    if not is_uri(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).absolute())
    return pyarrow.fs.FileSystem.from_uri(uri)


def write_text(uri: str, text: str) -> None:
    """Write a small file at `uri` (parents created)."""
    fs, path = filesystem(uri)
    fs.create_dir(str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def fetch_file(uri: str, target: Path) -> Path:
    """Copy one file from storage (a path or URI) to `target`, atomically."""
    from preprocessing.lmdb_records import atomic_file

    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as source, atomic_file(target) as f:
        shutil.copyfileobj(source, f)
    return target


def read_text(uri: str) -> str:
    """Read a small file at `uri`."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def delete_tree(uri: str) -> None:
    """Remove a directory at `uri` if it exists."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def local_path(uri: str) -> Path | None:
    """The local path behind a path or `file://` URI; None for remote storage."""
    if not is_uri(uri):
        return Path(uri)
    if uri.startswith("file://"):
        return Path(filesystem(uri)[1])
    return None


def free_bytes(uri: str) -> int | None:
    """Free space where `uri` lives (its nearest existing folder); None if unknown (remote)."""
    path = local_path(uri)
    if path is None:
        return None
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(cfg: PipelineConfig) -> int:
    """About how large one checkpoint is: G, G_ema, D and both optimizers' moments, fp32.

    The networks are built on the meta device (no memory, no time); every phase's state
    holds all levels, so the size is the same for every phase.
    """
    import torch

    from progan.models import build_networks

    with torch.device("meta"):
        G, D = build_networks(cfg.model)
    g = sum(p.numel() for p in G.parameters())
    d = sum(p.numel() for p in D.parameters())
    moments = 2 if cfg.train.optimizer == "adam" else 1
    return 4 * (g * (2 + moments) + d * (1 + moments))


def check_free_space(cfg: PipelineConfig, storage: str) -> None:
    """Refuse to start a phase that could not write its checkpoints (keep + 1 in flight)."""
    free = free_bytes(storage)
    if free is None:
        return
    need = checkpoint_bytes(cfg) * (cfg.run.keep_checkpoints + 1) + 64 * 2**20
    if free < need:
        raise StorageError(
            f"storage {storage} has {free / 2**20:.0f} MiB free; a phase needs about "
            f"{need / 2**20:.0f} MiB for {cfg.run.keep_checkpoints + 1} checkpoints: free "
            "space, point run.storage_path elsewhere, or lower run.keep_checkpoints"
        )
