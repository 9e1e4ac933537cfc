"""Data order is a function of images shown: resumable anywhere, full disjoint rank shares."""

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
