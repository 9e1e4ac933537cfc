"""The progress display: what a log point shows, on a terminal and without one, and what
progress.json keeps for `progan watch` (in-process, no Ray)."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from pipeline.progress import Progress, ProgressDisplay, clock
from progan.schedule import phase_plan
from tests.helpers import tiny_config


def plan():
    cfg = tiny_config()
    return phase_plan(cfg.schedule, cfg.model.resolution)


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200, soft_wrap=True), out


def test_a_log_point_is_one_plain_line_without_a_terminal_and_kept_in_progress_json(tmp_path):
    phases = plan()
    second = phases[1]
    shown, out = console(terminal=False)
    display = ProgressDisplay("r1", phases, shown, tmp_path / "progress.json")
    half = second.start_images + second.num_images // 2
    stats = {"images_shown": half, "alpha": 0.5, "images_per_s": 100.0, "d_loss": 1.5}
    display.point(1, {**stats, "g_loss": -0.25, "time": 1.0})
    [line] = out.getvalue().splitlines()
    remaining_phase = (second.end_images - half) / 100
    remaining_run = (phases[-1].end_images - half) / 100
    assert f"{second.name} (2/{len(phases)}) alpha 0.50" in line
    assert f"{half - second.start_images:,}/{second.num_images:,} images | 100 img/s" in line
    assert f"ETA phase {clock(remaining_phase)}, run {clock(remaining_run)}" in line
    assert line.endswith("d_loss 1.500 g_loss -0.250")
    kept = Progress.read(tmp_path / "progress.json")
    assert (kept.phase, kept.images, kept.state) == (second.name, half, "training")
    display.evaluating(1)  # no line of its own; the file says so
    assert Progress.read(tmp_path / "progress.json").state == "evaluating"
    display.evaluated(1, {"SWDx1e3_avg": 12.5})
    display.close("done")
    final = json.loads((tmp_path / "progress.json").read_text())
    assert final["state"] == "done" and final["swd"] == 12.5
    assert len(out.getvalue().splitlines()) == 1


def test_a_time_budget_caps_every_eta():
    """train-local --time-budget-min: the run ends with the budget, not with the plan."""
    phases = plan()
    shown, out = console(terminal=False)
    display = ProgressDisplay("r0", phases, shown, budget_s=10.0)
    display.point(0, {"images_shown": 8, "alpha": 1.0, "images_per_s": 0.01})  # days to go
    [line] = out.getvalue().splitlines()
    assert re.search(r"ETA phase 0:(09|10), run 0:(09|10)$", line), line
    without, out = console(terminal=False)
    ProgressDisplay("r0", phases, without).point(0, {"images_shown": 8, "images_per_s": 0.01})
    assert "ETA phase 0:10" not in out.getvalue()


def test_a_terminal_gets_the_two_line_display_with_run_and_phase():
    phases = plan()
    shown, out = console(terminal=True)
    display = ProgressDisplay("r2", phases, shown)
    display.phase_started(0)
    display.point(0, {"images_shown": 32, "alpha": 1.0, "images_per_s": 64.0, "d_loss": 2.0})
    display.evaluated(0, {"SWDx1e3_avg": 99.0})
    display.close("done")
    text = out.getvalue()
    assert f"run r2 · phase 1/{len(phases)} · 32/{phases[-1].end_images:,} images" in text
    assert f"{phases[0].name} {phases[0].resolution}x{phases[0].resolution}" in text
    assert "64 img/s" in text and "SWD 99.0" in text


def test_the_augmentation_probability_is_shown_with_the_losses_when_reported():
    phases = plan()
    shown, out = console(terminal=False)
    display = ProgressDisplay("r4", phases, shown)
    stats = {"images_shown": 16, "images_per_s": 50.0, "d_loss": 1.0, "g_loss": 2.0}
    display.point(0, stats)
    display.point(0, {**stats, "augment_p": 0.125})
    first, second = out.getvalue().splitlines()
    assert first.endswith("d_loss 1.000 g_loss 2.000")  # no augmentation: as before
    assert second.endswith("d_loss 1.000 g_loss 2.000 augment_p 0.125")
    assert display.progress.augment_p == 0.125


def test_a_new_phase_forgets_the_previous_phase_speed_and_losses():
    phases = plan()
    shown, _ = console(terminal=False)
    display = ProgressDisplay("r3", phases, shown)
    display.point(0, {"images_shown": 16, "images_per_s": 500.0, "d_loss": 1.0, "g_loss": 1.0})
    display.phase_started(1, phases[1].start_images)
    p = display.progress
    assert (p.phase, p.images_per_s, p.d_loss, p.eta_s(p.phase_end)) == (
        phases[1].name,
        0.0,
        None,
        None,
    )
    assert "ETA ?" in p.phase_line()


def test_clock():
    assert [clock(s) for s in (None, 0, 59.6, 61, 3600 * 2 + 62)] == [
        "?",
        "0:00",
        "1:00",
        "1:01",
        "2:01:02",
    ]
