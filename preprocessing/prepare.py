"""`prepare_dataset`: turn a source into a finished dataset directory on Ray Data.

The driver lists the source (names only: locally when it sees the source, else in a Ray
task on the cluster), checks the request against the cluster's resources, and cuts the
sorted keys into fixed shards of `shard_size`. Ray Data workers read, decode, detect,
crop and write each shard's records to their own shard file (`ray_stages`); then one task
per resolution merges the shard files into the LMDB the trainer reads (`merge`), and the
driver writes rejects.csv and the manifest. A shard file exists only complete, so a run
killed anywhere and rerun redoes only the shards without one and ends with exactly the
bytes of an uninterrupted run. Every wait is bounded by `timeout_s`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preprocessing.config import PrepareConfig, PrepareError, make_config
from preprocessing.lmdb_store import (
    KEYS_DIR,
    MANIFEST,
    close_readers,
    read_manifest,
    record_format,
    resolution_dir,
    write_json_atomic,
    write_manifest,
)
from preprocessing.object_store import is_uri
from preprocessing.pyramid import resolutions_down_to_4
from preprocessing.rejects import Reject, summarize, write_csv
from preprocessing.resources import WorkerPlan, plan_workers
from preprocessing.runners import (
    alive_node_resources,
    ensure_ray,
    list_remotely,
    merge,
    run_in_process,
    run_shards,
    shards_of,
)
from preprocessing.shard_file import PROGRESS, read_header, shard_path
from preprocessing.sources import Source, open_source
from progan.files import FolderLock

__all__ = ["PrepareError", "PrepareSummary", "dataset_fingerprint", "prepare_dataset"]

REJECTS_CSV = "rejects.csv"
FORMAT_VERSION = 2  # 2: records keyed by ordinal, record keys in keys/
DEFAULT_TIMEOUT_S = 1800.0
# a Ray started just for a prepare: no dashboard, worker logs stay in the session's files
QUIET_RAY = {"include_dashboard": False, "log_to_driver": False}


@dataclass
class PrepareSummary:
    """What a prepare run produced."""

    out_dir: str
    fingerprint: str
    inputs: int
    records: int
    rejected: int
    counts: dict[int, int]
    reject_reasons: dict[str, int]
    already_complete: bool = False
    resumed_shards: int = 0
    processed_shards: int = 0
    elapsed_s: float = 0.0
    nodes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain dict (for JSON and tables)."""
        return asdict(self)


def software_versions() -> dict[str, str]:
    """Versions of what shaped the records."""
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "pillow", "facenet-pytorch", "lmdb", "scikit-image", "ray"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "unknown"
    return out


def dataset_fingerprint(source: Source, config: PrepareConfig) -> str:
    """Stable id of (source content listing, config): equal means same dataset."""
    text = f"v{FORMAT_VERSION}:{source.fingerprint}:{config.digest()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe_change(old: dict, source: Source, config: PrepareConfig) -> str:
    changes = []
    if old.get("source_fingerprint") != source.fingerprint:
        changes.append("the source changed (different files or sizes)")
    new_cfg = config.model_dump(mode="json")
    for key in sorted(set(new_cfg) | set(old.get("config", {}))):
        if old.get("config", {}).get(key) != new_cfg.get(key):
            changes.append(f"{key}: {old.get('config', {}).get(key)!r} -> {new_cfg.get(key)!r}")
    return "; ".join(changes) or "format version differs"


def _close_own_readers(out: Path) -> None:
    """Close this process's cached readers of `out` before its LMDBs are replaced (a reader
    left open on a deleted file would make its reused inode look "already open")."""
    close_readers([*out.glob("res-*"), out / KEYS_DIR])


def _owned_paths(out: Path) -> list[Path]:
    names = (MANIFEST, REJECTS_CSV, PROGRESS, KEYS_DIR)
    return [p for p in out.iterdir() if p.name in names] + sorted(out.glob("res-*"))


class OutputLock(FolderLock):
    """`<out>/.lock` while a prepare writes there: two prepares into one folder would
    merge into one dataset and delete each other's LMDBs."""

    def __init__(self, out: Path) -> None:
        super().__init__(out, PrepareError)

    def message(self, holder: str) -> str:
        return (
            f"{self.path.parent} is being prepared by {holder}; wait for it to end (or stop "
            "it), then run again: it resumes"
        )


