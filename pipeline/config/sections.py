"""The sections of a pipeline config and `PipelineConfig` itself (pydantic, strict).

The model/train/schedule sections are progan's own GANConfig sections; the others say
where data, runs and tracking live and how many Ray workers a phase uses. A field (or a
whole section) marked `json_schema_extra=RESUMABLE` may change when a run is continued:
it changes how training runs or is watched, never what is trained (`pipeline.config.changes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from preprocessing.config import PrepareOptions
from progan.config import (
    RESUMABLE,
    GANConfig,
    ModelConfig,
    ScheduleConfig,
    StrictModel,
    TrainConfig,
    check_resolution,
)
from progan.metrics.catalogue import CATALOGUE, METRIC_NAMES
from progan.schedule import Phase, phase_plan

BUILTIN_SAMPLE_FACES = "builtin:sample-faces"


class PrepareSection(PrepareOptions):
    """How `data.source` is prepared into `data.dataset` (`progan prepare`'s options)."""

    workers: int | None = Field(
        None, ge=1, description="MTCNN actors (default: every CPU; with GPUs, every CPU but one)"
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPU share of each MTCNN actor (default: GPUs/workers)"
    )
    timeout_s: float = Field(
        1800.0, gt=0, description="seconds any one wait may take (listing, actor start, merge)"
    )


class DataConfig(StrictModel):
    """Where the prepared dataset is, and optionally how to make it first."""

    dataset: str = Field(
        description="prepared dataset (output of `progan prepare`): a directory every node "
        "sees, or a URI in object storage (s3://bucket/celeba-128, gs://...) that each node "
        "stages into data.cache_dir, one resolution at a time"
    )
    source: str | None = Field(
        None,
        description="photos to prepare into `dataset` first if it is not complete "
        f"(folder, zip, list file, or '{BUILTIN_SAMPLE_FACES}')",
        json_schema_extra=RESUMABLE,
    )
    sample_faces: int = Field(
        300, ge=8, description="images made for the built-in sample", json_schema_extra=RESUMABLE
    )
    prepare: PrepareSection = Field(
        default_factory=PrepareSection,
        description="prepare options for data.source",
        json_schema_extra=RESUMABLE,
    )
    cache_dir: str | None = Field(
        None,
        description="each node's staging cache for a dataset in object storage (default "
        "$PROGAN_CACHE_DIR or ~/.cache/progan/datasets); shared by a node's workers, runs "
        "and phases",
        json_schema_extra=RESUMABLE,
    )
    cache_max_gb: float = Field(
        100,
        gt=0,
        description="the staging cache's size limit per node: least recently used LMDBs of "
        "other resolutions and datasets are removed to stay under it",
        json_schema_extra=RESUMABLE,
    )
    loader_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per rank", json_schema_extra=RESUMABLE
    )
    preload_mb: float = Field(
        1024,
        ge=0,
        description="a resolution's images up to this size are loaded once onto each "
        "worker's device (GPU memory, or RAM on a CPU) and batches gathered there; 0: stream",
        json_schema_extra=RESUMABLE,
    )


class ScalingSection(StrictModel):
    """Ray Train workers per phase (the global batch, so what is trained, stays the same)."""

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

    root: str = Field(
        "runs",
        description="folder of run directories (a run is found under root/<run id>, "
        "wherever it moved)",
        json_schema_extra=RESUMABLE,
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train storage every node shares: a path, or a URI pyarrow reads "
        "(s3://, gs://, file://), kept as given (default: <run dir>/ray, one machine only)",
    )
    checkpoint_every_kimg: float = Field(10.0, gt=0, json_schema_extra=RESUMABLE)
    log_every_kimg: float = Field(1.0, gt=0, json_schema_extra=RESUMABLE)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=RESUMABLE)
    max_failures: int = Field(2, ge=-1, json_schema_extra=RESUMABLE)
    sample_grid: int = Field(
        16, ge=1, description="fixed latents in each sample grid", json_schema_extra=RESUMABLE
    )


class TrackingSection(StrictModel):
    """MLflow."""

    uri: str | None = Field(
        None,
        description="default: $MLFLOW_TRACKING_URI, else SQLite under run.root (one machine "
        "only: a cluster needs a tracking server's http(s) URI)",
        json_schema_extra=RESUMABLE,
    )
    experiment: str = "progan"
    registered_model: str | None = Field(
        None,
        description="MLflow registered model each finished run adds a version of "
        "(default: the experiment's name; '' logs the model without registering it)",
        json_schema_extra=RESUMABLE,
    )
    log_checkpoints: bool = Field(
        False,
        description="also copy each phase's final checkpoint into MLflow (Ray storage holds "
        "them already; the phase runs are tagged with their URIs)",
        json_schema_extra=RESUMABLE,
    )
    system_metrics_interval_s: float = Field(
        10.0,
        ge=0,
        description="MLflow system metrics sampling on phase runs (0: off)",
        json_schema_extra=RESUMABLE,
    )
    outage_wait_s: float = Field(
        900.0,
        ge=0,
        description="how long the driver waits out an MLflow server that stopped answering "
        "(a restart) before the run fails, resumable; workers never stop for it",
        json_schema_extra=RESUMABLE,
    )


class EvalSection(StrictModel):
    """Metrics at the end of each phase (progan.metrics.catalogue lists them)."""

    metrics: list[str] = Field(
        default_factory=lambda: ["swd"], description=f"any of {', '.join(METRIC_NAMES)}"
    )
    num_images: int = Field(512, ge=8)
    fid_weights: str | None = Field(None, description="pt_inception-2015-12-05 file (FID/KID)")
    enabled: bool = True

    @field_validator("metrics")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; allowed: {', '.join(METRIC_NAMES)}")
        return value

    @model_validator(mode="after")
    def _fid_weights(self) -> EvalSection:
        needs = sorted(m for m in self.metrics if CATALOGUE[m].needs_inception)
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
    scaling: ScalingSection = Field(default_factory=ScalingSection, json_schema_extra=RESUMABLE)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalSection = Field(default_factory=EvalSection, json_schema_extra=RESUMABLE)
    ray_address: str | None = Field(None, json_schema_extra=RESUMABLE)
    _plan: list[Phase] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        self.gan  # start resolution vs model resolution  # noqa: B018
        if self.model.arch == "dcgan" and self.schedule.start_resolution != self.model.resolution:
            raise ValueError(
                f"schedule.start_resolution must equal model.resolution "
                f"({self.model.resolution}) for arch 'dcgan', which does not grow"
            )
        self._plan = None  # validate_assignment: a changed section makes a new plan
        for phase in self.plan:
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
    def plan(self) -> list[Phase]:
        """The phase plan (progan.schedule.phase_plan), computed once per config."""
        if self._plan is None:
            self._plan = phase_plan(self.schedule, self.model.resolution)
        return self._plan

    @property
    def gan(self) -> GANConfig:
        """The progan part of the config."""
        return GANConfig(model=self.model, train=self.train, schedule=self.schedule)

    @property
    def planned_resolutions(self) -> list[int]:
        """The resolutions the plan trains, smallest first."""
        return sorted({p.resolution for p in self.plan})
