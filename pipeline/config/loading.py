"""YAML + `key=value` overrides -> a validated PipelineConfig, and back to YAML.

Every problem is a one-line `ConfigError` naming the key and what is allowed, raised before
Ray starts. Relative paths are made absolute where the user typed them, so that a run
directory's config.yaml names the same files from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.sections import BUILTIN_SAMPLE_FACES, PipelineConfig
from pipeline.tracking.secrets import redact_uri
from preprocessing import object_store
from preprocessing.config import ConfigError
from progan.files import atomic_file

# Config keys that hold filesystem paths (a URI, or the built-in sample, is left as it is).
PATH_KEYS = (
    ("data", "dataset"),
    ("data", "source"),
    ("data", "cache_dir"),
    ("run", "root"),
    ("run", "storage_path"),
    ("eval", "fid_weights"),
)


def nested(key: str, value: Any) -> dict[Any, Any]:
    """'train.loss', 'bce' -> {'train': {'loss': 'bce'}}. Numeric parts become int keys
    (`scaling.num_workers.64=2` -> {64: 2}), as YAML writes resolution keys."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {int(part) if part.isdigit() else part: out}
    return out


def int_keys(value: Any) -> Any:
    """Digit-string mapping keys -> int, recursively (YAML and JSON disagree on them)."""
    if isinstance(value, dict):
        return {
            int(k) if isinstance(k, str) and k.isdigit() else k: int_keys(v)
            for k, v in value.items()
        }
    return value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.loss=wgan', 'model.fmap_max=256'] -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = out
        for part in key.split(".")[:-1]:
            node = node.get(int(part) if part.isdigit() else part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        out = merge(out, nested(key, yaml.safe_load(value)))
    return out


def is_uri(value: str) -> bool:
    """'s3://bucket/x', 'file:///x' (and 'builtin:sample-faces'): not a plain path."""
    return object_store.is_uri(value) or value == BUILTIN_SAMPLE_FACES


def absolute_paths(raw: dict[str, Any], base: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of a raw config whose relative paths are made absolute against `base`
    (default: the working directory), so that any process, directory or node that sees the
    same filesystem reads the same files. URIs are kept as given."""
    base = Path(base or Path.cwd()).absolute()
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, key in PATH_KEYS:
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and value and not is_uri(value):
            out[section][key] = os.path.normpath(base / Path(value).expanduser())
    return out


def allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names accepted at `loc` (for 'unknown key' messages)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def describe(err: ValidationError, model: type | None = None) -> str:
    """The first validation problem as 'key: what is wrong (allowed ...)'."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        allowed = allowed_keys(model or PipelineConfig, loc)
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    got = repr(first.get("input"))
    got = "" if got in msg or isinstance(first.get("input"), dict) else f"; got {got}"
    return f"{key}: {msg}{got}{more}" if loc else f"{msg}{more}"


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> dict:
    """A YAML file whose top level is a mapping; each way it can fail is one ConfigError
    (`what` names the file in "not found", `expected` says what the mapping should hold)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return raw


def load_config_dict(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The raw YAML with overrides applied (not yet validated)."""
    raw = read_yaml_mapping(path, "config file", "a mapping of sections at the top level")
    return merge(int_keys(raw), parse_overrides(overrides or []))


def validate_config(raw: dict) -> PipelineConfig:
    """Validate a raw dict into a PipelineConfig or raise a one-line ConfigError."""
    try:
        return PipelineConfig.model_validate(int_keys(raw))
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    base: str | os.PathLike | None = None,
) -> PipelineConfig:
    """YAML file + overrides -> validated PipelineConfig, relative paths made absolute
    against `base` (default: the working directory, where the user typed them)."""
    return validate_config(absolute_paths(load_config_dict(path, overrides), base))


def config_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML that `load_config` accepts as is; a password inside a URI
    is written as `***` (pipeline.tracking.secrets: it comes back from the environment)."""
    return redact_uri(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def dump_config(cfg: PipelineConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (`config_yaml`), atomically (a kill mid-write leaves
    the old one)."""
    with atomic_file(path, fsync=True) as f:
        f.write(config_yaml(cfg).encode())
    return Path(path)
