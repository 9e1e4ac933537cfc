"""The loop of one phase: feed batches to a GANTrainer until the phase's images are shown.

Shared by every way of training: the Ray Train worker (pipeline), `progan train-local`
and tests. Side effects (logging, checkpoints, reporting to Ray) come in as callbacks, so
this stays plain PyTorch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from progan.data import PositionSampler, gathered_batches, level_bytes, load_level
from progan.schedule import Phase
from progan.trainer import GANTrainer

StatsCallback = Callable[[dict[str, float]], None]
CheckpointCallback = Callable[[GANTrainer, dict[str, float], bool], None]
StepCallback = Callable[[GANTrainer], None]


@dataclass
class LoopOptions:
    """How often to report stats and to checkpoint, counted in images shown."""

    log_every_images: int = 1000
    checkpoint_every_images: int = 10_000
    num_workers: int = 0
    stop_at_images: int | None = None  # stop early (tests, time-boxed runs)
    preload_bytes: int = 0  # a level up to this size is loaded once onto the device


def phase_sampler(dataset: Dataset, phase: Phase, trainer: GANTrainer) -> PositionSampler:
    """The data order of `phase` on this rank, continuing from the trainer's images shown."""
    return PositionSampler(
        len(dataset),
        phase.batch_size,
        start_images=trainer.images_shown,
        rank=trainer.rank,
        world_size=trainer.world_size,
        seed=trainer.cfg.train.seed,
    )


def make_loader(
    dataset: Dataset, phase: Phase, trainer: GANTrainer, num_workers: int = 0
) -> DataLoader:
    """A DataLoader whose order continues exactly from the trainer's images shown."""
    return DataLoader(
        dataset,
        batch_sampler=phase_sampler(dataset, phase, trainer),
        num_workers=num_workers,
        pin_memory=trainer.device.type == "cuda",
        persistent_workers=False,
    )


def phase_batches(
    dataset: Dataset, phase: Phase, trainer: GANTrainer, options: LoopOptions
) -> Iterator[torch.Tensor]:
    """This rank's batches of `phase` in `PositionSampler` order, from the trainer's position.

    A level of at most `options.preload_bytes` is read once onto the training device (GPU
    memory, or RAM on a CPU) and batches are gathered there; a larger one streams through
    a DataLoader. Both give the same batches.
    """
    if options.preload_bytes and level_bytes(dataset) <= options.preload_bytes:
        images = load_level(dataset, trainer.device, options.num_workers)
        return gathered_batches(images, phase_sampler(dataset, phase, trainer))
    return iter(make_loader(dataset, phase, trainer, options.num_workers))


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


def run_phase(
    trainer: GANTrainer,
    dataset: Dataset,
    phase: Phase,
    options: LoopOptions | None = None,
    on_stats: StatsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Train until `phase.end_images` (or options.stop_at_images); return the last stats.

    `on_stats(stats)` runs every `log_every_images` with images/s added; `on_checkpoint(
    trainer, stats, final)` runs every `checkpoint_every_images` and once at the end;
    `on_step(trainer)` after every step (it must not read device values). Stats are read
    from the device only at log and checkpoint points: a NaN/inf loss raises
    NonFiniteLossError at the first of them after it, before any checkpoint is written.
    """
    options = options or LoopOptions()
    end = phase.end_images
    if options.stop_at_images is not None:
        end = min(end, options.stop_at_images)
    stats: dict[str, float] = {}
    if trainer.images_shown >= end:
        return stats
    batches = phase_batches(dataset, phase, trainer, options)
    n_critic = trainer.cfg.train.n_critic
    clock, clock_images = time.perf_counter(), trainer.images_shown
    while trainer.images_shown < end:
        before = trainer.images_shown
        trainer.step([next(batches) for _ in range(n_critic)])
        after = trainer.images_shown
        log_now = crossed(before, after, options.log_every_images) or after >= end
        checkpoint_now = after < end and crossed(before, after, options.checkpoint_every_images)
        if log_now or checkpoint_now:
            stats = trainer.read_stats()  # the only host sync; raises on a NaN/inf loss
        if on_stats and log_now:
            now = time.perf_counter()
            stats["images_per_s"] = (after - clock_images) / max(now - clock, 1e-9)
            clock, clock_images = now, after
            on_stats(stats)
        if on_checkpoint and checkpoint_now:
            on_checkpoint(trainer, stats, False)
        if on_step:
            on_step(trainer)
    if on_checkpoint:
        on_checkpoint(trainer, stats, True)
    return stats
