"""Helpers of both training drivers (`progan run` on Ray, `progan train-local` without it).

Nothing here imports Ray or MLflow at module level, so a bare GPU host with torch, lmdb,
pydantic and PyYAML can use it: making sure the prepared dataset exists, evaluating the
EMA generator at the trainer's position, exporting the standalone generator file, and
comparing two configs key by key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import (
    BUILTIN_SAMPLE_FACES,
    ConfigError,
    PipelineConfig,
    absolute_paths,
    load_config_dict,
    validate_config,
)
from progan.checkpoint import save_checkpoint
from progan.loop import LoopOptions
from progan.schedule import Phase
from progan.trainer import GANTrainer

# What `generator.pt` holds: the EMA generator, its config, and where training stopped.
GENERATOR_KEYS = (
    "config",
    "G_ema",
    "images_shown",
    "phase_index",
    "phase_name",
    "resolution",
    "alpha",
)


def ensure_dataset(cfg: PipelineConfig, plan: list[Phase], console: Console | None) -> None:
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
    missing = sorted({p.resolution for p in plan} - set(have))
    if missing:
        raise ConfigError(
            f"data.dataset: {dataset} has no LMDB for resolution(s) {missing} (it has "
            f"{have}); prepare it with --resolution {cfg.model.resolution}"
        )


def prepare_source(cfg: PipelineConfig, console: Console) -> None:
    """Run `progan prepare` for data.source (making the built-in sample faces if asked).

    Preparing runs MTCNN on a local Ray (see preprocessing.prepare): that needs Ray and
    facenet-pytorch, which training alone does not.
    """
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
    summary = prepare_dataset(
        source, cfg.data.dataset, cfg.model.resolution, progress=True, **cfg.data.prepare
    )
    console.print(
        f"prepared {summary.records} faces from {summary.inputs} inputs "
        f"({summary.rejected} rejected: {summary.reject_reasons})"
    )


def export_state(state: dict[str, Any], path: Path) -> Path:
    """Write the standalone generator file from a full trainer state (see GENERATOR_KEYS)."""
    return save_checkpoint({k: state[k] for k in GENERATOR_KEYS}, path)


def evaluate_trainer(
    cfg: PipelineConfig, trainer: GANTrainer, phase: Phase, cache_dir: Path | None
) -> dict[str, float]:
    """cfg.eval's metrics of G_ema in `phase` at the trainer's images shown.

    The phase is explicit because at a phase's last image the trainer's own position is
    already the next phase (alpha 0 at the next resolution). Real statistics are cached in
    `cache_dir` (None: beside the dataset).
    """
    from pipeline.evaluation import evaluate_generator

    results = evaluate_generator(
        trainer.G_ema,
        phase.level,
        phase.alpha_at(trainer.images_shown),
        cfg.data.dataset,
        phase.resolution,
        metrics=tuple(cfg.eval.metrics),
        num_images=cfg.eval.num_images,
        fid_weights=cfg.eval.fid_weights,
        device=trainer.device,
        seed=cfg.train.seed,
        cache_dir=cache_dir,
    )
    return {k: float(v) for k, v in results.items() if isinstance(v, int | float)}


def changed_since(
    config_path: Path,
    cfg: PipelineConfig,
    resumable: tuple[str, ...],
    base: Path | None = None,
) -> list[str]:
    """Dotted keys where `cfg` differs from the config saved at `config_path`, leaving out
    keys that start with one of the `resumable` prefixes (those may change on a rerun).

    Paths are compared as absolute paths: the saved config's relative ones against `base`
    (where that run was started; default here), `cfg`'s against the working directory.
    """
    saved = absolute_paths(load_config_dict(config_path), base)
    old = validate_config(saved).model_dump(mode="json")
    new = absolute_paths(cfg.model_dump(mode="json"))
    return [k for k in config_differences(old, new) if not k.startswith(resumable)]


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


def loop_options(cfg: PipelineConfig, log_every_images: int | None = None) -> LoopOptions:
    """The phase loop's cadence and data settings from the config (`run.*_kimg`,
    `data.loader_workers`, `data.preload_mb`); `log_every_images` overrides the stats
    cadence (train-local checks its time budget after every step)."""
    return LoopOptions(
        log_every_images=log_every_images or max(1, round(cfg.run.log_every_kimg * 1000)),
        checkpoint_every_images=max(1, round(cfg.run.checkpoint_every_kimg * 1000)),
        num_workers=cfg.data.loader_workers,
        preload_bytes=round(cfg.data.preload_mb * 2**20),
    )
