"""Loading a trained generator for the `generate`, `interpolate`, `edit` and `export` tools.

`load_generator` accepts a run's `generator.pt`, a full training checkpoint (a Ray
checkpoint directory in storage or its `state.pt`) or a run directory, always through
`progan.checkpoint.load_checkpoint` (tensors and plain values only, nothing that can run
code), or a registered MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`), whose
tensors-only generator.pt is read the same way (pipeline.model_registry). It returns the
EMA generator in eval mode at the level and alpha where training stopped, plus what the
tools share: latents by (seed, index), rendering with truncation, PNG writing, and the
small argument parsers. Anything the user got wrong is a `ToolError`, which the commands
print as one line without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch & co. are imported where used, so `progan --help` stays fast
    import numpy as np
    import torch
    from torch import nn

    from progan.config import ModelConfig
    from progan.sampling import FixedLevelGenerator

MAX_SIDE = 8192


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
    """A file as given; a Ray checkpoint directory -> its state.pt; a run directory -> its
    generator.pt, else the final checkpoint (in storage) of its latest finished phase, else
    a train-local run's checkpoint.pt (or the older layout's checkpoints/*.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in ("generator.pt", "state.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        latest = latest_phase_checkpoint(p)
        if latest is not None:
            return latest
        phases = sorted((p / "checkpoints").glob("*.pt"))  # names start with the phase index
        if phases:
            return phases[-1]
        raise GeneratorLoadError(
            f"{p} is a directory without generator.pt, a finished phase or checkpoints/*.pt"
        )
    if not p.is_file():
        raise GeneratorLoadError(f"checkpoint not found: {p}")
    return p


def latest_phase_checkpoint(run_dir: Path) -> Path | None:
    """state.pt of the run's latest finished phase, from storage on this machine (a path
    or file:// URI; remote storage is downloaded first)."""
    import json

    state_file = run_dir / "state.json"
    if not state_file.is_file():
        return None
    phases = json.loads(state_file.read_text()).get("phases", {})
    ordered = [phases[k] for k in sorted(phases, key=int)]
    done = [v["checkpoint"] for v in ordered if v.get("done") and v.get("checkpoint")]
    if not done:
        return None
    from pipeline.storage import STATE_FILE, local_path

    local = local_path(done[-1])
    if local is None:  # s3://, gs://: fetch it next to the run
        import ray.train

        target = run_dir / "downloaded" / Path(done[-1]).name
        ray.train.Checkpoint(done[-1]).to_directory(str(target))
        local = target
    return local / STATE_FILE if local.is_dir() else local


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
    from pipeline.model_registry import downloaded_generator, is_model_uri

    if is_model_uri(path):
        from pipeline.tracking import resolve_uri

        with downloaded_generator(str(path), resolve_uri(tracking_uri, "runs")) as file:
            return _load_generator_file(file, Path(str(path)), device)
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


def load_latent_file(path: str | Path) -> torch.Tensor:
    """A float tensor from a .pt (tensor, loaded weights_only) or .npy (no pickles) file."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise ToolError(f"file not found: {p}")
    try:
        if p.suffix == ".npy":
            value = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            value = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ToolError(f"cannot load latents from {p} (tensors only): {first}") from exc
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ToolError(f"{p} must hold one float tensor of latents, got {type(value).__name__}")
    return value.float()


def save_tensor_file(tensor: torch.Tensor, path: str | Path) -> Path:
    """Write a tensor as .npy (suffix .npy) or with torch.save (anything else)."""
    import numpy as np
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".npy":
        np.save(p, tensor.detach().cpu().numpy())
    else:
        torch.save(tensor.detach().cpu(), p)
    return p


def save_pngs(images: Iterable[np.ndarray], paths: Iterable[Path]) -> list[Path]:
    """Write [H, W, C] uint8 arrays as PNGs (folders created)."""
    from PIL import Image

    written = []
    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
        written.append(path)
    return written


def image_name(seed: int, index: int) -> str:
    """File name of image `index` of seed `seed` (what `progan edit --with` refers to)."""
    return f"seed{seed}-{index:05d}.png"


# -- command-line helpers -------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (as ffmpeg/ImageMagick write it, e.g. 178x218) -> (height, width)."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 178x218, got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"size sides must be in 1..{MAX_SIDE}, got {text!r}")
    return height, width


def parse_int_list(text: str) -> list[int]:
    """'3,17,22' -> [3, 17, 22] (non-negative)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_float_list(text: str) -> list[float]:
    """'-2,-1,0,1,2' -> [-2.0, -1.0, 0.0, 1.0, 2.0]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_generator_args(parser: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """CKPT and --device; with sampling, also --seed, --size, --truncation, --batch-size."""
    parser.add_argument(
        "ckpt",
        help="generator.pt, a training checkpoint, a run directory, or a registered model: "
        "models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow holding models:/ (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)",
    )
    if not sampling:
        return
    parser.add_argument("--seed", type=seed_int, default=0, help="latent seed (default 0)")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="output WIDTHxHEIGHT, e.g. 178x218"
    )
    parser.add_argument(
        "--truncation",
        type=float,
        default=1.0,
        metavar="PSI",
        help="truncation trick: 1 = off (default), 0 = the average image; 0.7 is typical",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)


def reports_errors(func: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap a command's `run`: a ToolError becomes 'error: ...' on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ToolError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {message}", file=sys.stderr)
            return 2

    return wrapper
