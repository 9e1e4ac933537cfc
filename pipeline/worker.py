"""The Ray Train worker function: one phase of progressive training on one rank.

Each phase is its own TorchTrainer job. A worker starts from Ray's latest checkpoint of
this phase if there is one (a restart after a worker failure, or a rerun after the driver
died), else from the previous phase's final checkpoint, else from scratch. Rank 0 saves
checkpoints, sample grids and metrics; every rank calls `ray.train.report` at the same
images-shown counts (it is a barrier).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.common import evaluate_trainer
from pipeline.config import PipelineConfig
from pipeline.tracking import MetricLogger
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.loop import LoopOptions, run_phase
from progan.sampling import fixed_latents, generate, save_grid
from progan.schedule import Phase
from progan.trainer import GANTrainer

STATE_FILE = "state.pt"
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
    """Raise if G or D differ between ranks at the end of a phase."""
    if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
        return
    mine = (parameter_digest(trainer.G), parameter_digest(trainer.D))
    everyone: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(everyone, mine)
    if any(d != everyone[0] for d in everyone):
        raise RuntimeError(f"DDP replicas diverged at the end of the phase: {everyone}")


def restore(trainer: GANTrainer, init_checkpoint: str | None) -> str:
    """Load Ray's latest checkpoint of this phase, else the phase's start; say which."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(load_checkpoint(Path(d) / STATE_FILE, trainer.device))
        return "ray-checkpoint"
    if init_checkpoint:
        trainer.load_state_dict(load_checkpoint(init_checkpoint, trainer.device))
        return "previous-phase"
    return "scratch"


def phase_worker(config: dict[str, Any]) -> None:
    """Train one phase (config from `pipeline.run`); runs on every Ray Train worker."""
    cfg = PipelineConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    trainer = GANTrainer(
        cfg.gan, device, rank, world, wrap=ddp_wrapper(device) if world > 1 else None
    )
    origin = restore(trainer, config.get("init_checkpoint"))
    phase = trainer.plan[config["phase_index"]]
    if trainer.images_shown < phase.start_images:
        raise RuntimeError(
            f"phase {phase.name} starts at {phase.start_images} images but the checkpoint "
            f"({origin}) is at {trainer.images_shown}"
        )
    dataset = LmdbImageDataset(cfg.data.dataset, phase.resolution)
    run_dir = Path(config["run_dir"])
    logger = (
        MetricLogger(config["tracking_uri"], config["child_run_id"], run_dir) if rank == 0 else None
    )
    latents = fixed_latents(cfg.run.sample_grid, cfg.model.latent_size, seed=cfg.train.seed)
    fail_at = config.get("fail_at_images")  # test hook: this rank dies once at that count
    fail_marker = run_dir / f".failed-once-{phase.index}"
    history: list[dict[str, float]] = []
    started = time.perf_counter()

    def on_stats(stats: dict[str, float]) -> None:
        step = int(stats["images_shown"])
        history.append({k: stats[k] for k in ("images_shown", *LOGGED_STATS) if k in stats})
        if logger:
            logger.log({k: v for k, v in stats.items() if k in LOGGED_STATS}, step)
        if fail_at and rank == world - 1 and step >= fail_at and not fail_marker.exists():
            fail_marker.touch()
            os._exit(1)  # simulate a crashed worker process

    def on_checkpoint(trainer: GANTrainer, stats: dict[str, float], final: bool) -> None:
        shown = trainer.images_shown
        metrics = {"images_shown": shown, "final": final, "origin": origin}
        metrics["train_seconds"] = time.perf_counter() - started
        if final and rank == 0 and cfg.eval.enabled and cfg.eval.metrics:
            # before the report, so that the driver (and Tune) get the numbers
            results = evaluate_trainer(cfg, trainer, phase, run_dir.parent / "metrics-cache")
            logger.log(results, shown)
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
                logger.log_artifact(grid, "samples")
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"images-{shown:09d}"
            )

    options = LoopOptions(
        log_every_images=max(1, round(cfg.run.log_every_kimg * 1000)),
        checkpoint_every_images=max(1, round(cfg.run.checkpoint_every_kimg * 1000)),
        num_workers=cfg.data.loader_workers,
    )
    run_phase(trainer, dataset, phase, options, on_stats, on_checkpoint)
    check_replicas_equal(trainer)
    if rank == 0:
        finish_phase(cfg, trainer, history, run_dir, logger)


def finish_phase(
    cfg: PipelineConfig,
    trainer: GANTrainer,
    history: list[dict[str, float]],
    run_dir: Path,
    logger: MetricLogger,
) -> None:
    """Rank 0 after the phase: loss-curve plot, final flush of the metric logger."""
    from pipeline.plots import plot_phase_curves

    with tempfile.TemporaryDirectory() as tmp:
        if history:
            logger.log_artifact(plot_phase_curves(history, Path(tmp) / "losses.png"), "plots")
        logger.close()


def view_of(trainer: GANTrainer, phase: Phase, final: bool) -> tuple[int, float]:
    """(level, alpha) to render G_ema at: the schedule's now, or the phase's own resolution
    fully faded in at its end (the schedule's point there already belongs to the next phase)."""
    if final:
        return phase.level, 1.0
    point = trainer.point
    return point.level, point.alpha
