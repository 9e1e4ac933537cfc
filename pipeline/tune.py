"""Hyperparameter search: many short progressive trainings on Ray Tune, tracked in MLflow.

A tune spec (conf/tune/*.yaml) names a base pipeline config, overrides that shrink each
trial (`trial:`), a search space over dotted config keys, a searcher and an ASHA scheduler.
Everything is validated before Ray starts; a bad entry is one `ConfigError` line naming the
key. Each trial is a Tune *function trainable* (Train V2's pattern: a driver function that
builds the trainers) which calls `run_pipeline`, the code path of `progan run`: the same
phase plan, one Ray Train TorchTrainer per phase. After every phase that has the metric
(SWD needs 8x8 or more) the trial reports it to Tune with `phase` (phases done) as the time
attribute, so ASHA can stop it between phases.

Layout of a sweep directory (`<base run.root>/tune/<name>`):

    tune.yaml         the resolved spec (base config inlined), what `--resume` reads
    sweep.json        MLflow ids of the sweep run
    ray/              Tune's experiment (Tuner.restore reads it); asha.json, ASHA's rungs
    trials/<id>/      each trial's pipeline run directory (state.json, phases.md, ...)
    summary.md/.csv   one row per trial; best.yaml, the best config at the base's full size

MLflow: a parent run for the sweep; each trial's pipeline parent run is nested under it
(tag mlflow.parentRunId), with the trial's phase runs nested under that as usual; a
`status` tag says completed / early_stopped / error (early-stopped runs end KILLED).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler
from rich.console import Console
from rich.table import Table

from pipeline.config import (
    ConfigError,
    PipelineConfig,
    absolute_paths,
    describe,
    dump_config,
    merge,
    parse_overrides,
    validate_config,
)
from preprocessing.lmdb_store import write_json_atomic
from progan.config import StrictModel
from progan.schedule import phase_plan

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DISTRIBUTION_HELP = (
    "choice: [...], grid: [...], uniform: [a, b], loguniform: [a, b], randint: [a, b]"
)
# Tune saves its experiment state at most this often (default: every 10 s or more); a
# killed sweep resumes from the last save, so keep the window of redone work short.
CHECKPOINT_PERIOD_S = "2"
# Keys the sweep itself sets for every trial: not searchable, not overridable per trial.
SWEEP_KEYS = ("run.root", "tracking.uri", "ray_address")
SPEC_FILE = "tune.yaml"
SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
ASHA_FILE = "asha.json"
TIME_ATTR = "phase"  # phases done (1-based): ASHA's clock


class SearchSection(StrictModel):
    """Which searcher, how many trials, what to optimise."""

    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random | grid (Tune's variant generator) | optuna (TPE)"
    )
    num_samples: int | None = Field(
        None,
        ge=1,
        description="trials (random, optuna; default 4); repeats of the whole grid (grid and "
        "grid entries under random; default 1)",
    )
    metric: str = Field("SWDx1e3_avg", description="an end-of-phase evaluation metric")
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as the cluster's CPUs/GPUs hold"
    )
    seed: int | None = Field(0, description="searcher seed (None: unseeded)")


class SchedulerSection(StrictModel):
    """Early stopping, in phases."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="phases before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the trial plan's phase count")


class TrialDriverSection(StrictModel):
    """What each trial's driver process (not its Train workers) reserves."""

    cpus: float = Field(
        0, ge=0, description="it only waits on its Train workers; 0 lets workers have all"
    )
    memory_mb: float = Field(256, gt=0, description="logical Ray memory, so it is schedulable")


class TuneSpec(StrictModel):
    """A `conf/tune/*.yaml` file."""

    name: str | None = Field(None, description="sweep name (default: file stem + time)")
    base: str | dict[str, Any] = Field(description="pipeline config: path or inline mapping")
    trial: dict[str, Any] = Field(
        default_factory=dict, description="overrides for every trial (a reduced size)"
    )
    search_space: dict[str, Any] = Field(description="dotted config key -> distribution")
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial_driver: TrialDriverSection = Field(default_factory=TrialDriverSection)


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial ended (Ctrl-C); the sweep can be resumed."""


@dataclass
class Dimension:
    """One search-space entry."""

    key: str
    kind: str
    args: list[Any]

    def candidates(self) -> list[Any]:
        """Values that must validate: every listed value, or both bounds and an inner point
        (a non-round one, so that a float range over an integer key is caught)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        a, b = self.args
        if self.kind == "randint":
            return [a, b]
        if self.kind == "loguniform":
            return [a, b, math.exp(math.log(a) + (math.log(b) - math.log(a)) * 0.377)]
        return [a, b, a + (b - a) * 0.377]

    def to_tune(self, algorithm: str):
        from ray import tune

        if self.kind == "grid" or (self.kind == "choice" and algorithm == "grid"):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(self.args[0], self.args[1] + 1)  # ours is inclusive

    def describe(self) -> str:
        return f"{self.kind} {self.args}"


