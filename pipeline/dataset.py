"""The prepared dataset a config trains on: made from `data.source` if needed, then checked.

Nothing here imports Ray or MLflow at module level, so a bare GPU host with torch, lmdb,
pydantic and PyYAML can use it (preparing itself needs Ray and facenet-pytorch).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.config import BUILTIN_SAMPLE_FACES, ConfigError, PipelineConfig


def ensure_dataset(cfg: PipelineConfig, console: Console | None) -> None:
    """Prepare `data.dataset` from `data.source` if needed; check every planned LMDB."""
    from preprocessing.lmdb_store import MANIFEST, available_resolutions

    dataset = Path(cfg.data.dataset)
    if not (dataset / MANIFEST).is_file():
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
