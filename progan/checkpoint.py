"""Checkpoint files: written atomically, loaded without running code.

A checkpoint is a plain dict of tensors and Python primitives saved with `torch.save` and
loaded with `torch.load(weights_only=True)`, which refuses any pickled object that is not
a tensor or primitive. Writing goes to a temporary file in the same folder, fsync, then
`os.replace`, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from progan.files import atomic_file

FORMAT = "progan-checkpoint"
VERSION = 1


class UnsafeCheckpointError(RuntimeError):
    """The file holds something other than tensors and primitives (it could run code)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync, then rename over `path`."""
    with atomic_file(path, fsync=True) as f:
        torch.save(obj, f)
    return Path(path)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write `state` (tensors and primitives only) to `path`."""
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; raise UnsafeCheckpointError for files that would run code.

    Keep the default: a training state loads to CPU and `GANTrainer.load_state_dict` puts
    each tensor where it belongs (modules and optimizer moments on the training device,
    Adam's step counters and the RNG states on the CPU, as torch expects them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain "
            f"values, which could run code when unpickled ({str(err).splitlines()[0]})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a progan checkpoint (no '{FORMAT}' format marker)")
    return state


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, Python, NumPy) as checkpoint-safe values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured, from CPU tensors wherever the state was loaded."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        # one state per GPU visible when saved; a node may show fewer (or more) now
        for index, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved.cpu(), index)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].cpu().numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