@dataclass
class Sweep:
    """A validated spec, ready to run: the configs every trial and the best.yaml start from."""

    name: str
    base_raw: dict[str, Any]  # as written (relative paths kept): best.yaml starts here
    trial_raw: dict[str, Any]  # base + trial overrides, paths made absolute, sweep keys set
    dimensions: list[Dimension]
    spec: TuneSpec
    base_cfg: PipelineConfig
    trial_cfg: PipelineConfig
    sweep_dir: Path
    tracking_uri: str

    @property
    def trial_phases(self) -> int:
        return len(phase_plan(self.trial_cfg.schedule, self.trial_cfg.model.resolution))


@dataclass
class TrialRow:
    """One line of the summary."""

    trial_id: str
    params: dict[str, Any]
    status: str
    phases_done: int
    phases_total: int
    last_metric: float | None = None
    last_resolution: int | None = None
    best_metric: float | None = None
    wall_s: float = 0.0
    overhead_s: float = 0.0
    attempts: int = 0
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


# ---------------------------------------------------------------- spec loading + validation


def nested(key: str, value: Any) -> dict[str, Any]:
    """'train.loss', 'bce' -> {'train': {'loss': 'bce'}} (numeric parts become int keys)."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {int(part) if part.isdigit() else part: out}
    return out


def int_keys(value: Any) -> Any:
    """Digit-string mapping keys -> int, recursively (YAML and JSON disagree on them)."""
    if isinstance(value, dict):
        return {
            int(k) if isinstance(k, str) and k.isdigit() else k: int_keys(v)
            for k, v in value.items()
        }
    return value


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys; a leaf is a mapping whose single key is a distribution."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        is_section = (
            isinstance(value, dict)
            and value
            and not set(map(str, value)) & set(DISTRIBUTIONS)
            and all(isinstance(v, dict) for v in value.values())
        )
        if is_section:
            out.update(flatten_space(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_config_key(key: str) -> None:
    """Raise unless `key` names a value in PipelineConfig (a dict field may take one subkey)."""
    model: type[StrictModel] = PipelineConfig
    parts = key.split(".")
    where = "the top level"
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(
                f"search_space.{key}: unknown config key '{part}' in {where}; "
                f"allowed there: {', '.join(sorted(fields))}"
            )
        annotation = fields[part].annotation
        rest = parts[i + 1 :]
        if isinstance(annotation, type) and issubclass(annotation, StrictModel):
            if not rest:
                raise ConfigError(
                    f"search_space.{key}: is a section, not a value; name one of its keys: "
                    f"{', '.join(sorted(annotation.model_fields))}"
                )
            model, where = annotation, f"'{'.'.join(parts[: i + 1])}'"
            continue
        is_dict = getattr(annotation, "__origin__", None) is dict or annotation is dict
        if rest and not (is_dict and len(rest) == 1):
            raise ConfigError(
                f"search_space.{key}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        return


def parse_dimension(key: str, spec: Any) -> Dimension:
    """Check one distribution's shape and arguments."""
    bad = f"search_space.{key}: {spec!r} is not a distribution; use one of {DISTRIBUTION_HELP}"
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(bad)
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search_space.{key}: {kind} needs a non-empty list of values")
        return Dimension(key, kind, args)
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(x, int | float) and not isinstance(x, bool) for x in args)
    if not numbers or not args[0] < args[1] + (kind == "randint"):
        raise ConfigError(f"search_space.{key}: {kind} needs [low, high] with low < high")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs 0 < low < high")
    if kind == "randint" and not all(isinstance(x, int) for x in args):
        raise ConfigError(f"search_space.{key}: randint needs integer bounds (inclusive)")
    return Dimension(key, kind, [float(x) if kind != "randint" else x for x in args])


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def validate_value(dim: Dimension, value: Any, raws: dict[str, dict[str, Any]]) -> None:
    """The value must validate in a trial and in the full-size best.yaml."""
    for what, raw in raws.items():
        try:
            validate_config(merge(raw, nested(dim.key, value)))
        except ConfigError as err:
            ranged = dim.kind in ("uniform", "loguniform")
            hint = " (use randint for integer keys)" if ranged else ""
            raise ConfigError(
                f"search_space.{dim.key}: value {value!r} fails validation in the {what} "
                f"config: {one_line(err)}{hint}"
            ) from None


