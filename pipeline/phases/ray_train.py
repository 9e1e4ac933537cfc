"""The Ray Train host: a phase as one TorchTrainer job, a `PhaseSession` on every rank.

Driver side, `fit_phase` builds the TorchTrainer (workers per resolution, DDP backend,
Ray storage, restarts, the workers' environment) for a `PhaseJob` and fits it under the
phase's Ray run name, which makes Ray Train V2 resume it from its latest checkpoint in
storage. Worker side, `phase_worker` restores from Ray's latest checkpoint of this phase (a
restart after a worker failure, or a rerun after the driver died), else from the checkpoint
the driver found when Ray's record of the phase was unreadable, else from the previous
phase's final checkpoint in storage, else from scratch, and runs the session. Workers read
only the dataset and storage (both shared by every node) and talk to the driver only
through Ray: `ray.train.report` (every rank, the same images shown: it is a barrier) and
the run's mailbox (pipeline.phases.mailbox), which carries the end-of-phase evaluation: it
runs after the final report, so its metrics are not in Ray's Result.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.phases.mailbox import post, post_progress
from pipeline.phases.session import PhaseJob, PhaseSession, PhaseSink, restore_trainer
from progan.device import configure_device
from progan.trainer import GANTrainer, NonFiniteLossError

WorkerFn = Callable[[dict[str, Any]], None]
# what rank 0 sends the driver's progress display at each log point
PROGRESS_STATS = ("images_shown", "alpha", "images_per_s", "d_loss", "g_loss", "augment_p")


def ddp_wrapper(device: torch.device):
    """Wrap a module in DDP for this device (gloo on CPU, NCCL on GPU)."""

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    return wrap


def parameter_digest(module: torch.nn.Module) -> str:
    """A hash of all parameter bytes, to catch silent DDP drift between ranks."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas_equal(trainer: GANTrainer) -> None:
    """Raise if G, D or G_ema differ between ranks at the end of a phase."""
    if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
        return
    mine = tuple(parameter_digest(m) for m in (trainer.G, trainer.D, trainer.G_ema))
    everyone: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(everyone, mine)
    if any(d != everyone[0] for d in everyone):
        raise RuntimeError(f"DDP replicas diverged at the end of the phase: {everyone}")


class RayTrainSink(PhaseSink):
    """Reports to Ray Train (every rank) and tells the driver what it must know (rank 0)."""

    def __init__(self, mailbox: Any, rank: int) -> None:
        self.mailbox, self.rank = mailbox, rank

    def started(self, session: PhaseSession) -> None:
        if self.rank == 0:
            images = session.trainer.images_shown
            post(self.mailbox, "start", session.phase.index, origin=session.origin, images=images)
            post_progress(self.mailbox, session.phase.index, state="started", images_shown=images)

    def stats(self, session: PhaseSession, stats: dict[str, float]) -> None:
        if self.rank == 0:  # values already on the host: the loop read them for this point
            point = {k: stats[k] for k in PROGRESS_STATS if k in stats}
            post_progress(self.mailbox, session.phase.index, state="training", **point)

    def checkpoint(
        self, session: PhaseSession, directory: Path | None, report: dict[str, Any]
    ) -> None:
        if report["final"]:  # a divergence must fail the phase, not be its final checkpoint
            check_replicas_equal(session.trainer)
            if self.rank == 0 and session.wants_evaluation:
                shown = report["images_shown"]
                post_progress(
                    self.mailbox, session.phase.index, state="evaluating", images_shown=shown
                )
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        name = directory.name if directory else None
        metrics = {k: report[k] for k in ("images_shown", "final", "origin", "train_seconds")}
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def evaluated(self, session: PhaseSession, metrics: dict[str, float]) -> None:
        # after the final report, whose metrics are all Ray's Result keeps: the mailbox
        post(self.mailbox, "evaluated", session.phase.index, metrics=metrics)

    def evaluation_failed(self, session: PhaseSession, error: Exception) -> None:
        post(self.mailbox, "evaluation-failed", session.phase.index, error=session.evaluation_error)

    def failed(self, session: PhaseSession, error: BaseException) -> None:
        if self.rank == 0 and isinstance(error, NonFiniteLossError):
            post(self.mailbox, "nonfinite", session.phase.index, message=str(error))


def phase_worker(config: dict[str, Any]) -> None:
    """Train one phase (`config["job"]`, a PhaseJob); runs on every Ray Train worker."""
    from pipeline.phases.mlflow_sink import (
        MlflowPhaseSink,
        finish_system_metrics,
        start_system_metrics,
    )

    job: PhaseJob = config["job"]
    cfg, ctx = job.cfg, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = configure_device(ray.train.torch.get_device())
    wrap = ddp_wrapper(device) if world > 1 else None
    trainer = GANTrainer(cfg.gan, device, rank, world, wrap=wrap, plan=cfg.plan)
    origin = restore_trainer(
        trainer,
        [
            ("ray-checkpoint", ray.train.get_checkpoint()),
            ("storage-checkpoint", job.resume_checkpoint),
            ("previous-phase", job.init_checkpoint),
        ],
    ).origin
    sinks: list[PhaseSink] = [RayTrainSink(job.mailbox, rank)]
    ids = job.tracking
    if rank == 0 and ids is not None:
        sinks.append(
            MlflowPhaseSink(
                ids,
                eval_roles=("phase",),  # the driver logs the metrics to the parent run
                on_failing=lambda e: post(
                    job.mailbox, "tracking-failing", job.phase_index, error=e
                ),
                on_undelivered=lambda what: post(job.mailbox, "tracking", job.phase_index, **what),
            )
        )
    monitor = None
    if ids is not None and ctx.get_local_rank() == 0:  # each node's first rank: the node
        several = ctx.get_world_size() > ctx.get_local_world_size()
        node = f"node{ctx.get_node_rank()}" if several else None
        interval = cfg.tracking.system_metrics_interval_s
        monitor = start_system_metrics(ids.uri, ids.phase_run_id, interval, node)
    try:
        PhaseSession(job, trainer, sinks, origin).run()
    except NonFiniteLossError:
        # every rank sees it at the same step (the check is collective): end the phase
        # without a restart, which would only reach the same loss again; the driver fails it
        return
    finally:
        if monitor is not None:
            finish_system_metrics(monitor)


def fit_phase(
    job: PhaseJob,
    storage: str,
    ray_name: str,
    env: dict[str, str],
    worker_fn: WorkerFn | None = None,
):
    """One Ray Train TorchTrainer job for a phase; returns Ray's Result. `worker_fn`
    replaces the per-rank function (tests wrap `phase_worker` to inject faults)."""
    import ray
    from ray.train.torch import TorchConfig, TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            """Ctrl-C during a fit: Ray Train V2's own handler aborts the controller and
            then exits the process in varying ways (exit 0, exit 1, an actor error). This
            one aborts it too and raises KeyboardInterrupt, so the driver marks its runs
            KILLED and the CLI exits 130 with a resume hint."""
            import signal

            def on_sigint(signum: int, frame: object) -> None:
                with contextlib.suppress(Exception):
                    ray.get(controller.abort.remote(), timeout=30)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    cfg, s = job.cfg, job.cfg.scaling
    trainer = Trainer(
        worker_fn or phase_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.workers_for(job.phase.resolution),  # each phase its own count
            use_gpu=s.use_gpu,
            resources_per_worker=s.worker_resources,
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
