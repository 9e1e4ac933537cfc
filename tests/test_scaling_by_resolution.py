"""`scaling.num_workers` as a map by resolution: each phase its own worker count, same data."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.config import ConfigError, ScalingSection
from pipeline.run import run_pipeline
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import load_checkpoint
from progan.data import PositionSampler
from progan.schedule import phase_plan
from tests import faults
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config


def test_workers_by_resolution_hold_from_their_key_up_and_bad_maps_name_the_key(tmp_path):
    s = ScalingSection(num_workers={8: 2, 64: 4})
    assert [s.workers_for(r) for r in (4, 8, 16, 32, 64, 256)] == [2, 2, 2, 2, 4, 4]
    assert s.max_workers == 4 and ScalingSection(num_workers=3).workers_for(256) == 3
    with pytest.raises(ValueError, match="num_workers"):
        ScalingSection(num_workers={6: 1})
    with pytest.raises(ValueError, match="at least 1 worker"):
        ScalingSection(num_workers={4: 0})
    # the batch must split over each phase's own workers (8 over 3 does not)
    with pytest.raises((ValueError, ConfigError), match="at 8: batch 8 is not divisible"):
        tiny_pipeline_config(tmp_path, tmp_path, scaling={"num_workers": {4: 1, 8: 3}})


def expected_digest(dataset: LmdbImageDataset, shown: int, rank: int, world: int) -> str:
    """The rank's share of the global batch a ONE-worker run reads at `shown` (batch 8)."""
    order = PositionSampler(len(dataset), 8, seed=0).indices_at(shown)
    share = order[rank * 8 // world : (rank + 1) * 8 // world]
    batch = torch.stack([dataset[i] for i in share])
    return hashlib.sha1(batch.numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_going_from_one_to_two_workers_reads_the_same_batches(local_ray, tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data", n=24, resolution=8)
    cfg = tiny_pipeline_config(dataset, tmp_path, scaling={"num_workers": {4: 1, 8: 2}})
    batches = tmp_path / "batches.txt"
    hooks = {"batches_file": str(batches)}
    result = run_pipeline(cfg, "grow", test_hooks=hooks, worker_fn=faults.records_batches)
    seen = [line.split() for line in batches.read_text().splitlines()]
    levels = {4: LmdbImageDataset(dataset, 4), 8: LmdbImageDataset(dataset, 8)}
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    for shown, rank, world, digest in seen:
        shown, rank, world = int(shown), int(rank), int(world)
        phase = next(p for p in plan if p.start_images <= shown < p.end_images)
        assert world == (1 if phase.resolution == 4 else 2), (shown, world)
        assert digest == expected_digest(levels[phase.resolution], shown, rank, world), shown
    steps = {(int(s), int(r)) for s, r, _, _ in seen}
    for phase in plan:  # every step of every phase, on each of its ranks, exactly once
        world = 1 if phase.resolution == 4 else 2
        want = {
            (s, r) for s in range(phase.start_images, phase.end_images, 8) for r in range(world)
        }
        assert want <= steps
    assert len(seen) == len(steps)  # no step trained twice
    assert load_checkpoint(result.generator)["images_shown"] == plan[-1].end_images