def load_spec_dict(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The tune YAML with overrides applied and `base` loaded (relative to the YAML's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({one_line(err)})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, trial, search_space, search...)")
    extra = parse_overrides(overrides or [])
    space = flatten_space(raw.get("search_space") or {}) if "search_space" in raw else None
    if isinstance(extra.get("search_space"), dict):
        space = {**(space or {}), **flatten_space(extra.pop("search_space"))}
    raw = merge(raw, extra)
    if space is not None:
        raw["search_space"] = space
    base = raw.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"base: pipeline config not found: {base} (looked at {base_path})")
        try:
            raw["base"] = yaml.safe_load(base_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"base: {base_path} is not valid YAML ({one_line(err)})") from err
    raw.setdefault("name", None)
    if raw["name"] is None:
        raw["name"] = f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return raw


def build_sweep(raw: dict[str, Any], sweep_dir: Path | None = None) -> Sweep:
    """Validate a spec dict (base already inlined) completely, before Ray starts."""
    try:
        spec = TuneSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, TuneSpec)) from None
    if not isinstance(spec.base, dict):
        raise ConfigError("base: expected a pipeline config (path or mapping)")
    base_raw = int_keys(spec.base)
    try:
        base_cfg = validate_config(base_raw)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    for key in SWEEP_KEYS:
        if _has(spec.trial, key):
            raise ConfigError(f"trial.{key}: set by the sweep for every trial; set it in base")
    try:
        validate_config(
            merge(base_raw, int_keys(spec.trial))
        )  # errors named after the trial section
    except ConfigError as err:
        raise ConfigError(f"trial: {err}") from None

    name = spec.name or "sweep"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"name: {name!r} must be a plain directory name")
    sweep_dir = (sweep_dir or Path(base_cfg.run.root) / "tune" / name).resolve()
    from pipeline.tracking import resolve_uri

    uri = resolve_uri(base_cfg.tracking.uri, base_cfg.run.root)
    trial_raw = absolute_paths(merge(base_raw, int_keys(spec.trial)))
    trial_raw = merge(trial_raw, {"run": {"root": str(sweep_dir / "trials")}})
    trial_raw = merge(trial_raw, {"tracking": {"uri": uri}, "ray_address": None})
    trial_cfg = validate_config(trial_raw)

    if not spec.search_space:
        raise ConfigError("search_space: empty; map dotted config keys to distributions")
    dims: list[Dimension] = []
    for key, dist in spec.search_space.items():
        if key in SWEEP_KEYS:
            raise ConfigError(f"search_space.{key}: set by the sweep; it cannot be searched")
        check_config_key(key)
        dims.append(parse_dimension(key, dist))
    algorithm = spec.search.algorithm
    for dim in dims:
        if algorithm == "grid" and dim.kind not in ("choice", "grid"):
            raise ConfigError(
                f"search_space.{dim.key}: {dim.kind} has no grid; search.algorithm grid needs "
                "choice or grid values (or use random/optuna)"
            )
        if algorithm == "optuna" and dim.kind == "grid":
            raise ConfigError(
                f"search_space.{dim.key}: grid is not supported by optuna; use choice, "
                "or search.algorithm grid/random"
            )
        scalars = all(v is None or isinstance(v, bool | int | float | str) for v in dim.args)
        if algorithm == "optuna" and dim.kind == "choice" and not scalars:
            raise ConfigError(
                f"search_space.{dim.key}: optuna's choice values must be scalars "
                "(None, bool, int, float, str)"
            )
        for value in dim.candidates():
            validate_value(dim, value, {"trial": trial_raw, "base (best.yaml)": base_raw})
    together = {d.key: d.candidates()[0] for d in dims}
    for what, raw_cfg in {"trial": trial_raw, "base (best.yaml)": base_raw}.items():
        merged = raw_cfg
        for key, value in together.items():
            merged = merge(merged, nested(key, value))
        try:
            validate_config(merged)
        except ConfigError as err:
            raise ConfigError(
                f"search_space: the first values together fail in the {what} config: "
                f"{one_line(err)}"
            ) from None

    check_metric(spec, trial_cfg)
    plan = phase_plan(trial_cfg.schedule, trial_cfg.model.resolution)
    max_t = spec.scheduler.max_t or len(plan)
    if spec.scheduler.type == "asha" and spec.scheduler.grace_period > max_t:
        raise ConfigError(
            f"scheduler.grace_period: {spec.scheduler.grace_period} exceeds max_t {max_t} "
            f"(a trial has {len(plan)} phases)"
        )
    if algorithm == "optuna":
        searcher_available("optuna")
    return Sweep(name, base_raw, trial_raw, dims, spec, base_cfg, trial_cfg, sweep_dir, uri)


