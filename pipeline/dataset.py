"""The prepared dataset a config trains on: made from `data.source` if needed, then checked.

Nothing here imports Ray or MLflow at module level, so a bare GPU host with torch, lmdb,
pydantic and PyYAML can use it (preparing itself needs Ray and facenet-pytorch).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.config import BUILTIN_SAMPLE_FACES, ConfigError, PipelineConfig
from preprocessing.object_store import display


def ensure_dataset(cfg: PipelineConfig, console: Console | None) -> None:
    """Prepare `data.dataset` (a folder or a URI) from `data.source` if needed; check that
    it has every planned resolution (in object storage: without downloading)."""
    from preprocessing.lmdb_store import MANIFEST, available_resolutions

    dataset = cfg.data.dataset
    if not is_finished(dataset):
        if cfg.data.source is None:
            raise ConfigError(
                f"data.dataset: {dataset} is not a prepared dataset (no {MANIFEST}) and "
                "data.source is not set; run `progan prepare SOURCE "
                f"{dataset} --resolution {cfg.model.resolution}` first"
            )
        prepare_source(cfg, console or Console())
    have = available_resolutions(dataset)
    missing = sorted(set(cfg.planned_resolutions) - set(have))
    if missing:
        raise ConfigError(
            f"data.dataset: {dataset} has no LMDB for resolution(s) {missing} (it has "
            f"{have}); prepare it with --resolution {cfg.model.resolution}"
        )
    check_enough_for_evaluation(cfg)


def is_finished(dataset: str) -> bool:
    """The dataset (a folder or a URI) has its manifest: it is complete."""
    from preprocessing.lmdb_store import read_manifest

    try:
        read_manifest(dataset)
    except FileNotFoundError:
        return False
    except OSError as err:  # object storage that does not answer
        raise ConfigError(
            f"data.dataset: {display(dataset)} is not reachable ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]})"
        ) from None
    return True


def local_dataset(cfg: PipelineConfig, resolutions: list[int]) -> str:
    """`data.dataset` as a folder this process reads: the folder itself, or (object
    storage) this node's staged copy of `resolutions` (see preprocessing.staging)."""
    from preprocessing.staging import stage

    max_bytes = int(cfg.data.cache_max_gb * 1e9)
    return str(stage(cfg.data.dataset, resolutions, cfg.data.cache_dir, max_bytes))


def check_enough_for_evaluation(cfg: PipelineConfig) -> None:
    """Refuse, before any training, a dataset too small for the end-of-phase evaluation
    (it would fail at every phase end)."""
    from pipeline.evaluation import MIN_IMAGES
    from preprocessing.lmdb_store import read_manifest

    if not (cfg.eval.enabled and cfg.eval.metrics):
        return
    counts = read_manifest(cfg.data.dataset).get("counts", {})
    for res in sorted(cfg.planned_resolutions):
        n = int(counts.get(str(res), MIN_IMAGES))
        if n < MIN_IMAGES:
            raise ConfigError(
                f"data.dataset: {cfg.data.dataset} has only {n} images at {res}x{res}; the "
                f"end-of-phase evaluation needs at least {MIN_IMAGES}: prepare more photos, "
                "or set eval.enabled=false"
            )


def prepare_source(cfg: PipelineConfig, console: Console) -> None:
    """Run `progan prepare` for data.source with data.prepare's options (making the built-in
    sample faces if asked). Preparing runs MTCNN on Ray (see preprocessing.prepare): that
    needs Ray and facenet-pytorch, which training alone does not."""
    from preprocessing.prepare import prepare_dataset
    from preprocessing.samples import make_sample_faces

    source = cfg.data.source
    if source == BUILTIN_SAMPLE_FACES:
        folder = Path(cfg.run.root) / "sample-faces"
        console.print(f"making {cfg.data.sample_faces} built-in sample faces in {folder}")
        source = str(make_sample_faces(folder, n=cfg.data.sample_faces, seed=0))
    elif source is not None and not Path(source).exists():
        raise ConfigError(f"data.source: {source} does not exist")
    console.print(f"preparing {source} -> {cfg.data.dataset}")
    options = cfg.data.prepare.model_dump()
    summary = prepare_dataset(
        source, cfg.data.dataset, cfg.model.resolution, progress=True, **options
    )
    console.print(
        f"prepared {summary.records} faces from {summary.inputs} inputs "
        f"({summary.rejected} rejected: {summary.reject_reasons})"
    )