def _check_output(out: Path, run: dict, source: Source, config: PrepareConfig, force: bool):
    """Refuse to mix datasets; with force, clear what a previous run wrote."""
    if not out.exists():
        return None
    previous = None
    if (out / MANIFEST).is_file():
        previous = read_manifest(out)
    elif (out / PROGRESS / "run.json").is_file():
        previous = json.loads((out / PROGRESS / "run.json").read_text())
    elif any(p.name != OutputLock.NAME for p in out.iterdir()) and not force:
        raise PrepareError(f"{out} is not empty and is not a prepared dataset; refusing to write")
    if force:
        _close_own_readers(out)
        for path in _owned_paths(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    if previous is not None and previous.get("fingerprint") != run["fingerprint"]:
        raise PrepareError(
            f"{out} was prepared with a different source or config ("
            f"{_describe_change(previous, source, config)}); use --force to start over, "
            "or choose another output directory"
        )
    return previous


def prepare_dataset(
    source: str | os.PathLike | Source,
    out_dir: str | os.PathLike,
    resolution: int,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    detector: str = "mtcnn",
    force: bool = False,
    address: str | None = None,
    progress: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    node_local: bool = False,
    **options,
) -> PrepareSummary:
    """Prepare (or resume, or confirm) the dataset for `source` in `out_dir`.

    `node_local` keeps every task on this machine's Ray node (`out_dir` is on its disk
    only: a prepare into object storage). `options` are further PrepareConfig fields (crop,
    margin, min_face_size, min_prob, multi_face, record_format, shard_size, limit, ...).
    `workers` MTCNN actors with `gpus_per_worker` GPU each (see `resources.plan_workers`).
    Uses the running Ray if there is one, else starts one (`address` to join a cluster).
    `timeout_s` bounds every wait (listing, actor start, no shard finishing, a merge).
    Raises ConfigError for bad values, SourceError for an unusable source, ResourceError for
    an unschedulable request and PrepareError when `out_dir` holds another dataset or a
    wait timed out.
    """
    if is_uri(out_dir):
        kwargs = {"workers": workers, "gpus_per_worker": gpus_per_worker, "address": address}
        kwargs.update(detector=detector, force=force, progress=progress, timeout_s=timeout_s)
        return _prepare_into_uri(source, str(out_dir), resolution, **kwargs, **options)
    t_start = time.perf_counter()
    config = make_config(resolution=resolution, detector=detector, **options)
    with contextlib.ExitStack() as stack:
        started_ray = False
        try:
            if isinstance(source, Source) or Path(source).exists():
                src = open_source(source)
            else:  # only the cluster's nodes see it
                started_ray = ensure_ray(address, **QUIET_RAY)
                plan_workers(alive_node_resources(), workers, gpus_per_worker)  # before any task
                src = list_remotely(os.fspath(source), timeout_s)
            src = src.limited(config.limit)
            out = Path(out_dir)
            resolutions = resolutions_down_to_4(config.resolution)
            run = {
                "fingerprint": dataset_fingerprint(src, config),
                "source_fingerprint": src.fingerprint,
                "config": config.model_dump(mode="json"),
            }
            if gpus_per_worker or address:  # a refusal comes before anything is written
                started_ray = ensure_ray(address, **QUIET_RAY) or started_ray
                plan_workers(alive_node_resources(), workers, gpus_per_worker)
            stack.enter_context(OutputLock(out))  # a second prepare into `out` is refused
            previous = _check_output(out, run, src, config, force)
            if previous is not None and (out / MANIFEST).is_file():
                return _summary_from_manifest(out, previous, time.perf_counter() - t_start)

            shards = shards_of(src.keys, config.shard_size)
            pending = [(i, k) for i, k in enumerate(shards) if not shard_path(out, i).is_file()]
            in_process = len(shards) == 1 and address is None and not gpus_per_worker
            plan = WorkerPlan(1, 0.0)
            if not in_process:  # resources checked before anything is written or started
                started_ray = ensure_ray(address, **QUIET_RAY) or started_ray
                here = alive_node_resources(this_node_only=node_local)
                plan = plan_workers(here, workers, gpus_per_worker, len(pending))
            (out / PROGRESS).mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / PROGRESS / "run.json", run, sort_keys=True)
            stats = {"nodes": set(), "timings": {}}
            if pending and in_process:
                stats = run_in_process(out, src, config, pending)
            elif pending:
                stats = run_shards(out, src, config, pending, plan, timeout_s, progress, node_local)
            t_merge = time.perf_counter()
            _close_own_readers(out)
            counts = merge(out, len(shards), resolutions, timeout_s, in_process, node_local)
            merge_s = time.perf_counter() - t_merge
        finally:
            if started_ray:
                import ray

                ray.shutdown()

        summary = _finalize(out, src, source, config, run, resolutions, counts, len(shards))
        shutil.rmtree(out / PROGRESS, ignore_errors=True)  # shard files: merged, no longer needed
        summary.resumed_shards = len(shards) - len(pending)
        summary.processed_shards = len(pending)
        summary.elapsed_s = time.perf_counter() - t_start
        summary.nodes = sorted(stats["nodes"])
        summary.timings = {**stats["timings"], "merge (wall)": merge_s}
        summary.plan = asdict(plan)
        return summary