def _has(section: dict[str, Any], dotted: str) -> bool:
    node: Any = section
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_metric(spec: TuneSpec, cfg: PipelineConfig) -> None:
    """The metric must be one the trial's end-of-phase evaluation produces."""
    metric = spec.search.metric
    # smallest resolution each is measured at (pipeline.evaluation's MIN_*_RESOLUTION; not
    # imported: that module pulls in the metrics stack and this runs before anything starts)
    needs = {"SWD": ("swd", 8), "msssim": ("msssim", 16), "fid": ("fid", 8), "kid": ("kid", 8)}
    for prefix, (name, min_res) in needs.items():
        if metric.startswith(prefix):
            if not cfg.eval.enabled or name not in cfg.eval.metrics:
                raise ConfigError(
                    f"search.metric: {metric} needs eval.enabled and '{name}' in eval.metrics "
                    f"of the trial config (it has enabled={cfg.eval.enabled}, "
                    f"metrics={cfg.eval.metrics})"
                )
            if cfg.model.resolution < min_res:
                raise ConfigError(
                    f"search.metric: {metric} is measured from {min_res}x{min_res}; the trial's "
                    f"model.resolution is {cfg.model.resolution}"
                )
            return
    raise ConfigError(
        f"search.metric: {metric!r} is not an end-of-phase metric; use SWDx1e3_avg, "
        "SWDx1e3_<res>, msssim_fake, fid or kid"
    )


def searcher_available(name: str) -> None:
    """Raise a one-line error if a model-based searcher's package is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConfigError(
            f"search.algorithm: '{name}' needs the {name} package (pip install {name}); "
            "available without it: random, grid"
        )


def load_sweep(
    path: str | os.PathLike, overrides: list[str] | None = None, name: str | None = None
) -> Sweep:
    """A tune YAML + overrides -> a validated Sweep (nothing started)."""
    raw = load_spec_dict(path, overrides)
    if name:
        raw["name"] = name
    return build_sweep(raw)


# ------------------------------------------------------------------------- the trial side


def trial_driver(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: `run_pipeline` with the sampled params; reports each phase's metric."""
    import ray.tune

    from pipeline.run import STATE_FILE, run_pipeline
    from pipeline.state import RunState

    trial_id = ray.tune.get_context().get_trial_id()
    raw = context["trial_raw"]
    for key, value in params.items():
        raw = merge(raw, nested(key, value))
    cfg = validate_config(raw)
    run_dir = Path(cfg.run.root) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = TrialRecord.load(run_dir, trial_id, params)
    record.attempts.append({"start": time.time(), "end": None})
    record.save(run_dir)
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    metric = context["metric"]
    tags = {
        "tune.sweep": context["sweep_name"],
        "tune.trial_id": trial_id,
        "tune.params": params_text(params),
        "status": "running",
    }
    last = plan[-1].index

    def report(index: int, metrics: dict[str, float], final: bool) -> None:
        if metric not in metrics:
            return
        phase = plan[index]
        ray.tune.report(
            {
                **metrics,
                TIME_ATTR: index + 1,
                "phases_total": len(plan),
                "resolution": phase.resolution,
                "final": final,
            }
        )

    # a restarted trial (resumed sweep) re-reports the phases its run finished earlier
    state_path = run_dir / STATE_FILE
    if state_path.is_file():
        state = RunState.load(state_path)
        for i in sorted(int(k) for k, ps in state.phases.items() if ps.done):
            if i != last or state.finished:
                report(i, state.phases[str(i)].evaluation, final=i == last)
        if state.finished:
            record.attempts[-1]["end"] = time.time()
            record.save(run_dir)
            return

    pending: dict[str, Any] = {}

    def on_phase_end(phase, metrics: dict[str, float]) -> None:
        record.phases[str(phase.index)] = {
            "ended": time.time(),
            "resolution": phase.resolution,
            "kind": phase.kind,
            **{k: round(float(v), 4) for k, v in metrics.items()},
        }
        record.save(run_dir)
        if phase.index == last:
            pending.update(metrics)  # reported after run_pipeline has exported and closed
        else:
            report(phase.index, metrics, final=False)

    with (run_dir / "trial.log").open("a") as log:
        console = Console(file=log, width=120, force_terminal=False)
        run_pipeline(
            cfg,
            trial_id,
            console=console,
            on_phase_end=on_phase_end,
            parent_run_id=context["sweep_run_id"],
            run_tags=tags,
            preflight=False,  # done once for the sweep
        )
    record.attempts[-1]["end"] = time.time()
    record.save(run_dir)
    if not pending and state_path.is_file():  # the last phase was done by an earlier attempt
        pending.update(RunState.load(state_path).phase(last).evaluation)
    report(last, pending, final=True)


