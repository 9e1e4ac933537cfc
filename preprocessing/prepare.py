"""`prepare_dataset`: the Ray fan-out that turns a source into a finished dataset directory.

The source is cut into fixed shards of `shard_size` keys (sorted order). The driver reads
each shard's bytes and hands them to a Ray actor (one MTCNN each, fractional GPU when the
cluster has GPUs); results come back to the driver, the only writer, which puts them into
the LMDBs and then marks the shard done in `_progress/`. Because puts are keyed and
shards fixed, a run killed at any point and rerun redoes only unfinished shards and ends
with exactly the records of an uninterrupted run. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preprocessing.config import PrepareConfig, make_config
from preprocessing.lmdb_store import (
    MANIFEST,
    LmdbWriter,
    read_manifest,
    resolution_dir,
    write_json_atomic,
    write_manifest,
)
from preprocessing.process import ShardProcessor, ShardResult
from preprocessing.pyramid import resolutions_down_to_4
from preprocessing.rejects import Reject, summarize, write_csv
from preprocessing.sources import Source, open_source

PROGRESS = "_progress"
REJECTS_CSV = "rejects.csv"
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """The run cannot go ahead (output holds something else, config or source changed)."""


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


def _owned_paths(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name in (MANIFEST, REJECTS_CSV, PROGRESS)] + sorted(
        out.glob("res-*")
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
    elif any(out.iterdir()) and not force:
        raise PrepareError(f"{out} is not empty and is not a prepared dataset; refusing to write")
    if force:
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


def _shards(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _read_items(source: Source, keys: list[str]) -> list[tuple[str, bytes | Reject]]:
    items: list[tuple[str, bytes | Reject]] = []
    for key in keys:
        try:
            items.append((key, source.read(key)))
        except (OSError, KeyError) as exc:
            items.append((key, Reject(key, "unreadable", f"{type(exc).__name__}: {exc}")))
    return items


def _shard_file(out: Path, shard: int) -> Path:
    return out / PROGRESS / f"shard-{shard:06d}.json"


def _ray_actor_class():
    import ray

    @ray.remote(max_restarts=2, max_task_retries=2)
    class ShardWorker:
        """A Ray actor holding one ShardProcessor (one MTCNN)."""

        def __init__(self, config: PrepareConfig) -> None:
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
            self.processor = ShardProcessor(config)
            self.node_id = ray.get_runtime_context().get_node_id()

        def run(self, shard: int, items: list) -> ShardResult:
            result = self.processor.run(shard, items)
            result.node_id = self.node_id
            return result

    return ShardWorker


def _run_shards(
    source: Source,
    config: PrepareConfig,
    out: Path,
    pending: list[tuple[int, list[str]]],
    workers: int | None,
    address: str | None,
    on_result: Callable[[ShardResult, int], None],
) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        n = max(1, min(workers or cpus, cpus, len(pending)))
        gpus = resources.get("GPU", 0)
        options = {"num_cpus": 1}
        if gpus:
            options["num_gpus"] = min(1.0, gpus / n)
        actor_cls = _ray_actor_class()
        actors = [actor_cls.options(**options).remote(config) for _ in range(n)]
        queue = list(pending)
        in_flight: dict = {}
        idle = list(actors) * 2  # two shards per actor: one running, one queued

        while queue or in_flight:
            while queue and idle:
                shard, keys = queue.pop(0)
                actor = idle.pop(0)
                ref = actor.run.remote(shard, _read_items(source, keys))
                in_flight[ref] = (actor, len(keys))
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, n_items = in_flight.pop(done[0])
            idle.append(actor)
            on_result(ray.get(done[0]), n_items)
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def prepare_dataset(
    source: str | os.PathLike | Source,
    out_dir: str | os.PathLike,
    resolution: int,
    *,
    workers: int | None = None,
    detector: str = "mtcnn",
    force: bool = False,
    address: str | None = None,
    progress: bool = False,
    **options,
) -> PrepareSummary:
    """Prepare (or resume, or confirm) the dataset for `source` in `out_dir`.

    `options` are further PrepareConfig fields (crop, margin, min_face_size, min_prob,
    multi_face, record_format, shard_size, limit, ...). Uses the running Ray if there is
    one, else starts one (`address` to join a cluster). Raises ConfigError for bad values,
    SourceError for an unusable source and PrepareError when `out_dir` holds another dataset.
    """
    t_start = time.perf_counter()
    config = make_config(resolution=resolution, detector=detector, **options)
    src = open_source(source).limited(config.limit)
    out = Path(out_dir)
    resolutions = resolutions_down_to_4(config.resolution)
    run = {
        "fingerprint": dataset_fingerprint(src, config),
        "source_fingerprint": src.fingerprint,
        "config": config.model_dump(mode="json"),
    }
    previous = _check_output(out, run, src, config, force)
    if previous is not None and (out / MANIFEST).is_file():
        return _summary_from_manifest(out, previous, time.perf_counter() - t_start)

    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PROGRESS / "run.json", run, sort_keys=True)
    shards = _shards(src.keys, config.shard_size)
    pending = [(i, keys) for i, keys in enumerate(shards) if not _shard_file(out, i).is_file()]

    writer = LmdbWriter(out, resolutions)
    nodes: set[str] = set()
    timings: dict[str, float] = {}
    bar = _progress_bar(len(src.keys), len(src.keys) - sum(len(k) for _, k in pending), progress)
    faces = rejected = 0

    def on_result(result: ShardResult, n_items: int) -> None:
        nonlocal faces, rejected
        writer.put(result.records)
        write_json_atomic(
            _shard_file(out, result.shard),
            {
                "keys": [k for k, _ in result.records],
                "rejects": [asdict(r) for r in result.rejects],
            },
            sort_keys=True,
        )
        nodes.add(result.node_id)
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        faces += len(result.records)
        rejected += len(result.rejects)
        if bar is not None:
            bar.set_postfix(faces=faces, rejected=rejected, refresh=False)
            bar.update(n_items)

    try:
        if pending:
            _run_shards(src, config, out, pending, workers, address, on_result)
    finally:
        if bar is not None:
            bar.close()
    counts = writer.counts()
    writer.close()

    summary = _finalize(out, src, source, config, run, resolutions, counts)
    summary.resumed_shards = len(shards) - len(pending)
    summary.processed_shards = len(pending)
    summary.elapsed_s = time.perf_counter() - t_start
    summary.nodes = sorted(nodes)
    summary.timings = timings
    return summary


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="prepare", dynamic_ncols=True)


def _finalize(out, src, spec, config, run, resolutions, counts) -> PrepareSummary:
    """Check the LMDBs against the shard logs, write rejects.csv and the manifest."""
    keys: list[str] = []
    rejects: list[Reject] = []
    for shard in range(len(_shards(src.keys, config.shard_size))):
        data = json.loads(_shard_file(out, shard).read_text(encoding="utf-8"))
        keys.extend(data["keys"])
        rejects.extend(Reject(**r) for r in data["rejects"])
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
        "record_format": {
            "encoding": config.record_format,
            "layout": "RGB uint8, channel-major [3, H, W]",
            "key_order": "bytewise; record i is the i-th key",
        },
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