def _prepare_into_uri(source, uri: str, resolution: int, force: bool, **kwargs) -> PrepareSummary:
    """Prepare into object storage: the same resumable prepare into a local work folder
    (`<cache>/prepare/<uri hash>`), then `staging.publish` (the manifest last), then the
    work folder is removed. A dataset already published from the same source and config is
    confirmed without work; another one at the URI is refused without `force`.

    The work folder is on this machine's disk, so every task runs on its Ray node
    (`node_local`): on a cluster, the node of the driver (the head under `progan submit`)."""
    from preprocessing.object_store import display
    from preprocessing.staging import (
        dataset_folder,
        default_cache_root,
        publish,
        read_remote_manifest,
    )

    t_start = time.perf_counter()
    try:
        remote = read_remote_manifest(uri)
    except FileNotFoundError:
        remote = None
    except OSError as err:
        raise PrepareError(f"{display(uri)} is not reachable from here: {err}") from None
    local_source = isinstance(source, Source) or Path(source).exists()
    if remote is not None and remote.get("files") and local_source and not force:
        options = {k: kwargs[k] for k in kwargs if k in PrepareConfig.model_fields}
        config = make_config(resolution=resolution, **options)
        src = open_source(source).limited(config.limit)
        if remote.get("fingerprint") != dataset_fingerprint(src, config):
            raise PrepareError(
                f"{display(uri)} holds a dataset prepared with a different source or config ("
                f"{_describe_change(remote, src, config)}); use --force to replace it, or "
                "choose another URI"
            )
        return _summary_from_manifest(uri, remote, time.perf_counter() - t_start)
    work = dataset_folder(default_cache_root() / "prepare", uri)
    summary = prepare_dataset(source, work, resolution, force=force, node_local=True, **kwargs)
    publish(work, uri)
    shutil.rmtree(work, ignore_errors=True)
    summary.out_dir = display(uri)
    summary.elapsed_s = time.perf_counter() - t_start
    return summary


def _finalize(out, src, spec, config, run, resolutions, counts, shards) -> PrepareSummary:
    """Check the LMDBs against the shard files, write rejects.csv and the manifest."""
    keys: list[str] = []
    rejects: list[Reject] = []
    for shard in range(shards):
        header = read_header(shard_path(out, shard))
        keys.extend(header["keys"])
        rejects.extend(Reject(**r) for r in header["rejects"])
    for res in resolutions:
        if counts[res] != len(keys):
            raise PrepareError(
                f"{resolution_dir(out, res)} holds {counts[res]} records but the shard logs "
                f"list {len(keys)}; rerun with --force"
            )
    rejects.sort(key=lambda r: r.key)
    write_csv(out / REJECTS_CSV, rejects)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": run["fingerprint"],
        "source_fingerprint": src.fingerprint,
        "source": {
            "path": str(spec) if not isinstance(spec, Source) else spec.root,
            "kind": src.kind,
            "entries": len(src.keys),
        },
        "config": run["config"],
        "config_hash": config.digest(),
        "resolutions": resolutions,
        "counts": {str(r): counts[r] for r in resolutions},
        "records": len(keys),
        "record_format": record_format(config.record_format),
        "rejects": {
            "total": len(rejects),
            "by_reason": summarize(rejects),
            "csv": REJECTS_CSV,
            "items": [asdict(r) for r in rejects],
        },
        "software": software_versions(),
    }
    write_manifest(out, manifest)
    return _summary_from_manifest(out, manifest, 0.0, already_complete=False)


def _summary_from_manifest(out, manifest, elapsed, already_complete=True) -> PrepareSummary:
    return PrepareSummary(
        out_dir=str(out),
        fingerprint=manifest["fingerprint"],
        inputs=manifest["source"]["entries"],
        records=manifest["records"],
        rejected=manifest["rejects"]["total"],
        counts={int(r): c for r, c in sorted(manifest["counts"].items(), key=lambda x: int(x[0]))},
        reject_reasons=manifest["rejects"]["by_reason"],
        already_complete=already_complete,
        elapsed_s=elapsed,
    )
