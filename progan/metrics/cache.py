"""A tiny on-disk cache for tensors computed from the real data set (descriptors, features).

Entries are plain ``torch.save`` files of dicts/lists of tensors, ints and strings, loaded
with ``torch.load(weights_only=True)`` so that a cache file can never execute code. The file
name is a hash of the key; the key itself is stored inside the file and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from progan.checkpoint import atomic_torch_save


def cache_path(cache_dir: str | Path, kind: str, key: Mapping[str, Any]) -> Path:
    """Path of the cache file for ``key`` (a JSON-serialisable mapping) of the given kind."""
    text = json.dumps(dict(key), sort_keys=True)
    digest = hashlib.sha256(f"{kind}:{text}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{digest}.pt"


def load_or_compute(
    cache_dir: str | Path,
    kind: str,
    key: Mapping[str, Any],
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Load the entry for ``key`` from ``cache_dir``, or ``compute()`` it and store it.

    The write is atomic (temporary file + rename), so a crash never leaves a half file. A
    cache directory that cannot be written (a read-only dataset) only costs the caching: the
    value is returned with a warning.
    """
    path = cache_path(cache_dir, kind, key)
    key_text = json.dumps(dict(key), sort_keys=True)
    if path.exists():
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("key") != key_text:
            raise RuntimeError(f"cache file {path} holds key {entry.get('key')}, not {key_text}")
        return entry["value"]
    value = compute()
    try:
        atomic_torch_save({"key": key_text, "value": value}, path)
    except OSError as err:
        warnings.warn(f"not cached ({err}); pass another cache directory", stacklevel=2)
    return value
