"""Where a prepare run's shards run, and its other waits on the cluster.

`run_shards` executes the pending shards on Ray Data (`ray_stages`) with a progress bar;
`run_in_process` prepares a one-shard source in the calling process without Ray (starting
Ray, its workers and the merge tasks would cost more than the whole shard); `list_remotely`
lists a source only the cluster's nodes can see; `merge` builds the LMDBs from the shard
files. Every wait is bounded and its timeout names what is stuck.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preprocessing.config import PrepareConfig, PrepareError
from preprocessing.sources import Source, SourceError, open_source


def shards_of(keys: list[str], size: int) -> list[list[str]]:
    """The sorted keys cut into consecutive shards of `size` (the last may be shorter)."""
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def list_remotely(spec: str, timeout_s: float) -> Source:
    """List a source the driver cannot see, in a 1-CPU task on the cluster."""
    import ray

    def list_source(path: str) -> Source | SourceError:
        try:
            return open_source(path)
        except SourceError as exc:
            return exc

    ref = ray.remote(num_cpus=1)(list_source).remote(spec)
    try:
        result = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise PrepareError(
            f"listing {spec} on the cluster did not finish in {timeout_s:g} s (no node with a "
            "free CPU, or a very slow filesystem)"
        ) from None
    if isinstance(result, SourceError):
        raise result
    return result


def _get_all(refs: dict, timeout_s: float, what: str) -> dict:
    """ray.get every ref of {name: ref} within timeout_s; names the ones still running."""
    import ray

    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if pending:
        stuck = [name for name, ref in refs.items() if ref in pending]
        for ref in pending:
            ray.cancel(ref, force=True)
        raise PrepareError(f"{what} did not finish in {timeout_s:g} s: {stuck}")
    return {name: ray.get(ref) for name, ref in refs.items()}


def merge(
    out: Path,
    shards: int,
    resolutions: list[int],
    timeout_s: float,
    in_process: bool,
    pinned: bool = False,
) -> dict[int, int]:
    """Merge shard files into the LMDBs: one 1-CPU task per resolution, in parallel (in
    this process when `in_process`; on this node when `pinned`)."""
    from preprocessing.merge import merge_resolution

    if in_process:
        return {r: merge_resolution(str(out), shards, r, r == resolutions[0]) for r in resolutions}
    import ray

    task = ray.remote(num_cpus=1, max_retries=1)(merge_resolution).options(**this_node(pinned))
    refs = {res: task.remote(str(out), shards, res, res == resolutions[0]) for res in resolutions}
    return _get_all(refs, timeout_s, "merging the shard files into res-NNNN")


def run_shards(out, src, config, pending, plan, timeout_s, progress, pinned=False) -> dict:
    """Run the pending shards on Ray Data (on this node only when `pinned`); returns nodes
    used and summed stage timings."""
    from preprocessing.ray_stages import (
        StallError,
        build_dataset,
        configure_ray_data,
        run_pipeline,
    )

    configure_ray_data(timeout_s)
    rows = [
        {"shard": i, "keys": keys, "locations": [src.location(k) for k in keys]}
        for i, keys in pending
    ]
    dataset = build_dataset(rows, src.reader(), config, out, plan, this_node(pinned))
    done = len(src.keys) - sum(len(k) for _, k in pending)
    bar = _progress_bar(len(src.keys), done, progress)
    sizes = dict(pending)
    stats: dict = {"nodes": set(), "timings": {}, "faces": 0, "rejected": 0}

    def on_row(row: dict) -> None:
        stats["nodes"].update(json.loads(row["nodes"]))
        for stage, seconds in json.loads(row["timings"]).items():
            stats["timings"][stage] = stats["timings"].get(stage, 0.0) + seconds
        stats["faces"] += int(row["records"])
        stats["rejected"] += int(row["rejects"])
        if bar is not None:
            bar.set_postfix(faces=stats["faces"], rejected=stats["rejected"], refresh=False)
            bar.update(len(sizes[int(row["shard"])]))

    try:
        run_pipeline(dataset, len(pending), timeout_s, plan, on_row)
    except StallError as exc:
        raise PrepareError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    return stats


def run_in_process(out: Path, src: Source, config: PrepareConfig, pending: list) -> dict:
    """A source of one shard, prepared locally: in this process, without Ray (starting Ray,
    its workers and the merge tasks would cost more than the whole shard)."""
    from preprocessing.process import ShardProcessor
    from preprocessing.shard_file import write_shard

    [(shard, keys)] = pending
    items = [(k, src.location(k)) for k in keys]
    result = ShardProcessor(config).run(shard, items, src.reader().read)
    result.nodes = ["in-process"]
    write_shard(out, result)
    return {"nodes": set(result.nodes), "timings": result.timings}


# Called after `ensure_ray` connects this process (pipeline.run_logs routes Ray's worker
# output into the run folder from there).
AFTER_RAY_INIT: list[Callable[[], None]] = []


def ensure_ray(address: str | None = None, **init: Any) -> bool:
    """The project's one way to start or join Ray: join `address` (None: $RAY_ADDRESS, else
    a new local Ray) unless this process is connected already; True if connected here.
    `init` goes to `ray.init` (a runtime env, log settings)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, **init)
    for hook in list(AFTER_RAY_INIT):
        hook()
    return True


def alive_node_resources(this_node_only: bool = False) -> list[dict[str, float]]:
    """The resources of every alive node (or only of the node this process runs on)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return [n["Resources"] for n in nodes if not this_node_only or n["NodeID"] == here]


def this_node(pinned: bool) -> dict:
    """Ray options that keep a task or actor on this process's node (when `pinned`)."""
    if not pinned:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="prepare", dynamic_ncols=True)
