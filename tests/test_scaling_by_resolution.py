"""`scaling.num_workers` as a map by resolution: each phase its own worker count, same data.

The run that grows from one worker to two (same batches as one worker) is
test_pipeline_run.py::test_a_ddp_run_growing_from_one_to_two_workers_is_tracked_and_reads_the_same_batches."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, ScalingSection
from tests.pipeline_helpers import tiny_pipeline_config


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
