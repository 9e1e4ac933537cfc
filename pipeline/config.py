"""Pipeline configuration: YAML + `key=value` overrides -> one validated PipelineConfig.

The model/train/schedule sections are progan's own GANConfig sections; the others say
where data, runs and tracking live and how many Ray workers a phase uses. Every problem
is a `ConfigError` whose one-line message names the key and what is allowed, raised
before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from progan.config import (
    GANConfig,
    ModelConfig,
    ScheduleConfig,
    StrictModel,
    TrainConfig,
    check_resolution,
)
from progan.schedule import phase_plan

BUILTIN_SAMPLE_FACES = "builtin:sample-faces"


class ConfigError(ValueError):
    """A bad configuration, in one line naming the key."""


class DataConfig(StrictModel):
    """Where the prepared dataset is, and optionally how to make it first."""

    dataset: str = Field(description="prepared dataset directory (output of `progan prepare`)")
    source: str | None = Field(
        None,
        description="photos to prepare into `dataset` first if it is not complete "
        f"(folder, zip, list file, or '{BUILTIN_SAMPLE_FACES}')",
    )
    sample_faces: int = Field(300, ge=8, description="images made for the built-in sample")
    prepare: dict[str, Any] = Field(default_factory=dict, description="prepare options")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    preload_mb: float = Field(
        1024,
        ge=0,
        description="a resolution's images up to this size are loaded once onto each "
        "worker's device (GPU memory, or RAM on a CPU) and batches gathered there; 0: stream",
    )


class ScalingSection(StrictModel):
    """Ray Train workers per phase."""

    num_workers: int | dict[int, int] = Field(
        1,
        description="workers of every phase, or a map by resolution ({4: 1, 64: 2, 256: 8}): "
        "each key's count holds from that resolution up to the next key",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker needs (e.g. {trainer_node: 1} to place "
        "workers on the nodes that advertise it)",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _int_or_map(cls, value: Any) -> Any:
        """One error naming the key (not one per branch of the union) for anything else."""
        if isinstance(value, dict):
            return value
        try:
            return TypeAdapter(int).validate_python(value)
        except ValidationError:
            raise PydanticCustomError(
                "int_parsing",
                "Input should be a valid integer or a map of resolution to workers, got {value}",
                {"value": repr(value)},
            ) from None

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, value: int | dict[int, int]) -> int | dict[int, int]:
        counts = value.values() if isinstance(value, dict) else [value]
        if not counts or min(counts) < 1:
            raise ValueError(f"needs at least 1 worker everywhere, got {value}")
        for res in value if isinstance(value, dict) else []:
            check_resolution(res)
        return value

    def workers_for(self, resolution: int) -> int:
        """Workers of a phase at `resolution` (below the smallest key: the smallest key's)."""
        if isinstance(self.num_workers, int):
            return self.num_workers
        keys = sorted(self.num_workers)
        at_or_below = [k for k in keys if k <= resolution]
        return self.num_workers[at_or_below[-1] if at_or_below else keys[0]]

    @property
    def max_workers(self) -> int:
        """The most workers any phase uses."""
        n = self.num_workers
        return max(n.values()) if isinstance(n, dict) else n

    @property
    def worker_resources(self) -> dict[str, float]:
        """Everything one training worker asks Ray for."""
        out = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out


class RunSection(StrictModel):
    """Run directory, checkpoint cadence and Ray Train fault tolerance."""

    root: str = "runs"
    storage_path: str | None = Field(
        None,
        description="Ray Train storage every node shares: a path, or a URI pyarrow reads "
        "(s3://, gs://, file://), kept as given (default: <run dir>/ray, one machine only)",
    )
    checkpoint_every_kimg: float = Field(10.0, gt=0)
    log_every_kimg: float = Field(1.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)
    sample_grid: int = Field(16, ge=1, description="fixed latents in each sample grid")


class TrackingSection(StrictModel):
    """MLflow."""

    uri: str | None = Field(
        None,
        description="default: $MLFLOW_TRACKING_URI, else SQLite under run.root (one machine "
        "only: a cluster needs a tracking server's http(s) URI)",
    )
    experiment: str = "progan"
    registered_model: str | None = Field(
        None,
        description="MLflow registered model each finished run adds a version of "
        "(default: the experiment's name; '' logs the model without registering it)",
    )
    log_checkpoints: bool = Field(
        False,
        description="also copy each phase's final checkpoint into MLflow (Ray storage holds "
        "them already; the phase runs are tagged with their URIs)",
    )
    system_metrics_interval_s: float = Field(
        10.0, ge=0, description="MLflow system metrics sampling on phase runs (0: off)"
    )


class EvalSection(StrictModel):
    """Metrics at the end of each phase."""

    metrics: list[Literal["swd", "msssim", "fid", "kid"]] = Field(default_factory=lambda: ["swd"])
    num_images: int = Field(512, ge=8)
    fid_weights: str | None = Field(None, description="pt_inception-2015-12-05 file (FID/KID)")
    enabled: bool = True

    @model_validator(mode="after")
    def _fid_weights(self) -> EvalSection:
        needs = sorted({"fid", "kid"} & set(self.metrics))
        if self.enabled and needs and not (self.fid_weights and Path(self.fid_weights).is_file()):
            raise ValueError(
                f"metrics {needs} need eval.fid_weights, the pt_inception-2015-12-05 weights "
                f"file (see docs/metrics.md); got {self.fid_weights!r}"
            )
        return self


class PipelineConfig(StrictModel):
    """Everything `progan run` needs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    data: DataConfig
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        self.gan  # start resolution vs model resolution  # noqa: B018
        if self.model.arch == "dcgan" and self.schedule.start_resolution != self.model.resolution:
            raise ValueError(
                f"schedule.start_resolution must equal model.resolution "
                f"({self.model.resolution}) for arch 'dcgan', which does not grow"
            )
        for phase in phase_plan(self.schedule, self.model.resolution):
            workers = self.scaling.workers_for(phase.resolution)
            if phase.batch_size % workers:
                raise ValueError(
                    f"schedule.batch_size at {phase.resolution}: batch {phase.batch_size} is "
                    f"not divisible by scaling.num_workers={workers}"
                )
            if phase.batch_size // workers < 2 and self.model.mbstd_group_size > 1:
                raise ValueError(
                    f"schedule.batch_size at {phase.resolution}: {phase.batch_size} over "
                    f"{workers} workers leaves 1 image per worker; minibatch-stddev needs >= 2"
                )
        return self

    @property
    def gan(self) -> GANConfig:
        """The progan part of the config."""
        return GANConfig(model=self.model, train=self.train, schedule=self.schedule)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.loss=wgan', 'model.fmap_max=256'] -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# Config keys that hold filesystem paths (a URI, or the built-in sample, is left as it is).
PATH_KEYS = (
    ("data", "dataset"),
    ("data", "source"),
    ("run", "root"),
    ("run", "storage_path"),
    ("eval", "fid_weights"),
)


def is_uri(value: str) -> bool:
    """'s3://bucket/x', 'file:///x' (and 'builtin:sample-faces'): not a plain path."""
    return "://" in value or value == BUILTIN_SAMPLE_FACES


def absolute_paths(raw: dict[str, Any], base: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of a raw config whose relative paths are made absolute against `base`
    (default: the working directory), so that any process, directory or node that sees the
    same filesystem reads the same files. URIs are kept as given."""
    base = Path(base or Path.cwd()).absolute()
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, key in PATH_KEYS:
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and value and not is_uri(value):
            out[section][key] = os.path.normpath(base / Path(value).expanduser())
    return out


def allowed_keys(model: type[StrictModel], loc: tuple) -> list[str]:
    """The field names accepted at `loc` (for 'unknown key' messages)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, StrictModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def describe(err: ValidationError, model: type[StrictModel] | None = None) -> str:
    """The first validation problem as 'key: what is wrong (allowed ...)'."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        allowed = allowed_keys(model or PipelineConfig, loc)
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    got = repr(first.get("input"))
    got = "" if got in msg or isinstance(first.get("input"), dict) else f"; got {got}"
    return f"{key}: {msg}{got}{more}" if loc else f"{msg}{more}"


def load_config_dict(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The raw YAML with overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return merge(raw, parse_overrides(overrides or []))


def validate_config(raw: dict) -> PipelineConfig:
    """Validate a raw dict into a PipelineConfig or raise a one-line ConfigError."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    base: str | os.PathLike | None = None,
) -> PipelineConfig:
    """YAML file + overrides -> validated PipelineConfig, relative paths made absolute
    against `base` (default: the working directory, where the user typed them)."""
    return validate_config(absolute_paths(load_config_dict(path, overrides), base))


def dump_config(cfg: PipelineConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML that `load_config` accepts as is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
