"""A finished sweep, read from Tune's ResultGrid: one row per trial, the best, best.yaml.

Tune keeps every trial's results and checkpoints (`<sweep>/ray/`); this module only turns
them into what a user reads: summary.md/.csv, the console table, and best.yaml, the base
config at its full size with the best trial's values.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.config import dump_config
from pipeline.phases.tune_trial import TIME_ATTR, find_trial_run, fmt, params_text
from pipeline.search.spec import Sweep, num_samples
from pipeline.search.trial import trial_config

EPS_KIMG = 1e-6


@dataclass
class TrialRow:
    """One line of the summary."""

    trial_id: str
    params: dict[str, Any]
    status: str  # completed | early_stopped | error | not_started
    kimg: float
    kimg_total: float
    last_metric: float | None = None
    last_resolution: int | None = None
    best_metric: float | None = None
    wall_s: float = 0.0  # Tune's time_total_s
    train_s: float = 0.0
    eval_s: float = 0.0
    exploits: int = 0

    @property
    def overhead_s(self) -> float:
        """Seconds neither training nor evaluating: start-up, reports, checkpoints."""
        return max(self.wall_s - self.train_s - self.eval_s, 0.0)


@dataclass
class SweepResult:
    """Where a finished sweep's outputs are."""

    sweep_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    tracking_uri: str
    mlflow_run_id: str
    wall_s: float


def status_of(last: dict[str, Any], error: bool, total: float) -> str:
    """A trial's status from its last result."""
    if error:
        return "error"
    if TIME_ATTR not in last:
        return "not_started"
    return "completed" if last[TIME_ATTR] >= total - EPS_KIMG else "early_stopped"


def row_of(sweep: Sweep, result: Any) -> TrialRow:
    """One Tune `Result` as a summary row."""
    metric, mode = sweep.spec.search.metric, sweep.spec.search.mode
    last = result.metrics or {}
    trial_id = Path(result.path).name  # the trial's own directory (a PBT copy's last
    # result can carry the donor's id)
    params = {d.key: (result.config or {}).get(d.key) for d in sweep.dimensions}
    total = sweep.trial_kimg
    row = TrialRow(
        trial_id,
        params,
        status_of(last, result.error is not None, total),
        float(last.get(TIME_ATTR, 0.0)),
        total,
        wall_s=float(last.get("time_total_s", 0.0)),
        train_s=float(last.get("train_seconds", 0.0)),
        eval_s=float(last.get("eval_seconds", 0.0)),
    )
    history = result.metrics_dataframe
    if history is not None and metric in history:
        measured = history.dropna(subset=[metric])
        if len(measured):
            row.last_metric = float(measured[metric].iloc[-1])
            row.last_resolution = int(measured["resolution"].iloc[-1])
            values = measured[metric]
            row.best_metric = float(values.min() if mode == "min" else values.max())
        if "pbt_exploits" in history:
            row.exploits = int(history["pbt_exploits"].max())
    return row


def rows_of(sweep: Sweep, grid: Any) -> list[TrialRow]:
    """Every trial of a ResultGrid, sorted by trial id."""
    return sorted((row_of(sweep, r) for r in grid), key=lambda r: r.trial_id)


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Deepest trial first (a metric at a higher resolution is not comparable), then metric."""
    scored = [r for r in rows if r.last_metric is not None and r.status != "error"]
    scored = [r for r in scored if not math.isnan(r.last_metric)]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda r: (-r.kimg, sign * r.last_metric))


def write_best(sweep: Sweep, best: TrialRow) -> Path:
    """The base config (full size) with the best trial's sampled values: `progan run` input."""
    cfg = trial_config(sweep.base_raw, best.params)
    path = dump_config(cfg, sweep.sweep_dir / "best.yaml")
    header = (
        f"# best of sweep {sweep.name}: trial {best.trial_id}, "
        f"{sweep.spec.search.metric} {best.last_metric:.3f} at {best.last_resolution}x"
        f"{best.last_resolution}\n# {params_text(best.params)}\n"
        f"# the base config at its full size with the searched keys set; "
        f"train it with: progan run {path}\n"
    )
    path.write_text(header + path.read_text())
    return path


def describe_plan(sweep: Sweep, max_concurrent: int | None) -> str:
    """One line: searcher, scheduler with its budgets, trial size, concurrency."""
    s, sch = sweep.spec.search, sweep.spec.scheduler
    if sch.type == "asha":
        stop = (
            f"ASHA (grace {sch.grace_period or sweep.first_measured_kimg:g} kimg, reduction "
            f"{sch.reduction_factor:g}, max_t {sch.max_t or sweep.trial_kimg:g} kimg)"
        )
    elif sch.type == "pbt":
        stop = (
            f"PBT (every {sch.perturbation_interval or sweep.first_measured_kimg:g} kimg, "
            f"quantile {sch.quantile_fraction:g}, resample {sch.resample_probability:g})"
        )
    else:
        stop = "no early stopping"
    at_once = f"{max_concurrent} at a time" if max_concurrent else "as many at a time as fit"
    cfg = sweep.trial_cfg
    return (
        f"{s.algorithm} search, num_samples {num_samples(sweep.spec)}, {s.metric} ({s.mode}), "
        f"{stop}; trials of {sweep.trial_phases} phases, {sweep.trial_kimg:g} kimg, up to "
        f"{cfg.model.resolution}x{cfg.model.resolution}, {at_once}"
    )


