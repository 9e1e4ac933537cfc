"""Progressive-growth schedule: a pure function from images shown to where training is.

The plan is: stabilize at the start resolution, then for each larger resolution a
transition (alpha 0 -> 1, new layers faded in) and a stabilization phase. Phase lengths are
counted in images shown, so any images-shown count maps to exactly one (phase, alpha) and a
run resumes mid-phase exactly. Batch size and learning rate may differ per resolution; a
transition into resolution R uses R's values, as the official code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from progan.config import ScheduleConfig, check_resolution

PhaseKind = Literal["transition", "stabilize"]


@dataclass(frozen=True)
class Phase:
    """One phase of the plan; images are counted globally from the start of the run."""

    index: int
    resolution: int
    kind: PhaseKind
    start_images: int
    end_images: int
    batch_size: int
    lr: float

    @property
    def level(self) -> int:
        return int(math.log2(self.resolution)) - 2

    @property
    def num_images(self) -> int:
        return self.end_images - self.start_images

    @property
    def steps(self) -> int:
        """Optimizer steps to show this phase's images (the last batch may overshoot)."""
        return math.ceil(self.num_images / self.batch_size)

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.resolution:04d}-{self.kind}"

    def alpha_at(self, images_shown: int) -> float:
        """Fade-in weight of the new layers: rises linearly in a transition, else 1."""
        if self.kind == "stabilize":
            return 1.0
        return min(max((images_shown - self.start_images) / self.num_images, 0.0), 1.0)


@dataclass(frozen=True)
class SchedulePoint:
    """Where images_shown falls in the plan."""

    phase: Phase
    images_shown: int
    alpha: float
    done: bool

    @property
    def resolution(self) -> int:
        return self.phase.resolution

    @property
    def level(self) -> int:
        return self.phase.level

    @property
    def kind(self) -> PhaseKind:
        return self.phase.kind

    @property
    def batch_size(self) -> int:
        return self.phase.batch_size

    @property
    def lr(self) -> float:
        return self.phase.lr


def phase_plan(schedule: ScheduleConfig, final_resolution: int) -> list[Phase]:
    """All phases from the start resolution up to `final_resolution`, in order."""
    check_resolution(final_resolution)
    if schedule.start_resolution > final_resolution:
        raise ValueError(
            f"start_resolution {schedule.start_resolution} exceeds final {final_resolution}"
        )
    kinds: list[tuple[int, PhaseKind, float]] = []
    res = schedule.start_resolution
    kinds.append((res, "stabilize", schedule.stabilize_kimg))
    while res < final_resolution:
        res *= 2
        if schedule.transition_kimg > 0:
            kinds.append((res, "transition", schedule.transition_kimg))
        kinds.append((res, "stabilize", schedule.stabilize_kimg))

    phases: list[Phase] = []
    start = 0
    for i, (res, kind, kimg) in enumerate(kinds):
        end = start + round(kimg * 1000)
        if i == len(kinds) - 1 and schedule.total_kimg is not None:
            end = max(end, round(schedule.total_kimg * 1000))
        phases.append(
            Phase(i, res, kind, start, end, schedule.batch_for(res), schedule.lr_for(res))
        )
        start = end
    return phases


def point_in_plan(plan: list[Phase], images_shown: int) -> SchedulePoint:
    """Locate `images_shown` in a precomputed plan (past the end: the last phase, done)."""
    if images_shown < 0:
        raise ValueError(f"images_shown must be >= 0, got {images_shown}")
    for phase in plan:
        if images_shown < phase.end_images:
            return SchedulePoint(phase, images_shown, phase.alpha_at(images_shown), False)
    last = plan[-1]
    return SchedulePoint(last, images_shown, 1.0, True)


def schedule_at(
    schedule: ScheduleConfig, final_resolution: int, images_shown: int
) -> SchedulePoint:
    """(resolution, phase kind, alpha, batch size, lr) after `images_shown` images."""
    return point_in_plan(phase_plan(schedule, final_resolution), images_shown)


PRESETS: dict[str, ScheduleConfig] = {
    # Paper, appendix A.1: 800k images per phase, minibatch 16 up to 128^2, then 14/6/3.
    "paper": ScheduleConfig(
        transition_kimg=800,
        stabilize_kimg=800,
        batch_base=16,
        batch_size={256: 14, 512: 6, 1024: 3},
        lr_base=0.001,
    ),
    # Official code, config.py preset-v2-1gpu.
    "v2-1gpu": ScheduleConfig(
        transition_kimg=600,
        stabilize_kimg=600,
        total_kimg=12000,
        batch_base=4,
        batch_size={4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4},
        lr_base=0.001,
        lr={1024: 0.0015},
    ),
    # Official code, config.py preset-v2-8gpus.
    "v2-8gpu": ScheduleConfig(
        transition_kimg=600,
        stabilize_kimg=600,
        total_kimg=12000,
        batch_base=32,
        batch_size={4: 512, 8: 256, 16: 128, 32: 64, 64: 32},
        lr_base=0.001,
        lr={128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003},
    ),
}


def preset(name: str) -> ScheduleConfig:
    """A copy of a named schedule preset ('paper', 'v2-1gpu', 'v2-8gpu')."""
    if name not in PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)