@dataclass
class TrialRecord:
    """`trials/<id>/trial.json`: params, attempts (start/end), per-phase wall and overhead."""

    trial_id: str
    params: dict[str, Any]
    attempts: list[dict[str, float | None]] = field(default_factory=list)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path, trial_id: str, params: dict[str, Any]) -> TrialRecord:
        path = run_dir / TRIAL_FILE
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        return cls(trial_id, params)

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / TRIAL_FILE, self.__dict__, indent=2, default=str)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def tag_run(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# ----------------------------------------------------------------------- the sweep driver


class MlflowStatusCallback(Callback):
    """Tune callback (driver side): mark each finished trial's MLflow run at once."""

    def __init__(self, uri: str, trials_dir: str) -> None:
        self.uri, self.trials_dir = uri, trials_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        # tracking never stops the sweep; the final summary marks it again
        with contextlib.suppress(Exception):
            mark_trial(self.uri, Path(self.trials_dir) / trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        with contextlib.suppress(Exception):
            mark_trial(self.uri, Path(self.trials_dir) / trial.trial_id, "error")


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA whose rungs (each trial's metric at each milestone) survive a resumed sweep.

    Tune restores its searcher but not its scheduler: a restored ASHA would start with
    empty rungs and could no longer stop the trials that continue. This one writes its
    rungs to a JSON file after every decision and reads them back on first use.
    """

    def __init__(self, state_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._state_file = state_file
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_file)
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=False):
            for (milestone, recorded), (saved_milestone, values) in zip(
                bracket._rungs, rungs, strict=False
            ):
                if milestone == saved_milestone:
                    recorded.update(values)

    def _save(self) -> None:
        state = {"brackets": [[[m, r] for m, r in b._rungs] for b in self._brackets]}
        write_json_atomic(self._state_file, state)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def trial_status(run_dir: Path, errored: bool | None) -> tuple[str, int, int]:
    """(status, phases done, phases total) of a trial from its run directory."""
    from pipeline.run import CONFIG_FILE, STATE_FILE
    from pipeline.state import RunState

    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        return ("error" if errored else "not_started"), 0, 0
    state = RunState.load(state_path)
    cfg = validate_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    total = len(phase_plan(cfg.schedule, cfg.model.resolution))
    done = sum(ps.done for ps in state.phases.values())
    if errored:
        return "error", done, total
    return ("completed" if state.finished else "early_stopped"), done, total


def mark_trial(uri: str, run_dir: Path, status: str | None) -> str:
    """Tag the trial's pipeline run with its status; early-stopped runs end KILLED."""
    from mlflow.tracking import MlflowClient

    from pipeline.run import STATE_FILE
    from pipeline.state import RunState

    derived, _, _ = trial_status(run_dir, status == "error")
    status = status or derived
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        return status
    state = RunState.load(state_path)
    if state.parent_run_id is None:
        return status
    client = MlflowClient(uri)
    client.set_tag(state.parent_run_id, "status", status)
    end = {"early_stopped": "KILLED", "error": "FAILED", "completed": "FINISHED"}.get(status)
    if end and client.get_run(state.parent_run_id).info.status == "RUNNING":
        client.set_terminated(state.parent_run_id, status=end)
    for ps in state.phases.values():  # a phase run left open by a killed actor
        if ps.child_run_id and client.get_run(ps.child_run_id).info.status == "RUNNING":
            client.set_terminated(ps.child_run_id, status="KILLED" if end != "FAILED" else end)
    return status


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """Resources of one trial's Train workers (the driver's own are separate)."""
    s = sweep.trial_cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    return need


def concurrency(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once (or the spec's limit)."""
    need = trial_resources(sweep)
    fits = min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0) if need else 1
    if fits < 1:
        have = {k: cluster.get(k, 0) for k in need}
        raise ConfigError(
            f"trial.scaling: one trial's workers need {need}, the cluster has {have}; "
            "lower scaling.num_workers / cpus_per_worker in trial"
        )
    limit = sweep.spec.search.max_concurrent_trials
    return min(fits, limit) if limit else fits


def make_tuner_parts(sweep: Sweep, sweep_run_id: str) -> tuple[Any, dict[str, Any]]:
    """(trainable, param_space) for a new or restored Tuner."""
    from ray import tune

    context = {
        "trial_raw": sweep.trial_raw,
        "metric": sweep.spec.search.metric,
        "tracking_uri": sweep.tracking_uri,
        "sweep_run_id": sweep_run_id,
        "sweep_name": sweep.name,
    }
    d = sweep.spec.trial_driver
    resources = {"CPU": d.cpus, "memory": int(d.memory_mb * 2**20)}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, context=context), resources)
    space = {dim.key: dim.to_tune(sweep.spec.search.algorithm) for dim in sweep.dimensions}
    return trainable, space


def trial_dirname(trial) -> str:
    return trial.trial_id


def make_tuner(sweep: Sweep, sweep_run_id: str, max_concurrent: int):
    """A new Tuner for the sweep."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    s, sch = sweep.spec.search, sweep.spec.scheduler
    trainable, space = make_tuner_parts(sweep, sweep_run_id)
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher, limit = OptunaSearch(seed=s.seed), max_concurrent
    else:  # a SearchGenerator: Tune ignores TuneConfig's limit for it, it takes its own
        searcher, limit = (
            BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent),
            None,
        )
    if sch.type == "asha":
        scheduler = ResumableASHA(
            str(sweep.sweep_dir / ASHA_FILE),
            time_attr=TIME_ATTR,
            max_t=sch.max_t or sweep.trial_phases,
            grace_period=sch.grace_period,
            reduction_factor=sch.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            num_samples=num_samples(sweep.spec),
            search_alg=searcher,
            scheduler=scheduler,
            max_concurrent_trials=limit,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=str(sweep.sweep_dir),
            callbacks=[MlflowStatusCallback(sweep.tracking_uri, str(sweep.sweep_dir / "trials"))],
            verbose=1,
        ),
    )


def num_samples(spec: TuneSpec) -> int:
    """Explicit, else 1 for a grid (each point once), else 4."""
    if spec.search.num_samples is not None:
        return spec.search.num_samples
    return 1 if spec.search.algorithm == "grid" else 4


def sweep_params(sweep: Sweep) -> dict[str, str]:
    """The sweep run's MLflow params."""
    from pipeline.tracking import flatten

    spec = sweep.spec.model_dump(mode="json", exclude={"base", "search_space", "trial"})
    params = flatten(spec)
    params.update({f"search_space.{d.key}": d.describe() for d in sweep.dimensions})
    params.update({f"trial.{k}": v for k, v in flatten(sweep.spec.trial).items()})
    params["trial.phases"] = str(sweep.trial_phases)
    return params


def start_sweep(
    sweep: Sweep, address: str | None = None, console: Console | None = None
) -> SweepResult:
    """Run a new sweep to the end; returns the summary (refuses an existing sweep dir)."""
    console = console or Console()
    if (sweep.sweep_dir / SPEC_FILE).exists() or (sweep.sweep_dir / "ray").exists():
        raise ConfigError(
            f"name: sweep {sweep.name} exists in {sweep.sweep_dir}; "
            f"continue it with --resume {sweep.sweep_dir}, or choose another name"
        )
    prepare_data(sweep, console)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
    from pipeline.run import init_ray

    init_ray(address or sweep.base_cfg.ray_address)
    preflight_trials(sweep, console)
    import ray

    max_concurrent = concurrency(sweep, ray.cluster_resources())
    tracker = sweep_tracker(sweep)
    sweep_run_id = tracker.start_run(
        sweep.name,
        {"tune.sweep": sweep.name, "sweep_dir": str(sweep.sweep_dir), "kind": "tune-sweep"},
    )
    tracker.log_params(sweep_run_id, sweep_params(sweep))
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    spec_dump = {**sweep.spec.model_dump(), "name": sweep.name}
    (sweep.sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec_dump, sort_keys=False))
    info = {"name": sweep.name, "mlflow_run_id": sweep_run_id, "tracking_uri": sweep.tracking_uri}
    (sweep.sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2))
    tracker.log_artifact(sweep_run_id, sweep.sweep_dir / SPEC_FILE)
    console.print(
        f"sweep [bold]{sweep.name}[/] in {sweep.sweep_dir}: {describe_plan(sweep, max_concurrent)}"
    )
    tuner = make_tuner(sweep, sweep_run_id, max_concurrent)
    return execute(tuner, sweep, sweep_run_id, tracker, console)