def _cells(sweep: Sweep, row: TrialRow) -> list[str]:
    metric = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    share = f"{100 * row.overhead_s / row.wall_s:.0f}" if row.wall_s else ""
    return [
        row.trial_id,
        *[fmt(row.params.get(d.key, "")) for d in sweep.dimensions],
        metric(row.best_metric),
        metric(row.last_metric),
        "" if row.last_resolution is None else str(row.last_resolution),
        f"{row.kimg:g}/{row.kimg_total:g}",
        row.status,
        str(row.exploits),
        f"{row.wall_s:.0f}",
        f"{row.train_s:.0f}",
        f"{row.eval_s:.0f}",
        share,
    ]


def _header(sweep: Sweep) -> list[str]:
    m = sweep.spec.search.metric
    return [
        "trial",
        *[d.key for d in sweep.dimensions],
        f"best {m}",
        f"last {m}",
        "at res",
        "kimg",
        "status",
        "exploits",
        "wall s",
        "train s",
        "eval s",
        "overhead %",
    ]


def summary_table(sweep: Sweep, rows: list[TrialRow], best: TrialRow | None) -> Table:
    table = Table(title=f"sweep {sweep.name}: {len(rows)} trials")
    for col in _header(sweep):
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for row in rows:
        style = "bold green" if best is not None and row.trial_id == best.trial_id else None
        table.add_row(*_cells(sweep, row), style=style)
    return table


def summary_markdown(sweep: Sweep, rows: list[TrialRow], best: TrialRow | None) -> str:
    head = _header(sweep)
    lines = [
        f"# Sweep {sweep.name}",
        "",
        describe_plan(sweep, sweep.spec.search.max_concurrent_trials),
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    lines += ["| " + " | ".join(_cells(sweep, r)) + " |" for r in rows]
    if best:
        lines += [
            "",
            f"Best: trial {best.trial_id} ({params_text(best.params)}), "
            f"{sweep.spec.search.metric} {best.last_metric:.3f} at "
            f"{best.last_resolution}x{best.last_resolution}; config: best.yaml",
        ]
    return "\n".join(lines) + "\n"


def summary_csv(sweep: Sweep, rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_header(sweep))
    for r in rows:
        writer.writerow(_cells(sweep, r))
    return out.getvalue()


def dry_run_text(sweep: Sweep) -> str:
    """What a sweep would do, without starting anything."""
    lines = [
        f"sweep {sweep.name} -> {sweep.sweep_dir} (nothing was run)",
        describe_plan(sweep, sweep.spec.search.max_concurrent_trials),
        "search space:",
        *[f"  {d.key}: {d.describe()}" for d in sweep.dimensions],
        "trial phases:",
        *[
            f"  {p.index}: {p.name} {p.num_images / 1000:g} kimg (to {p.end_images / 1000:g}), "
            f"batch {p.batch_size}, lr {p.lr:g}"
            for p in sweep.plan
        ],
        f"best.yaml: the base at {sweep.base_cfg.model.resolution}x"
        f"{sweep.base_cfg.model.resolution} with the best trial's values",
    ]
    return "\n".join(lines)


def record_sweep(
    sweep: Sweep, rows: list[TrialRow], best: TrialRow | None, tracker: Any, sweep_run_id: str
) -> Path | None:
    """summary.md/.csv and best.yaml in the sweep directory and on the sweep's MLflow run
    (with counts, the overhead share, the best metric and tags); returns best.yaml's path."""
    best_path = write_best(sweep, best) if best else None
    (sweep.sweep_dir / "summary.md").write_text(summary_markdown(sweep, rows, best))
    (sweep.sweep_dir / "summary.csv").write_text(summary_csv(sweep, rows))
    for name in ("summary.md", "summary.csv"):
        tracker.log_artifact(sweep_run_id, sweep.sweep_dir / name)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
    wall = sum(r.wall_s for r in rows)
    if wall:
        metrics["overhead_share"] = sum(r.overhead_s for r in rows) / wall
    if best:
        tracker.log_artifact(sweep_run_id, best_path)
        metrics[f"best_{sweep.spec.search.metric}"] = float(best.last_metric)
        tags = {"best_trial": best.trial_id, "best_params": params_text(best.params)}
        for key, value in tags.items():
            tracker.client.set_tag(sweep_run_id, key, value)
        best_run = find_trial_run(tracker, sweep.name, best.trial_id)
        if best_run:
            tracker.client.set_tag(best_run, "tune.best", "true")
    tracker.log_metrics(sweep_run_id, metrics, 0)
    return best_path
