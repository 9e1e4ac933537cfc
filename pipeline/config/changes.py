"""What may change when a run (or a train-local output folder) is continued.

The fields marked `json_schema_extra=RESUMABLE` (pipeline.config.sections, progan.config)
are the one resume policy: they change how training runs or is watched, never what is
trained. Anything else must match the config the run was started with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config.loading import absolute_paths, load_config_dict, validate_config
from pipeline.config.sections import PipelineConfig
from pipeline.tracking.secrets import redact_uri


def resumable_keys(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Dotted keys (a section ends in '.') marked resumable in `model`, recursively."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if extra.get("resumable"):
            out.append(f"{prefix}{name}{'.' if is_section else ''}")
        elif is_section:
            out += resumable_keys(annotation, f"{prefix}{name}.")
    return tuple(out)


RESUMABLE_CHANGES = resumable_keys(PipelineConfig)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


def changed_since(config_path: Path, cfg: PipelineConfig, base: Path | None = None) -> list[str]:
    """Dotted keys where `cfg` differs from the config saved at `config_path` in a way a
    continued run may not (RESUMABLE_CHANGES may differ).

    Paths are compared as absolute paths: the saved config's relative ones against `base`
    (where that run was started; default here), `cfg`'s against the working directory.
    """
    saved = absolute_paths(load_config_dict(config_path), base)
    old: dict[str, Any] = validate_config(saved).model_dump(mode="json")
    # the saved config holds URIs with their password masked: compare them masked
    new = json.loads(redact_uri(json.dumps(absolute_paths(cfg.model_dump(mode="json")))))
    return [
        k
        for k in config_differences(old, new)
        if not (k in RESUMABLE_CHANGES or k.startswith(tuple(RESUMABLE_CHANGES)))
    ]
