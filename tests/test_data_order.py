"""Data order is a function of images shown: resumable anywhere, full disjoint rank shares."""

import pytest
import torch

from progan.data import PositionSampler
from progan.loop import LoopOptions, phase_batches, run_phase
from progan.trainer import GANTrainer
from tests.helpers import TensorImages, tiny_config, torch_threads


def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_resumed_sampler_continues_the_same_stream():
    full = take(PositionSampler(10, 4, seed=1), 6)
    resumed = take(PositionSampler(10, 4, start_images=12, seed=1), 3)
    assert resumed == full[3:]
    assert all(len(b) == 4 for b in full)  # batches stay full across epoch ends


def test_ranks_split_each_global_batch_without_overlap():
    ranks = [take(PositionSampler(100, 8, rank=r, world_size=2, seed=0), 5) for r in (0, 1)]
    single = take(PositionSampler(100, 8, seed=0), 5)
    for step in range(5):
        assert ranks[0][step] + ranks[1][step] == single[step]
    epoch = [i for b in take(PositionSampler(12, 4, seed=2), 3) for i in b]
    assert sorted(epoch) == list(range(12))  # each epoch is a permutation


def per_sample_loop(sampler: PositionSampler, images_shown: int) -> list[int]:
    """The original (reference) definition: one position of the stream at a time."""
    first = images_shown + sampler.rank * sampler.local
    return [
        int(sampler._permutation(k // sampler.n)[k % sampler.n])
        for k in range(first, first + sampler.local)
    ]


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 1), (3, 8, 2), (37, 16, 4), (64, 8, 1)])
def test_vectorised_indices_equal_the_per_sample_loop(n, batch, world):
    """Batches that straddle one epoch end, or several (a dataset smaller than a batch)."""
    for rank in range(world):
        sampler = PositionSampler(n, batch, rank=rank, world_size=world, seed=5)
        for shown in range(0, 6 * max(n, batch), batch):
            assert sampler.indices_at(shown) == per_sample_loop(sampler, shown), (rank, shown)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_preloaded_level_gives_the_loaders_batches_and_the_same_training(rank):
    g = torch.Generator().manual_seed(0)
    dataset = TensorImages(torch.randint(0, 256, (12, 3, 4, 4), generator=g, dtype=torch.uint8))
    trainer = GANTrainer(tiny_config(), rank=rank, world_size=2)
    trainer.images_shown = 24  # resumed mid-phase: the order continues from here
    phase = trainer.plan[0]
    streamed = phase_batches(dataset, phase, trainer, LoopOptions())
    preloaded = phase_batches(dataset, phase, trainer, LoopOptions(preload_bytes=12 * 48))
    too_big = phase_batches(dataset, phase, trainer, LoopOptions(preload_bytes=12 * 48 - 1))
    assert isinstance(too_big, type(streamed)) and not isinstance(preloaded, type(streamed))
    for _ in range(7):  # across epoch ends (12 images, 4 per rank and step)
        assert torch.equal(next(preloaded), next(streamed))


def test_training_on_a_preloaded_level_equals_training_on_the_loader():
    g = torch.Generator().manual_seed(1)
    dataset = TensorImages(torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8))
    with torch_threads(1):
        trainers = [GANTrainer(tiny_config()) for _ in range(2)]
        for trainer, budget in zip(trainers, (0, 10**6), strict=True):
            options = LoopOptions(stop_at_images=40, preload_bytes=budget)
            run_phase(trainer, dataset, trainer.plan[0], options)
    for a, b in zip(trainers[0].D.parameters(), trainers[1].D.parameters(), strict=True):
        assert torch.equal(a, b)
