"""A sweep's progress on the console: one plain line per trial result, and how each ended.

Tune's own status table is shown only with `-v` (Ray's and MLflow's chatter goes to the
sweep's logs/, pipeline.run_logs); these lines say, per trial, where it is in its schedule
(kimg of the trial's total), its speed, an ETA at that speed, the metric Tune decides on,
and how it ended.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich.console import Console

from pipeline.phases.tune_trial import TIME_ATTR
from pipeline.progress import clock
from pipeline.search.summary import status_of


class TrialProgress(Callback):
    """Tune callback (driver side): a line per trial result, a line per trial end."""

    def __init__(self, total_kimg: float, metric: str, phases: int) -> None:
        # no console kept: Tune pickles its callbacks with the experiment (Tuner.restore)
        self.total, self.metric, self.phases = total_kimg, metric, phases

    def line(self, trial: Any, result: dict[str, Any]) -> str:
        kimg = float(result.get(TIME_ATTR, 0.0))
        start = float(result.get("start_kimg", 0.0))
        seconds = float(result.get("train_seconds", 0.0))
        rate = (kimg - start) * 1000 / seconds if seconds > 0 else 0.0
        eta = (self.total - kimg) * 1000 / rate if rate > 0 else None
        parts = [
            f"{time.strftime('%H:%M:%S')} trial {trial.trial_id}",
            f"{kimg:.2f}/{self.total:g} kimg ({100 * kimg / self.total:.0f}%)",
            f"phases {result.get('phases_done', 0)}/{self.phases}",
            f"{rate:,.0f} img/s",
            f"ETA {clock(eta)}",
        ]
        if self.metric in result:
            parts.append(f"{self.metric} {float(result[self.metric]):.2f}")
        return " | ".join(parts)

    def say(self, text: str) -> None:
        console = Console(soft_wrap=True)
        console.print(text, highlight=False, markup=False)
        console.file.flush()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.say(self.line(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        kimg = float(last.get(TIME_ATTR, 0.0))
        done = status_of(last, False, self.total) == "completed"
        self.say(
            f"trial {trial.trial_id}: "
            + ("finished" if done else f"stopped early at {kimg:.2f} kimg")
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(f"trial {trial.trial_id}: failed (its error is in the sweep's logs)")
