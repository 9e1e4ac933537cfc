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
import json
import shutil
import socket
import time
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, is_uri
from pipeline.phases.checkpoints import PREFIX
from pipeline.tracking.secrets import redact_uri
from preprocessing.object_store import download, filesystem, join, read_bytes, write_bytes


class StorageError(ConfigError):
    """Storage is unusable (full, unwritable, unreadable), in one line."""


def storage_root(cfg: PipelineConfig, run_dir: Path) -> str:
    """`run.storage_path` as given (absolute if a path), else `<run dir>/ray`."""
    configured = cfg.run.storage_path
    if configured is None:
        return str(run_dir / "ray")
    return configured if is_uri(configured) else str(Path(configured).absolute())


def checkpoint_uri(storage: str, ray_name: str, checkpoint_path: str) -> str:
    """The storage URI (or path) of a checkpoint of the Ray run `ray_name`."""
    return join(storage, ray_name, Path(checkpoint_path).name)


def with_storage_credentials(uri: str, storage: str) -> str:
    """A checkpoint URI read back from state.json (its storage password redacted there)
    under this run's `storage`, with the password back."""
    masked = redact_uri(storage)
    if masked == storage:
        return uri
    # the part before the path (scheme://user:***@host) is what redaction changed
    head = masked[: masked.index("@") + 1]
    return storage[: storage.index("@") + 1] + uri[len(head) :] if uri.startswith(head) else uri


def write_text(uri: str, text: str) -> None:
    """Write a small file at `uri` (parents created)."""
    write_bytes(uri, text.encode())


def fetch_file(uri: str, target: Path) -> Path:
    """Copy one file from storage (a path or URI) to `target`, atomically."""
    download(uri, target)
    return target


def read_text(uri: str) -> str:
    """Read a small file at `uri`."""
    return read_bytes(uri).decode()


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


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of a run's checkpoints


def snapshot_is_readable(text: str) -> bool:
    """Whether Ray Train could load this snapshot (JSON with its checkpoint list)."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("checkpoint_results"), list)


def checkpoint_dirs(storage: str, ray_name: str) -> list[str]:
    """URIs (or paths) of the Ray run's checkpoint directories, most images first."""
    import pyarrow.fs

    fs, base = filesystem(join(storage, ray_name))
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base))
    except (FileNotFoundError, OSError):
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory),
        reverse=True,
    )
    return [join(storage, ray_name, n) for n in names if n.startswith(PREFIX)]


def recover_unreadable_snapshot(storage: str, ray_name: str) -> tuple[str, str | None] | None:
    """If the Ray run's snapshot is unreadable (a kill or a full disk mid-write: Ray writes
    it in place, and then refuses every later fit of the run), move it aside and find the
    newest checkpoint that loads. Returns (where the snapshot went, that checkpoint or
    None); None if the snapshot is fine or absent."""
    from pipeline.phases.checkpoints import load_training_state

    fs, path = filesystem(join(storage, ray_name, SNAPSHOT_FILE))
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, OSError):
        return None
    if snapshot_is_readable(text):
        return None
    aside = f"{path}.unreadable-{int(time.time())}"
    fs.move(path, aside)
    for candidate in checkpoint_dirs(storage, ray_name):
        try:
            load_training_state(candidate)
        except Exception:  # an upload cut short: try the one before
            continue
        return aside, candidate
    return aside, None


OWNERS_DIR = ".progan-runs"  # in a shared storage root: which run directory owns each run id


def exists(uri: str) -> bool:
    """Whether a file exists at `uri` (a path or URI)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def claim_storage(storage: str, run_id: str, claim: str, run_dir: Path) -> None:
    """Refuse a run id that another run directory (another run root, another machine)
    already trains under this storage: its Ray runs would be shared and each would delete
    the other's checkpoints. The first start writes `<storage>/.progan-runs/<id>.json` with
    the run's claim token (kept in its state.json); later starts must present the same."""
    marker = join(storage, OWNERS_DIR, f"{run_id}.json")
    if exists(marker):
        owner = json.loads(read_text(marker))
        if owner.get("claim") != claim:
            raise StorageError(
                f"run.storage_path: {redact_uri(storage)} already holds run {run_id} of "
                f"{owner.get('run_dir')} (on {owner.get('host')}); use another --run-id or "
                "run.storage_path, or `progan resume` that run directory"
            )
        return
    owner = {"claim": claim, "run_dir": str(run_dir), "host": socket.gethostname()}
    write_text(marker, json.dumps(owner))
