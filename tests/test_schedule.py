"""The schedule is a pure function of images shown and hits phase boundaries exactly."""

import pytest

from progan.config import ScheduleConfig
from progan.schedule import phase_plan, preset, schedule_at


def test_plan_stabilize_then_transition_stabilize_per_resolution():
    s = ScheduleConfig(transition_kimg=600, stabilize_kimg=600)
    plan = phase_plan(s, 32)
    assert [(p.resolution, p.kind) for p in plan] == [
        (4, "stabilize"),
        (8, "transition"),
        (8, "stabilize"),
        (16, "transition"),
        (16, "stabilize"),
        (32, "transition"),
        (32, "stabilize"),
    ]
    assert [p.start_images for p in plan] == [i * 600_000 for i in range(7)]
    assert plan[-1].end_images == 4_200_000


def test_exact_phase_boundaries_and_alpha():
    s = ScheduleConfig(transition_kimg=800, stabilize_kimg=800, batch_size={8: 12}, lr={8: 0.002})
    at = lambda n: schedule_at(s, 16, n)  # noqa: E731
    assert (at(799_999).resolution, at(799_999).kind, at(799_999).alpha) == (4, "stabilize", 1.0)
    p = at(800_000)
    assert (p.resolution, p.kind, p.alpha, p.batch_size, p.lr) == (8, "transition", 0.0, 12, 0.002)
    assert at(1_200_000).alpha == 0.5
    assert at(1_599_999).kind == "transition" and at(1_599_999).alpha < 1.0
    assert (at(1_600_000).kind, at(1_600_000).alpha) == ("stabilize", 1.0)
    assert at(4_000_000).done and at(4_000_000).resolution == 16
    assert not at(3_999_999).done


def test_start_resolution_and_no_transitions():
    s = ScheduleConfig(start_resolution=16, transition_kimg=0, stabilize_kimg=1)
    assert [(p.resolution, p.kind) for p in phase_plan(s, 64)] == [
        (16, "stabilize"),
        (32, "stabilize"),
        (64, "stabilize"),
    ]


def test_presets_match_paper_and_official_code():
    paper = preset("paper")
    assert [paper.batch_for(r) for r in (4, 128, 256, 512, 1024)] == [16, 16, 14, 6, 3]
    plan = phase_plan(paper, 1024)
    assert len(plan) == 17 and plan[-1].end_images == 17 * 800_000
    v2 = phase_plan(preset("v2-1gpu"), 1024)
    assert v2[-1].end_images == 12_000_000 and v2[-1].lr == 0.0015 and v2[0].batch_size == 128
    v8 = preset("v2-8gpu")
    assert v8.batch_for(4) == 512 and v8.lr_for(512) == 0.003
    with pytest.raises(ValueError, match="choose one of"):
        preset("nope")


def test_steps_per_phase_round_up():
    plan = phase_plan(ScheduleConfig(stabilize_kimg=1, batch_base=3), 4)
    assert plan[0].steps == 334