def resume_sweep(
    sweep_dir: str | os.PathLike,
    address: str | None = None,
    console: Console | None = None,
    retry_errored: bool = False,
) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue."""
    from ray import tune

    console = console or Console()
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir() and len(sweep_dir.parts) == 1:  # a bare name: the default root
        sweep_dir = Path("runs") / "tune" / sweep_dir
    sweep_dir = sweep_dir.resolve()
    if not (sweep_dir / SPEC_FILE).is_file() or not (sweep_dir / SWEEP_FILE).is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a sweep directory (no {SPEC_FILE})")
    raw = yaml.safe_load((sweep_dir / SPEC_FILE).read_text())
    sweep = build_sweep(raw, sweep_dir)
    info = json.loads((sweep_dir / SWEEP_FILE).read_text())
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
    from pipeline.run import init_ray

    init_ray(address or sweep.base_cfg.ray_address)
    preflight_trials(sweep, console)
    experiment = sweep_dir / "ray"
    if not tune.Tuner.can_restore(str(experiment)):
        raise ConfigError(f"--resume: {experiment} holds no Tune experiment to restore")
    tracker = sweep_tracker(sweep)
    tracker.reopen(info["mlflow_run_id"])
    trainable, space = make_tuner_parts(sweep, info["mlflow_run_id"])
    tuner = tune.Tuner.restore(
        str(experiment),
        trainable=trainable,
        param_space=space,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=retry_errored,
    )
    console.print(f"resuming sweep [bold]{sweep.name}[/] in {sweep_dir}")
    return execute(tuner, sweep, info["mlflow_run_id"], tracker, console)


def sweep_tracker(sweep: Sweep):
    from pipeline.tracking import Tracker

    return Tracker(
        sweep.tracking_uri,
        sweep.trial_cfg.tracking.experiment,
        Path(sweep.base_cfg.run.root) / "mlartifacts",
    )


def prepare_data(sweep: Sweep, console: Console) -> None:
    """Prepare the dataset once, at the base's full resolution, before trials share it."""
    from pipeline.run import ensure_dataset

    base = validate_config(absolute_paths(sweep.base_raw))
    ensure_dataset(base, phase_plan(base.schedule, base.model.resolution), console)
    trial = sweep.trial_cfg
    ensure_dataset(trial, phase_plan(trial.schedule, trial.model.resolution), console)


