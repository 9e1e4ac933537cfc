"""Loading a trained generator for the `generate`, `interpolate`, `edit` and `export` tools.

`load_generator` accepts a run's `generator.pt`, a full training checkpoint (a checkpoint
directory or its `state.pt`) or a run directory, always through
`progan.checkpoint.load_checkpoint` (tensors and plain values only, nothing that can run
code), or a registered MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`), whose
tensors-only generator.pt is read the same way (pipeline.tools.model_uri). It returns the
EMA generator in eval mode at the level and alpha where training stopped, plus what the
tools share: latents by (seed, index) and rendering with truncation (their argument
parsers are pipeline.tools.args, their files pipeline.tools.files). Anything the user got wrong is a
`ToolError`, which the commands print as one line without a traceback.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch & co. are imported where used, so `progan --help` stays fast
    import numpy as np
    import torch
    from torch import nn

    from progan.config import ModelConfig
    from progan.sampling import FixedLevelGenerator


class ToolError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line and exits 2."""


class GeneratorLoadError(ToolError):
    """The checkpoint is missing, unsafe, not a progan checkpoint, or has no G_ema."""


@dataclass
class LoadedGenerator:
    """The EMA generator of a checkpoint, ready to sample from.

    `level`/`alpha` are where training stopped (alpha 0 at level L renders exactly what
    level L-1 renders, upsampled, so it is reported as level L-1 at alpha 1). `config` is
    the checkpoint's model section; `resolution` is the native output size.
    """

    module: nn.Module
    level: int
    alpha: float
    resolution: int
    latent_size: int
    config: ModelConfig
    source: Path
    phase_name: str
    images_shown: int

    @property
    def device(self) -> torch.device:
        """Where the generator's weights live."""
        return next(self.module.parameters()).device

    def describe(self) -> str:
        """One line: file, architecture, phase, native resolution and alpha."""
        return (
            f"{self.source}: {self.config.arch} generator, phase {self.phase_name} "
            f"({self.images_shown / 1000:g} kimg), {self.resolution}x{self.resolution}, "
            f"alpha {self.alpha:g}, latent {self.latent_size}"
        )

    def latents(self, seed: int, indices: int | Iterable[int]) -> torch.Tensor:
        """Latents for sheet positions `indices` (or range(n)) of `seed`; see indexed_latents."""
        return sample_latents(seed, indices, self.latent_size)

    def render(
        self,
        z: torch.Tensor,
        size: tuple[int, int] | None = None,
        psi: float = 1.0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Images in [-1, 1] (CPU float) for latents z, resized to size=(H, W) if given."""
        from progan.sampling import generate, truncation

        with truncation(self.module, psi):
            return generate(self.module, z, self.level, self.alpha, batch_size, size)

    def render_uint8(
        self,
        z: torch.Tensor,
        size: tuple[int, int] | None = None,
        psi: float = 1.0,
        batch_size: int = 64,
    ) -> Iterator[np.ndarray]:
        """One [H, W, C] uint8 array per latent, rendered batch by batch (bounded memory)."""
        from progan.sampling import to_uint8

        for chunk in z.split(batch_size):
            for image in to_uint8(self.render(chunk, size, psi, batch_size)):
                yield image.permute(1, 2, 0).numpy()

    def fixed_module(self) -> FixedLevelGenerator:
        """The generator as a module z -> image in [-1, 1] at this level and alpha."""
        from progan.sampling import FixedLevelGenerator

        return FixedLevelGenerator(self.module, self.level, self.alpha).eval()


def sample_latents(seed: int, indices: int | Iterable[int], latent_size: int) -> torch.Tensor:
    """Latents by seed: row k is image `indices[k]` of `progan generate --seed SEED`.

    An int n means range(n). A latent depends only on (seed, index), so the first 16 images
    of `--n 64` are the images of `--n 16`, and `progan edit` can pick them by index.
    """
    from progan.sampling import indexed_latents

    if isinstance(indices, int):
        indices = range(indices)
    try:
        return indexed_latents(seed, indices, latent_size)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


def resolve_checkpoint(path: str | Path) -> Path:
    """The file to load for `path`: a file as given; a directory's generator.pt (a run
    directory, a train-local output, a phase's final checkpoint), else its state.pt (any
    checkpoint directory, pipeline.phases.checkpoints)."""
    from pipeline.phases.checkpoints import GENERATOR_FILE, STATE_FILE

    p = Path(path)
    if p.is_dir():
        for name in (GENERATOR_FILE, STATE_FILE):
            if (p / name).is_file():
                return p / name
        raise GeneratorLoadError(
            f"{p} has no {GENERATOR_FILE} (a run directory or train-local output gets one when "
            f"its first phase ends) and no {STATE_FILE} (a checkpoint directory, images-N)"
        )
    if not p.is_file():
        raise GeneratorLoadError(f"checkpoint not found: {p}")
    return p


def _read_state(path: Path) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 (and save_checkpoint) is a zip
        raise GeneratorLoadError(
            f"{path} is not a progan checkpoint (not a torch.save archive); not unpickling it"
        )
    from progan.checkpoint import UnsafeCheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, map_location="cpu")
    except UnsafeCheckpointError as exc:
        raise GeneratorLoadError(str(exc)) from exc
    except (ValueError, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GeneratorLoadError(f"cannot read {path}: {first}") from exc


def _where_it_stopped(state: dict[str, Any], cfg: ModelConfig) -> tuple[int, float]:
    from progan.networks import level_of

    max_level = level_of(cfg.resolution)
    if cfg.arch == "dcgan":
        return max_level, 1.0
    level = level_of(int(state.get("resolution", cfg.resolution)))
    alpha = float(state.get("alpha", 1.0))
    if not 0 <= level <= max_level or not 0.0 <= alpha <= 1.0:
        raise GeneratorLoadError(f"checkpoint says level {level}, alpha {alpha}: out of range")
    if level > 0 and alpha == 0.0:
        return level - 1, 1.0
    return level, alpha


def resolve_device(device: str) -> torch.device:
    """torch.device(device), refusing CUDA where none is present."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ToolError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def load_generator(
    path: str | Path, device: str = "cpu", tracking_uri: str | None = None
) -> LoadedGenerator:
    """The EMA generator of a generator.pt, training checkpoint, run directory or registered
    MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, read from `tracking_uri`,
    default $MLFLOW_TRACKING_URI else ./runs/mlflow.db), in eval mode."""
    from pipeline.tools.model_uri import downloaded_generator, is_model_uri

    if is_model_uri(path):
        from pipeline.tracking.tracker import resolve_uri

        with downloaded_generator(str(path), resolve_uri(tracking_uri, "runs")) as file:
            return _load_generator_file(file, Path(str(path)), device)
    from pipeline.tools.bundle import is_bundle, load_bundle_generator

    if is_bundle(path):  # safetensors + JSON (progan export --format bundle)
        return load_bundle_generator(Path(path), device)
    source = resolve_checkpoint(path)
    return _load_generator_file(source, source, device)


def _load_generator_file(file: Path, source: Path, device: str) -> LoadedGenerator:
    from pydantic import ValidationError

    from progan.config import ModelConfig
    from progan.models import build_generator
    from progan.networks import resolution_of

    state = _read_state(file)
    if "G_ema" not in state:
        keys = ", ".join(sorted(state)) or "none"
        raise GeneratorLoadError(f"{source} has no G_ema generator (keys: {keys})")
    try:
        cfg = ModelConfig.model_validate(state["config"]["model"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise GeneratorLoadError(f"{source} has no valid model config ({exc!r:.200})") from exc
    module = build_generator(cfg)
    try:
        module.load_state_dict(state["G_ema"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0]
        raise GeneratorLoadError(f"{source}: G_ema does not fit its config ({first})") from exc
    module.to(resolve_device(device)).eval().requires_grad_(False)
    level, alpha = _where_it_stopped(state, cfg)
    return LoadedGenerator(
        module=module,
        level=level,
        alpha=alpha,
        resolution=resolution_of(level),
        latent_size=cfg.latent_size,
        config=cfg,
        source=source,
        phase_name=str(state.get("phase_name", "unknown")),
        images_shown=int(state.get("images_shown", 0)),
    )
