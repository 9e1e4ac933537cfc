"""The sweep's schedulers, clocked in kimg (thousands of images shown): ASHA whose rungs
survive a resumed sweep, PBT over the search space (its explore step kept inside the
ranges), or FIFO."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from ray.tune import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining, TrialScheduler

from pipeline.phases.tune_trial import TIME_ATTR
from pipeline.search.space import Dimension
from pipeline.search.spec import SCHEDULER_FILE, Sweep


class PersistentASHA(AsyncHyperBandScheduler):
    """ASHA whose rungs survive a resumed sweep, through its public `save` / `restore`.

    `Tuner.restore` brings back the searcher and the trials but builds the scheduler
    afresh; this one restores its saved state on first use and saves after each decision.
    """

    def __init__(self, state_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = state_file
        self._restored = False

    def _restore_once(self) -> None:
        if not self._restored:
            self._restored = True
            if Path(self._state_file).is_file():
                self.restore(self._state_file)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._restore_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._restore_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self.save(self._state_file)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._restore_once()
        super().on_trial_complete(tune_controller, trial, result)
        self.save(self._state_file)


class PhaseEndPBT(PopulationBasedTraining):
    """PBT that decides on a phase end's metric and hands over that phase end's checkpoint.

    A trial reports a phase end twice at the same clock: the checkpoint, then the metric
    without one (pipeline.phases.tune_trial). Ray's PBT decides on the metric and takes an
    upper-quantile trial's checkpoint from a save of the trial, which for a function
    trainable is its last report: the metric, no checkpoint. Ray then logs "no checkpoint
    for trial ... Skip exploit" and nobody copies, at every phase end where the better trial
    evaluated last. Here the checkpoint is the one Tune registered at the metric's clock.

    A trial PBT pauses there is stopped without a save (it resumes from that checkpoint):
    Ray pauses with a save, and a copy into a trial whose save is still pending stops it
    without clearing the save, which leaves a STOP that ends the trial at its next
    checkpoint, before its evaluation.

    At a trial's last clock (its whole budget) nothing is decided: a copy there would
    replace its finished generator with another trial's.
    """

    def __init__(self, *args: Any, end: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._end = end  # a trial's whole budget (kimg): no copying after training is over

    def _phase_end_checkpoint(self, trial: Trial, time: Any) -> Checkpoint | None:
        """The checkpoint Tune registered for `trial` at `time`, if its latest is there."""
        registered = trial.latest_checkpoint_result
        if registered is None or registered.metrics.get(self._time_attr) != time:
            return None
        return registered.checkpoint

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        at = result.get(self._time_attr)
        if at is not None and at >= self._end - 1e-9:  # the trial's last result: its own
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.PAUSE and self._phase_end_checkpoint(trial, at) is not None:
            tune_controller.pause_trial(trial, should_checkpoint=False)
            return TrialScheduler.NOOP
        return decision

    def _checkpoint_or_exploit(
        self,
        trial: Trial,
        tune_controller: Any,
        upper_quantile: list[Trial],
        lower_quantile: list[Trial],
    ) -> None:
        state = self._trial_state[trial]
        checkpoint = self._phase_end_checkpoint(trial, state.last_train_time)
        if trial in upper_quantile and checkpoint is not None:  # before the lower copies it
            state.last_checkpoint = checkpoint
            self._num_checkpoints += 1
            return
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)


def keep_in_range(dimensions: list[Dimension], config: dict[str, Any]) -> dict[str, Any]:
    """PBT's explore step, after its perturbation: every value back inside its range (a
    learning rate x 1.2 past the top of its log-uniform range, an EMA beta past 1)."""
    for dim in dimensions:
        if dim.key in config:
            config[dim.key] = dim.clamp(config[dim.key])
    return config


def make_scheduler(sweep: Sweep):
    """ASHA (persistent), PBT over the search space, or FIFO, all clocked in kimg."""
    from ray.tune.schedulers import FIFOScheduler

    sch = sweep.spec.scheduler
    if sch.type == "asha":
        return PersistentASHA(
            str(sweep.sweep_dir / SCHEDULER_FILE),  # beside spec.yaml, wherever Tune stores
            time_attr=TIME_ATTR,
            max_t=sch.max_t or sweep.trial_kimg,
            grace_period=sch.grace_period or sweep.first_measured_kimg,
            reduction_factor=sch.reduction_factor,
        )
    if sch.type == "pbt":
        return PhaseEndPBT(
            time_attr=TIME_ATTR,
            perturbation_interval=sch.perturbation_interval or sweep.first_measured_kimg,
            hyperparam_mutations={d.key: d.pbt_mutation() for d in sweep.dimensions},
            custom_explore_fn=partial(keep_in_range, sweep.dimensions),
            quantile_fraction=sch.quantile_fraction,
            resample_probability=sch.resample_probability,
            require_attrs=False,  # mid-phase checkpoints carry no metric; PBT skips them
            synch=sch.synchronous,
            end=sweep.trial_kimg,
        )
    return FIFOScheduler()  # no early stopping