def preflight_trials(sweep: Sweep, console: Console) -> None:
    """The pipeline's cluster checks once for the sweep (trials skip their own)."""
    from pipeline.run import check_cluster, worker_env

    cfg, uri = sweep.trial_cfg, sweep.tracking_uri
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    check_cluster(cfg, uri, plan, str(sweep.sweep_dir), worker_env(uri))
    console.print("preflight: nodes ok")


def describe_plan(sweep: Sweep, max_concurrent: int) -> str:
    s, sch = sweep.spec.search, sweep.spec.scheduler
    stop = (
        f"ASHA (grace {sch.grace_period}, reduction {sch.reduction_factor:g}, "
        f"max_t {sch.max_t or sweep.trial_phases} phases)"
        if sch.type == "asha"
        else "no early stopping"
    )
    return (
        f"{s.algorithm} search, num_samples {num_samples(sweep.spec)}, "
        f"{s.metric} ({s.mode}), {stop}; "
        f"trials of {sweep.trial_phases} phases up to {sweep.trial_cfg.model.resolution}x"
        f"{sweep.trial_cfg.model.resolution}, {max_concurrent} at a time"
    )


def execute(tuner, sweep: Sweep, sweep_run_id: str, tracker, console: Console) -> SweepResult:
    """Fit, then mark, summarise and pick the best; the sweep run ends FINISHED."""
    started = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.finish(sweep_run_id, "FAILED")
        raise
    # Ctrl-C (or SIGUSR1) makes Tune save its state and return as if done; the saved state
    # (what --resume restores) still has the unfinished trials RUNNING or PENDING.
    unfinished = [
        t for t, status in saved_statuses(sweep).items() if status not in ("TERMINATED", "ERROR")
    ]
    if unfinished:
        tracker.finish(sweep_run_id, "KILLED")
        raise SweepInterrupted(
            f"sweep interrupted with {len(unfinished)} trial(s) unfinished; continue it with: "
            f"progan tune --resume {sweep.sweep_dir}"
        )
    errored = {r.path and Path(r.path).name: r.error is not None for r in grid}
    rows = collect_rows(sweep, errored)
    best = pick_best(rows, sweep.spec.search.mode)
    best_path = write_best(sweep, best) if best else None
    md, csv_text = summary_markdown(sweep, rows, best), summary_csv(sweep, rows)
    (sweep.sweep_dir / "summary.md").write_text(md)
    (sweep.sweep_dir / "summary.csv").write_text(csv_text)
    for name in ("summary.md", "summary.csv"):
        tracker.log_artifact(sweep_run_id, sweep.sweep_dir / name)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
    if best:
        tracker.log_artifact(sweep_run_id, best_path)
        metrics[f"best_{sweep.spec.search.metric}"] = float(best.last_metric)
        tags = {"best_trial": best.trial_id, "best_params": params_text(best.params)}
        tag_run(sweep.tracking_uri, sweep_run_id, tags)
        if best.mlflow_run_id:
            tag_run(sweep.tracking_uri, best.mlflow_run_id, {"tune.best": "true"})
    tracker.log_metrics(sweep_run_id, metrics, 0)
    tracker.finish(sweep_run_id)
    console.print(summary_table(sweep, rows, best))
    wall = time.perf_counter() - started
    return SweepResult(
        sweep.sweep_dir, rows, best, best_path, sweep.tracking_uri, sweep_run_id, wall
    )


