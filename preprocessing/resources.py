"""How many MTCNN workers, with what, on this Ray cluster: checked before anything starts.

`plan_workers` turns the user's `workers` / `gpus_per_worker` and the cluster's alive nodes
into a `WorkerPlan`, or raises `ResourceError` with one line saying what cannot be
scheduled. Two shapes:

- CPU detection (`gpus_per_worker == 0`): each worker is one actor with 1 CPU that reads,
  decodes, detects, crops and writes its shards (on CPU, MTCNN is ~95 % of the work; CPU
  stages in separate tasks would compete with the actors for the same cores, and an actor
  pool holding every CPU would starve them).
- GPU detection: reading+decoding and crop+pyramid+write run as CPU tasks, MTCNN as an
  actor pool with `gpus_per_worker` of a GPU (fractional or whole) and 1 CPU each; at least
  one CPU must be left for the CPU stages.
"""

from __future__ import annotations

from dataclasses import dataclass


class ResourceError(RuntimeError):
    """The requested workers cannot be scheduled on this cluster (one-line message)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What the Ray Data pipeline asks for."""

    workers: int  # MTCNN actors
    gpus_per_worker: float  # 0: detect on CPU (fused stages)

    @property
    def on_gpu(self) -> bool:
        """True when the detector actors hold GPUs (separate CPU stages)."""
        return self.gpus_per_worker > 0


def _totals(nodes: list[dict[str, float]], name: str) -> tuple[float, float]:
    values = [float(n.get(name, 0.0)) for n in nodes]
    return sum(values), max(values, default=0.0)


def plan_workers(
    nodes: list[dict[str, float]],
    workers: int | None,
    gpus_per_worker: float | None,
    shards: int | None = None,
) -> WorkerPlan:
    """Check the request against the alive nodes' resources (`ray.nodes()` "Resources").

    `workers=None`: every CPU (CPU detection) or every CPU but one (GPU detection).
    `gpus_per_worker=None`: GPUs / workers (at most 1) when the cluster has GPUs, else 0.
    `shards` caps the worker count (more actors than shards would idle).
    """
    cpus, max_cpus = _totals(nodes, "CPU")
    gpus, max_gpus = _totals(nodes, "GPU")
    where = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node(s)"
    if workers is not None and workers < 1:
        raise ResourceError(f"workers: must be at least 1 (got {workers})")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ResourceError(f"gpus_per_worker: must be >= 0 (got {gpus_per_worker})")
    if gpus_per_worker and gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
        raise ResourceError(
            f"gpus_per_worker: a fraction of one GPU or a whole number (got {gpus_per_worker})"
        )
    if gpus_per_worker and not gpus:
        raise ResourceError(
            f"gpus_per_worker: {gpus_per_worker:g} asks for GPUs but {where}; leave it unset "
            "to detect on CPUs"
        )
    use_gpu = bool(gpus_per_worker) if gpus_per_worker is not None else gpus > 0
    cpu_stage = 1 if use_gpu else 0  # CPU left for the decode/crop tasks
    if max_cpus < 1 or cpus < 1 + cpu_stage:
        need = "2 CPUs (1 per detector actor, 1 for the CPU stages)" if use_gpu else "1 CPU"
        raise ResourceError(f"prepare needs at least {need} but {where}")
    n = workers if workers is not None else int(cpus) - cpu_stage
    if shards is not None:
        n = max(1, min(n, shards))
    if n + cpu_stage > cpus:
        extra = " plus 1 for the CPU stages" if use_gpu else ""
        raise ResourceError(
            f"workers: {n} need {n} CPUs (1 each){extra} but {where}; use --workers "
            f"{int(cpus) - cpu_stage} or fewer"
        )
    if not use_gpu:
        return WorkerPlan(n, 0.0)
    per = gpus_per_worker if gpus_per_worker is not None else min(1.0, gpus / n)
    if per > max_gpus:
        raise ResourceError(
            f"gpus_per_worker: {per:g} does not fit on any one node (largest has {max_gpus:g})"
        )
    if n * per > gpus + 1e-9:
        raise ResourceError(
            f"workers x gpus_per_worker = {n} x {per:g} = {n * per:g} GPUs but {where}"
        )
    return WorkerPlan(n, per)
