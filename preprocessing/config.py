"""The prepare run's configuration, validated; bad values give one-line errors naming the key."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A bad configuration (a prepare option, a pipeline config, a tune spec) in one line
    naming the key and what is allowed. The one class for the whole project: `pipeline`
    raises it too."""


class PrepareError(RuntimeError):
    """A prepare run cannot go ahead or did not finish (output holds something else, config
    or source changed, a wait timed out); the message is one line."""


class PrepareOptions(BaseModel):
    """What decides a prepared dataset's content, except its resolution (hashed into the
    fingerprint with it). `progan prepare`'s options and a pipeline config's `data.prepare`
    both are these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: Literal["mtcnn", "none"] = Field(
        "mtcnn", description="face detector; none: every photo is taken whole"
    )
    crop: Literal["align", "box"] = Field(
        "align", description="align: similarity from the 5 landmarks; box: the face box"
    )
    margin: float = Field(0.25, ge=0.0, le=2.0, description="context around the face")
    min_face_size: int = Field(32, ge=1, description="shorter side of the face box, pixels")
    min_prob: float = Field(0.9, ge=0.0, le=1.0, description="smallest detection probability")
    thresholds: tuple[float, float, float] = Field(
        (0.6, 0.7, 0.7), description="MTCNN's three stage thresholds"
    )
    multi_face: bool = Field(False, description="one record per face found (else the largest)")
    record_format: Literal["raw", "png"] = Field(
        "raw", description="raw pixels (fast reads) or PNG (small files)"
    )
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="larger photos are rejected (decompression bombs)"
    )
    detect_max_side: int = Field(1280, ge=64, description="photos are shrunk to this to detect")
    batch_size: int = Field(32, ge=1, description="photos per MTCNN batch")
    shard_size: int = Field(256, ge=1, description="photos per shard (the unit of resuming)")
    limit: int | None = Field(None, ge=1, description="only the first N source files")

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= t <= 1.0 for t in value):
            raise ValueError("each threshold must be in 0..1")
        return value


class PrepareConfig(PrepareOptions):
    """Everything that decides what the prepared dataset contains (hashed into its fingerprint)."""

    resolution: int = Field(description="target resolution, a power of two in 4..1024")

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 4 or value > 1024 or value & (value - 1):
            raise ValueError("must be a power of two in 4..1024")
        return value

    def digest(self) -> str:
        """Stable hash of the configuration."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_config(**values) -> PrepareConfig:
    """Build a PrepareConfig, turning validation errors into a one-line ConfigError."""
    try:
        return PrepareConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{key}: {msg} (got {err.get('input')!r})") from None