def saved_statuses(sweep: Sweep) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state."""
    import logging

    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # trials without results yet are not worth a warning
    try:
        analysis = ExperimentAnalysis(str(sweep.sweep_dir / "ray"))
    finally:
        quiet.setLevel(level)
    return {t.trial_id: t.status for t in analysis.trials}


def collect_rows(sweep: Sweep, errored: dict[str, bool]) -> list[TrialRow]:
    """One row per trial that Tune knows of, from its run directory."""
    from pipeline.run import STATE_FILE
    from pipeline.state import RunState

    trials_dir = sweep.sweep_dir / "trials"
    metric = sweep.spec.search.metric
    rows = []
    for trial_id in sorted(errored):
        run_dir = trials_dir / trial_id
        status = mark_trial(sweep.tracking_uri, run_dir, "error" if errored[trial_id] else None)
        _, done, total = trial_status(run_dir, errored[trial_id])
        record = TrialRecord.load(run_dir, trial_id, {}) if run_dir.is_dir() else None
        params = record.params if record else {}
        row = TrialRow(trial_id, params, status, done, total or sweep.trial_phases)
        if (run_dir / STATE_FILE).is_file():
            state = RunState.load(run_dir / STATE_FILE)
            row.mlflow_run_id = state.parent_run_id
            plan = phase_plan(sweep.trial_cfg.schedule, sweep.trial_cfg.model.resolution)
            values = [
                (int(i), ps.evaluation[metric])
                for i, ps in state.phases.items()
                if ps.done and metric in ps.evaluation
            ]
            if values:
                values.sort()
                row.last_metric = values[-1][1]
                row.last_resolution = plan[values[-1][0]].resolution
                pick = min if sweep.spec.search.mode == "min" else max
                row.best_metric = pick(v for _, v in values)
        if record:
            row.attempts = len(record.attempts)
            row.wall_s = attempts_wall(record)
            row.overhead_s = sum(p.get("ray_overhead_s", 0.0) for p in record.phases.values())
            row.extra["trained_wall_s"] = sum(p.get("wall_s", 0.0) for p in record.phases.values())
            row.extra["eval_s"] = sum(p.get("eval_seconds", 0.0) for p in record.phases.values())
        rows.append(row)
    return rows


def attempts_wall(record: TrialRecord) -> float:
    """Seconds the trial ran, over all its attempts; a stopped attempt ends at its last phase."""
    ends = sorted(p["ended"] for p in record.phases.values() if "ended" in p)
    total = 0.0
    for a in record.attempts:
        end = a["end"] or max([t for t in ends if t >= a["start"]], default=a["start"])
        total += end - a["start"]
    return total


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Deepest trial first (a metric at a higher resolution is not comparable), then metric."""
    scored = [r for r in rows if r.last_metric is not None and r.status != "error"]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda r: (-r.phases_done, sign * r.last_metric))


def write_best(sweep: Sweep, best: TrialRow) -> Path:
    """The base config (full size) with the best trial's sampled values: `progan run` input."""
    raw = sweep.base_raw
    for key, value in best.params.items():
        raw = merge(raw, nested(key, value))
    cfg = validate_config(raw)
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


def _cells(sweep: Sweep, row: TrialRow) -> list[str]:
    metric = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    share = f"{100 * row.overhead_s / row.wall_s:.0f}" if row.wall_s else ""
    return [
        row.trial_id,
        *[fmt(row.params.get(d.key, "")) for d in sweep.dimensions],
        metric(row.best_metric),
        metric(row.last_metric),
        "" if row.last_resolution is None else str(row.last_resolution),
        f"{row.phases_done}/{row.phases_total}",
        row.status,
        f"{row.wall_s:.0f}",
        f"{row.overhead_s:.0f}",
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
        "phases",
        "status",
        "wall s",
        "Ray overhead s",
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
        describe_plan(sweep, sweep.spec.search.max_concurrent_trials or 0).replace(
            ", 0 at a time", ""
        ),
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
    plan = phase_plan(sweep.trial_cfg.schedule, sweep.trial_cfg.model.resolution)
    limit = sweep.spec.search.max_concurrent_trials
    lines = [
        f"sweep {sweep.name} -> {sweep.sweep_dir} (nothing was run)",
        describe_plan(sweep, limit or 0).replace(", 0 at a time", ", as many at a time as fit"),
        f"each trial: {trial_resources(sweep)} for its Train workers",
        "search space:",
        *[f"  {d.key}: {d.describe()}" for d in sweep.dimensions],
        "trial phases:",
        *[
            f"  {p.index}: {p.name} {p.num_images / 1000:g} kimg, batch {p.batch_size}, lr {p.lr:g}"
            for p in plan
        ],
        f"best.yaml: the base at {sweep.base_cfg.model.resolution}x"
        f"{sweep.base_cfg.model.resolution} with the best trial's values",
    ]
    return "\n".join(lines)
