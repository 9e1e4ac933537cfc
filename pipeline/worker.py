"""The Ray Train worker function: one phase of progressive training on one rank.

Each phase is its own TorchTrainer job. A worker starts from Ray's latest checkpoint of
this phase if there is one (a restart after a worker failure, or a rerun after the driver
died), else from the previous phase's final checkpoint in storage, else from scratch. It
reads only the dataset and storage (both shared by every node) and talks to the driver only
through Ray: reports, and the run's mailbox (pipeline.mailbox). Rank 0 saves checkpoints,
sample grids and metrics; every rank calls `ray.train.report` at the same images-shown
counts (it is a barrier).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.common import evaluate_trainer, loop_options
from pipeline.config import PipelineConfig
from pipeline.mailbox import post
from pipeline.metric_logger import MetricLogger
from pipeline.storage import STATE_FILE, load_training_state
from pipeline.tracking import fail_fast_http
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import save_checkpoint
from progan.device import configure_device
from progan.loop import run_phase
from progan.sampling import fixed_latents, generate, save_grid
from progan.schedule import Phase
from progan.trainer import GANTrainer, NonFiniteLossError

log = logging.getLogger(__name__)
LOGGED_STATS = ("d_loss", "g_loss", "gp", "d_real", "d_fake", "alpha", "lr", "images_per_s")


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


def restore(trainer: GANTrainer, init_checkpoint: str | None) -> str:
    """Load Ray's latest checkpoint of this phase, else the phase's start; say which.

    States load to CPU and `load_state_dict` places them on the trainer's device.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        trainer.load_state_dict(load_training_state(checkpoint))
        return "ray-checkpoint"
    if init_checkpoint:
        trainer.load_state_dict(load_training_state(init_checkpoint))
        return "previous-phase"
    return "scratch"


def phase_worker(config: dict[str, Any]) -> None:
    """Train one phase (config from `pipeline.run`); runs on every Ray Train worker."""
    cfg = PipelineConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = configure_device(ray.train.torch.get_device())
    trainer = GANTrainer(
        cfg.gan, device, rank, world, wrap=ddp_wrapper(device) if world > 1 else None
    )
    origin = restore(trainer, config.get("init_checkpoint"))
    phase = trainer.plan[config["phase_index"]]
    mailbox = config.get("mailbox")
    if trainer.images_shown < phase.start_images:
        raise RuntimeError(
            f"phase {phase.name} starts at {phase.start_images} images but the checkpoint "
            f"({origin}) is at {trainer.images_shown}"
        )
    logger = None
    if rank == 0:
        post(mailbox, "start", phase.index, origin=origin, images=trainer.images_shown)
        runs = {"phase": config["child_run_id"], "run": config["parent_run_id"]}
        logger = MetricLogger(config["tracking_uri"], runs)
        if origin == "ray-checkpoint":  # a restart: the steps after it may be logged already
            logger.skip_logged("d_loss", trainer.images_shown)
    monitor = start_system_metrics(config, ctx)
    dataset = LmdbImageDataset(cfg.data.dataset, phase.resolution)
    latents = fixed_latents(cfg.run.sample_grid, cfg.model.latent_size, seed=cfg.train.seed)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    told_driver = False  # of failing MLflow logging, once a phase

    def on_stats(stats: dict[str, float]) -> None:
        nonlocal told_driver
        history.append({k: stats[k] for k in ("images_shown", *LOGGED_STATS) if k in stats})
        if logger:
            logged = {k: v for k, v in stats.items() if k in LOGGED_STATS}
            logger.log({**logged, "resolution": phase.resolution}, stats["images_shown"])
            if logger.first_error and not told_driver:
                post(mailbox, "tracking-failing", phase.index, error=logger.first_error)
                told_driver = True

    def on_checkpoint(trainer: GANTrainer, stats: dict[str, float], final: bool) -> None:
        shown = trainer.images_shown
        metrics = {"images_shown": shown, "final": final, "origin": origin}
        metrics["train_seconds"] = time.perf_counter() - started
        if final and rank == 0 and cfg.eval.enabled and cfg.eval.metrics:
            # before the report, so that the driver (and Tune) get the numbers; real
            # statistics are cached beside the dataset, which every node sees
            results = evaluate_trainer(cfg, trainer, phase, None)
            logger.log(results, shown, to=("phase",))  # the driver logs them to the run
            metrics["eval"] = results
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(trainer.state_dict(), Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                level, alpha = view_of(trainer, phase, final)
                grid = save_grid(
                    generate(trainer.G_ema, latents, level, alpha),
                    Path(tmp) / "samples" / f"{shown:09d}.png",
                )
                logger.log_image(grid, "samples", shown, role="run")  # the image slider
                if final:
                    finish_logging(logger, history, tmp, mailbox, phase)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"images-{shown:09d}"
            )

    options = loop_options(cfg)
    try:
        run_phase(trainer, dataset, phase, options, on_stats, on_checkpoint)
    except NonFiniteLossError as err:
        # every rank sees it at the same step (the check is collective): end the phase
        # without a restart, which would only reach the same loss again
        if rank == 0:
            post(mailbox, "nonfinite", phase.index, message=str(err))
            if logger:
                logger.close()
        return
    finally:
        if monitor is not None:
            monitor.finish()
    check_replicas_equal(trainer)


def finish_logging(
    logger: MetricLogger,
    history: list[dict[str, float]],
    tmp: str,
    mailbox: Any,
    phase: Phase,
) -> None:
    """Rank 0 at the phase end: loss-curve plot, final flush; what MLflow did not get goes
    to the driver."""
    from pipeline.plots import plot_phase_curves

    if history:
        plot = plot_phase_curves(history, Path(tmp) / "losses.png")
        logger.log_artifact(plot, "plots", role="phase")
    undelivered = logger.close()
    if undelivered:
        post(mailbox, "tracking", phase.index, **undelivered)


def start_system_metrics(config: dict[str, Any], ctx: Any):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU utilisation and
    memory where pynvml sees GPUs) on the phase run, from the first rank of each node (it
    reports the whole node); metric names carry the node rank when there are several nodes.
    The sampling interval is MLflow's ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, default
    here `tracking.system_metrics_interval_s`). None where it is switched off or failed."""
    interval = config.get("system_metrics_interval_s")
    if not interval or ctx.get_local_rank() != 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        node = ctx.get_node_rank()
        several = ctx.get_world_size() > ctx.get_local_world_size()
        with fail_fast_http():  # it reads the run: a server that is away must not stall us
            monitor = SystemMetricsMonitor(
                config["child_run_id"],
                sampling_interval=interval,
                resume_logging=True,
                node_id=f"node{node}" if several else None,
                tracking_uri=config["tracking_uri"],
            )
        monitor.start()
        return monitor
    except Exception as err:  # e.g. psutil missing: training goes on without them
        log.warning("no system metrics: %s", err)
        return None


def view_of(trainer: GANTrainer, phase: Phase, final: bool) -> tuple[int, float]:
    """(level, alpha) to render G_ema at: the schedule's now, or the phase's own resolution
    fully faded in at its end (the schedule's point there already belongs to the next phase)."""
    if final:
        return phase.level, 1.0
    point = trainer.point
    return point.level, point.alpha
