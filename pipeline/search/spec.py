"""Tune specs: a `conf/tune/*.yaml` file validated completely before Ray starts.

A spec names a base pipeline config, overrides that shrink each trial (`trial:`), a search
space over dotted config keys, a searcher and a scheduler (ASHA, PBT or FIFO) whose budgets
are in kimg (thousands of images shown). A bad entry is one `ConfigError` line naming the
key. `pipeline.search.sweep` runs a `Sweep`; `pipeline.search.trial` is what each trial runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from pipeline.config import (
    ConfigError,
    PipelineConfig,
    absolute_paths,
    describe,
    int_keys,
    merge,
    nested,
    parse_overrides,
    read_yaml_mapping,
    validate_config,
)
from pipeline.search.space import (
    Dimension,
    check_config_key,
    flatten_space,
    one_line,
    parse_dimension,
    validate_value,
)
from preprocessing.object_store import is_uri, join
from progan.config import StrictModel
from progan.metrics.catalogue import metric_of_key
from progan.schedule import Phase

# Tune saves its experiment state at most this often (default: every 10 s or more); a
# killed sweep resumes from the last save, so keep the window of redone work short.
CHECKPOINT_PERIOD_S = "2"
# Keys the sweep itself sets for every trial: not searchable, not overridable per trial.
SWEEP_KEYS = ("run.root", "tracking.uri", "ray_address")
SPEC_FILE = "tune.yaml"
SWEEP_FILE = "sweep.json"
SCHEDULER_FILE = "scheduler.pkl"  # the scheduler's own save(): what a resumed sweep restores


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
    """When trials stop early (ASHA) or copy and perturb each other (PBT); budgets in kimg."""

    type: Literal["asha", "pbt", "fifo"] = "asha"
    grace_period: float | None = Field(
        None,
        gt=0,
        description="ASHA: kimg before a trial may be stopped (default: the end "
        "of the first phase that has the metric)",
    )
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep 1/reduction_factor")
    max_t: float | None = Field(None, gt=0, description="ASHA: kimg (default: a whole trial)")
    perturbation_interval: float | None = Field(
        None,
        gt=0,
        description="PBT: kimg between exploit/explore steps (default: the first "
        "measured phase's end, so that they fall on phase ends)",
    )
    quantile_fraction: float = Field(
        0.5, gt=0, le=0.5, description="PBT: the bottom fraction copies the top fraction"
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="PBT: explore by resampling (else scale by 0.8 or 1.2)"
    )
    synchronous: bool = Field(
        False, description="PBT: wait for every trial at each step (needs all of them running)"
    )


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
    storage_path: str | None = Field(
        None,
        description="Tune's storage for the trials' checkpoints and its state (a path every "
        "node sees, or a URI: s3://bucket/tune), in a folder named after the sweep "
        "(default: <sweep dir>/ray)",
    )


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial ended (Ctrl-C); the sweep can be resumed."""


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
    def experiment_location(self) -> tuple[str, str]:
        """Tune's RunConfig (storage_path, name): the spec's `storage_path` (a path or URI)
        and the sweep's name, or the sweep dir and "ray"."""
        shared = self.spec.storage_path
        return (shared, self.name) if shared else (str(self.sweep_dir), "ray")

    @property
    def experiment(self) -> str:
        """Tune's experiment folder (a path or URI)."""
        return join(*self.experiment_location)

    @property
    def plan(self) -> list[Phase]:
        """The phases of every trial."""
        return self.trial_cfg.plan

    @property
    def trial_phases(self) -> int:
        return len(self.plan)

    @property
    def trial_kimg(self) -> float:
        """A whole trial's budget, in kimg."""
        return self.plan[-1].end_images / 1000

    @property
    def first_measured_kimg(self) -> float:
        """kimg at the end of the first phase that has the metric (SWD needs 8x8)."""
        return first_measured_kimg(self.plan, self.spec.search.metric)


# ---------------------------------------------------------------- spec loading + validation


