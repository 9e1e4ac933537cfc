"""Files the generator tools read and write: latents (.pt, .npy) and PNGs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tools.generator import ToolError

if TYPE_CHECKING:
    import numpy as np
    import torch


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
