"""MLflow logging of one phase from the rank that trains it (rank 0): a `PhaseSink` of the
Ray Train and Tune hosts.

Losses go to the phase's run and to the run holding one curve per metric over the whole run
(the pipeline's parent run, or a Tune trial's run); the sample grids go to that run as the
image `samples` (MLflow's step slider); at the end, the evaluation, a loss-curve plot, and
whatever MLflow did not take is handed to `on_undelivered`. Logging is queued
(pipeline.tracking.metric_logger): training never waits on the server.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.phases.session import LOGGED_STATS, PhaseSession, PhaseSink, TrackingIds
from pipeline.tracking.metric_logger import MetricLogger
from pipeline.tracking.secrets import with_credentials
from pipeline.tracking.tracker import fail_fast_http

log = logging.getLogger(__name__)
EVAL_DELIVERY_S = 30.0  # how long the end-of-phase metrics may take to reach the server


class MlflowPhaseSink(PhaseSink):
    """Rank 0's MLflow logging of a phase (see the module doc).

    `eval_roles`: the runs the evaluation goes to ("phase", "run"); `on_failing(error)` is
    called once when MLflow first refuses something; `on_undelivered(what)` at the end with
    what never arrived (pipeline.tracking.metric_logger's `close()`).
    """

    def __init__(
        self,
        ids: TrackingIds,
        eval_roles: tuple[str, ...] = ("phase", "run"),
        on_failing: Callable[[str], None] | None = None,
        on_undelivered: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.ids, self.eval_roles = ids, eval_roles
        self.on_failing, self.on_undelivered = on_failing, on_undelivered
        self.logger: MetricLogger | None = None
        self.history: list[dict[str, float]] = []
        self.told = False

    def started(self, session: PhaseSession) -> None:
        self.logger = MetricLogger(
            self.ids.uri, {"phase": self.ids.phase_run_id, "run": self.ids.run_id}
        )
        if session.trainer.images_shown > session.phase.start_images:
            # a restart mid-phase: the steps after its checkpoint may be logged already
            self.logger.skip_logged("d_loss", session.trainer.images_shown)

    def stats(self, session: PhaseSession, stats: dict[str, float]) -> None:
        assert self.logger is not None
        self.history.append({k: stats[k] for k in ("images_shown", *LOGGED_STATS) if k in stats})
        logged = {k: v for k, v in stats.items() if k in LOGGED_STATS}
        self.logger.log({**logged, "resolution": session.phase.resolution}, stats["images_shown"])
        if self.logger.first_error and not self.told and self.on_failing:
            self.on_failing(self.logger.first_error)
            self.told = True

    def evaluated(self, session: PhaseSession, metrics: dict[str, float]) -> None:
        assert self.logger is not None
        self.logger.log(metrics, session.trainer.images_shown, to=self.eval_roles)
        # delivered now: a Tune scheduler may stop the trial at its next report
        self.logger.wait_sent(EVAL_DELIVERY_S)

    def sample_grid(self, session: PhaseSession, path: Path, images_shown: int) -> None:
        assert self.logger is not None
        self.logger.log_image(path, "samples", images_shown, role="run")  # the image slider

    def finished(self, session: PhaseSession) -> None:
        from pipeline.tracking.plots import plot_phase_curves

        assert self.logger is not None
        if self.history:
            with tempfile.TemporaryDirectory() as tmp:
                plot = plot_phase_curves(self.history, Path(tmp) / "losses.png")
                self.logger.log_artifact(plot, "plots", role="phase")  # copied: tmp may go
        self._close()

    def failed(self, session: PhaseSession, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.logger is None:
            return
        undelivered, self.logger = self.logger.close(), None
        if undelivered and self.on_undelivered:
            self.on_undelivered(undelivered)


def start_system_metrics(
    uri: str, phase_run_id: str, interval_s: float, node_id: str | None = None
) -> Any:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU utilisation and
    memory where pynvml sees GPUs) on the phase run; `node_id` names the node in the metric
    names when there are several. The sampling interval is MLflow's
    ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, default here `interval_s`). Returns the
    monitor (call `finish()`), or None where it is switched off or failed."""
    if not interval_s:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with fail_fast_http():  # it reads the run: a server that is away must not stall us
            monitor = SystemMetricsMonitor(
                phase_run_id,
                sampling_interval=interval_s,
                resume_logging=True,
                node_id=node_id,
                tracking_uri=with_credentials(uri),
            )
        monitor.start()
        return monitor
    except Exception as err:  # e.g. psutil missing: training goes on without them
        log.warning("no system metrics: %s", err)
        return None


def finish_system_metrics(monitor: Any) -> None:
    """Stop the monitor. A phase shorter than one sampling interval still gets one sample:
    MLflow's loop drops what it collected when it is stopped before its first wait ends
    (seen on the demo's 8x8 phases, a second long on an idle machine)."""
    monitor.finish()
    try:
        if getattr(monitor, "_logging_step", 1) == 0:  # nothing published yet
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
    except Exception as err:  # system metrics never stop a phase
        log.warning("no system metrics for this short phase: %s", err)