def load_spec_dict(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The tune YAML with overrides applied and `base` loaded (relative to the YAML's folder)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "tune spec", "a mapping (base, trial, search_space, search...)")
    extra = parse_overrides(overrides or [])
    base_extra = extra.pop("base") if isinstance(extra.get("base"), dict) else {}
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
    if base_extra:  # base.KEY=VALUE overrides the base config's keys
        raw["base"] = merge(raw.get("base") or {}, base_extra)
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
        validate_config(merge(base_raw, int_keys(spec.trial)))  # errors named after `trial`
    except ConfigError as err:
        raise ConfigError(f"trial: {err}") from None

    if spec.storage_path and not is_uri(spec.storage_path):  # as any node sees it
        spec.storage_path = str(Path(spec.storage_path).absolute())
    name = spec.name or "sweep"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"name: {name!r} must be a plain directory name")
    sweep_dir = (sweep_dir or Path(base_cfg.run.root) / "tune" / name).resolve()
    from pipeline.tracking.secrets import redact_uri
    from pipeline.tracking.tracker import resolve_uri

    uri = resolve_uri(base_cfg.tracking.uri, base_cfg.run.root)
    trial_raw = absolute_paths(merge(base_raw, int_keys(spec.trial)))
    trial_raw = merge(trial_raw, {"run": {"root": str(sweep_dir / "trials")}})
    # trials get the URI without its password (Tune records their config and context; a
    # trial takes the password from its environment: pipeline.tracking.secrets)
    trial_raw = merge(trial_raw, {"tracking": {"uri": redact_uri(uri)}, "ray_address": None})
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
    check_scheduler(spec, trial_cfg)
    if algorithm == "optuna":
        searcher_available("optuna")
    return Sweep(name, base_raw, trial_raw, dims, spec, base_cfg, trial_cfg, sweep_dir, uri)


def num_samples(spec: TuneSpec) -> int:
    """Explicit, else 1 for a grid (each point once), else 4."""
    if spec.search.num_samples is not None:
        return spec.search.num_samples
    return 1 if spec.search.algorithm == "grid" else 4


def first_measured_kimg(plan: list[Phase], metric: str) -> float:
    """kimg at the end of the first phase whose resolution has `metric` (the catalogue's
    smallest resolution of the metric that reports it)."""
    info = metric_of_key(metric)
    min_res = info.min_resolution if info else plan[0].resolution
    first = next((p for p in plan if p.resolution >= min_res), plan[-1])
    return first.end_images / 1000


def check_scheduler(spec: TuneSpec, cfg: PipelineConfig) -> None:
    """Budgets within a trial's kimg; PBT only where it can change configs and hand over
    checkpoints (single-worker trials, which report a Tune checkpoint every time)."""
    plan = cfg.plan
    sch, total = spec.scheduler, plan[-1].end_images / 1000
    first = first_measured_kimg(plan, spec.search.metric)
    max_t = sch.max_t or total
    if sch.type == "asha":
        if max_t > total:
            raise ConfigError(f"scheduler.max_t: {max_t:g} kimg exceeds a trial's {total:g} kimg")
        if (sch.grace_period or first) > max_t:
            raise ConfigError(
                f"scheduler.grace_period: {sch.grace_period:g} kimg exceeds max_t {max_t:g} kimg "
                f"(a trial trains {total:g} kimg in {len(plan)} phases)"
            )
    if sch.type == "pbt":
        if spec.search.algorithm == "optuna":
            raise ConfigError(
                "scheduler.type: pbt changes trial configs itself; use search.algorithm "
                "random or grid with it"
            )
        if cfg.scaling.max_workers > 1:
            raise ConfigError(
                "scheduler.type: pbt needs single-worker trials (trial.scaling.num_workers: 1)"
            )
        if (sch.perturbation_interval or first) >= total:
            raise ConfigError(
                f"scheduler.perturbation_interval: {sch.perturbation_interval or first:g} kimg "
                f"leaves no step inside a trial of {total:g} kimg"
            )


def _has(section: dict[str, Any], dotted: str) -> bool:
    node: Any = section
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_metric(spec: TuneSpec, cfg: PipelineConfig) -> None:
    """The metric must be one the trial's end-of-phase evaluation reports
    (progan.metrics.catalogue)."""
    metric = spec.search.metric
    info = metric_of_key(metric)
    if info is None:
        raise ConfigError(
            f"search.metric: {metric!r} is not an end-of-phase metric; use SWDx1e3_avg, "
            "SWDx1e3_<res>, msssim_fake, fid or kid"
        )
    if not cfg.eval.enabled or info.name not in cfg.eval.metrics:
        raise ConfigError(
            f"search.metric: {metric} needs eval.enabled and '{info.name}' in eval.metrics "
            f"of the trial config (it has enabled={cfg.eval.enabled}, "
            f"metrics={cfg.eval.metrics})"
        )
    if cfg.model.resolution < info.min_resolution:
        raise ConfigError(
            f"search.metric: {metric} is measured from {info.min_resolution}x"
            f"{info.min_resolution}; the trial's model.resolution is {cfg.model.resolution}"
        )


def searcher_available(name: str) -> None:
    """Raise a one-line error if a model-based searcher's package is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConfigError(
            f"search.algorithm: '{name}' needs the {name} package, an optional extra "
            f"(pip install 'progan-pipeline[tune]'); "
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
