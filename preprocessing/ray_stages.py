"""The prepare pipeline on Ray Data: one row per shard, workers read and write themselves.

Rows start as {shard, keys, locations} (names only: the driver never reads image bytes)
and end as a small summary per shard (counts, nodes, timings): records go straight from
the worker that made them into `_progress/shard-NNNNNN.bin` (`shard_file`). The stage
shape comes from `resources.WorkerPlan`:

- CPU: `map_batches(ShardWorker)` on an actor pool of `workers` actors (1 CPU each), each
  reading, decoding, detecting, cropping and writing its shards;
- GPU: `map_batches(read_decode)` (CPU tasks) -> `map_batches(Detector)` (actor pool,
  `gpus_per_worker` GPU + 1 CPU each) -> `map_batches(crop_and_write)` (CPU tasks).

`run_pipeline` consumes the summaries with a stall timeout: when no shard finishes for
`stall_timeout_s` it raises, saying how many shards are done and what the actors asked for.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from preprocessing.config import PrepareConfig
from preprocessing.process import (
    DecodedShard,
    detect_faces,
    make_detector,
    make_records,
    read_and_decode,
)
from preprocessing.resources import WorkerPlan
from preprocessing.shard_file import write_shard
from preprocessing.sources import SourceReader


class StallError(RuntimeError):
    """No shard finished within the stall timeout."""


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _pin_threads() -> None:
    """One torch thread per CPU this worker holds (2 threads on a busy 2-core box collapse)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _decode_rows(batch: dict, reader: SourceReader, config: PrepareConfig) -> list[DecodedShard]:
    parts = []
    for shard, keys, locations in zip(
        batch["shard"], batch["keys"], batch["locations"], strict=True
    ):
        items = list(zip(list(keys), list(locations), strict=True))
        parts.append(read_and_decode(int(shard), items, reader.read, config.max_image_pixels))
    return parts


def _write(parts: list[DecodedShard], config: PrepareConfig, out_dir: str) -> dict:
    rows = {"shard": [], "records": [], "rejects": [], "nodes": [], "timings": []}
    node = _node_id()
    for part in parts:
        result = make_records(part, config)
        result.nodes = sorted({*result.nodes, node})
        write_shard(out_dir, result)
        rows["shard"].append(result.shard)
        rows["records"].append(len(result.records))
        rows["rejects"].append(len(result.rejects))
        rows["nodes"].append(json.dumps(result.nodes))
        rows["timings"].append(json.dumps(result.timings))
    return {k: np.asarray(v) for k, v in rows.items()}


def read_decode(batch: dict, reader: SourceReader, config: PrepareConfig) -> dict:
    """GPU shape, stage 1 (CPU task): read and decode each shard's images."""
    parts = _decode_rows(batch, reader, config)
    node = _node_id()
    for part in parts:
        part.nodes.append(node)
    return {"shard": np.asarray([p.shard for p in parts]), "part": _objects(parts)}


class Detector:
    """GPU shape, stage 2 (actor): one MTCNN, on this actor's GPU share."""

    def __init__(self, config: PrepareConfig) -> None:
        _pin_threads()
        self.detector = make_detector(config)
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        parts = [detect_faces(self.detector, part) for part in batch["part"]]
        for part in parts:
            part.nodes.append(self.node)
        return {"shard": batch["shard"], "part": _objects(parts)}


def crop_and_write(batch: dict, config: PrepareConfig, out_dir: str) -> dict:
    """GPU shape, stage 3 (CPU task): crop, pyramid, encode, write the shard file."""
    return _write(list(batch["part"]), config, out_dir)


class ShardWorker:
    """CPU shape: one actor doing every step of its shards (one MTCNN on CPU)."""

    def __init__(self, config: PrepareConfig, reader: SourceReader, out_dir: str) -> None:
        _pin_threads()
        self.config, self.reader, self.out_dir = config, reader, out_dir
        self.detector = make_detector(config, device="cpu")

    def __call__(self, batch: dict) -> dict:
        parts = _decode_rows(batch, self.reader, self.config)
        parts = [detect_faces(self.detector, part) for part in parts]
        return _write(parts, self.config, self.out_dir)


def build_dataset(
    rows: list[dict],
    reader: SourceReader,
    config: PrepareConfig,
    out: Path,
    plan: WorkerPlan,
    placement: dict | None = None,
):
    """The lazy Ray Dataset of one summary row per pending shard; `placement`: Ray options
    for every stage (a node affinity where `out` is one node's disk)."""
    placement = placement or {}
    import ray.data

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    if not plan.on_gpu:
        return ds.map_batches(
            ShardWorker,
            batch_size=1,
            fn_constructor_kwargs={"config": config, "reader": reader, "out_dir": str(out)},
            compute=ray.data.ActorPoolStrategy(size=plan.workers),
            num_cpus=1,
            **placement,
        )
    ds = ds.map_batches(
        read_decode,
        batch_size=1,
        fn_kwargs={"reader": reader, "config": config},
        num_cpus=1,
        **placement,
    )
    ds = ds.map_batches(
        Detector,
        batch_size=1,
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        num_cpus=1,
        num_gpus=plan.gpus_per_worker,
        **placement,
    )
    return ds.map_batches(
        crop_and_write,
        batch_size=1,
        fn_kwargs={"config": config, "out_dir": str(out)},
        num_cpus=1,
        **placement,
    )


def configure_ray_data(actor_start_timeout_s: float) -> None:
    """Quiet Ray Data (prepare draws its own progress bar) and bound the actor start wait."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = actor_start_timeout_s


def run_pipeline(
    dataset,
    total: int,
    stall_timeout_s: float,
    plan: WorkerPlan,
    on_row: Callable[[dict], None],
) -> None:
    """Execute `dataset`, calling `on_row` per finished shard; StallError when stuck."""
    rows: queue.Queue = queue.Queue()
    done_mark = object()

    def consume(it: Iterator[dict]) -> None:
        try:
            for row in it:
                rows.put(row)
            rows.put(done_mark)
        except BaseException as exc:  # handed to the waiting driver thread
            rows.put(exc)

    thread = threading.Thread(target=consume, args=(dataset.iter_rows(),), daemon=True)
    thread.start()
    finished = 0
    while True:
        try:
            item = rows.get(timeout=stall_timeout_s)
        except queue.Empty:
            ask = f"{plan.gpus_per_worker:g} GPU + 1 CPU" if plan.on_gpu else "1 CPU"
            raise StallError(
                f"no shard finished in {stall_timeout_s:g} s ({finished} of {total} done): "
                f"stuck waiting for {plan.workers} detector actor(s) of {ask} each or a hung "
                "worker; `ray status` shows pending demands, rerun to resume"
            ) from None
        if item is done_mark:
            return
        if isinstance(item, BaseException):
            raise item
        finished += 1
        on_row(item)
