"""Data order is a function of images shown: resumable anywhere, full disjoint rank shares."""

import pytest

from progan.data import PositionSampler


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
