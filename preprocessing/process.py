"""The per-image work, independent of Ray, as three steps every runner composes:

`read_and_decode` (bytes -> RGB arrays), `detect_faces` (MTCNN) and `make_records` (choose
faces -> crop -> pyramid -> encode). Every input ends as records or as one Reject; none of
them raises for a bad input. `ShardProcessor` runs all three in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from preprocessing.align import center_crop, crop_face
from preprocessing.config import PrepareConfig
from preprocessing.decode import decode_image
from preprocessing.detect import Face, FaceDetector
from preprocessing.lmdb_store import encode_record
from preprocessing.pyramid import build_pyramid
from preprocessing.rejects import Reject, RejectError
from preprocessing.shard_file import ShardResult

Detections = list[Face] | Exception | None  # None: no detector (already-aligned faces)


@dataclass
class DecodedShard:
    """One shard between the steps: decoded images, rejects so far, timings, nodes."""

    shard: int
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    detections: list[Detections] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)


def select_faces(faces: list[Face], config: PrepareConfig) -> list[Face]:
    """Faces to keep, largest box first (ties: higher probability).

    A face is kept when its probability is at least `min_prob` and the shorter side of its
    box at least `min_face_size`. Single-face mode keeps only the first (the largest).
    Raises RejectError: no_face, low_probability or face_too_small.
    """
    if not faces:
        raise RejectError("no_face")
    confident = [f for f in faces if f.prob >= config.min_prob]
    if not confident:
        best = max(f.prob for f in faces)
        raise RejectError("low_probability", f"best face probability {best:.3f}")
    big = [f for f in confident if f.size >= config.min_face_size]
    if not big:
        largest = max(f.size for f in confident)
        raise RejectError(
            "face_too_small",
            f"largest face {largest:.0f} px < min_face_size {config.min_face_size}",
        )
    big.sort(key=lambda f: (-f.area, -f.prob))
    return big if config.multi_face else big[:1]


def _reject(key: str, exc: Exception) -> Reject:
    if isinstance(exc, RejectError):
        return Reject(key, exc.reason, exc.detail)
    return Reject(key, "error", f"{type(exc).__name__}: {exc}")


def read_and_decode(
    shard: int,
    items: list[tuple[str, str]],
    read: Callable[[str], bytes],
    max_pixels: int,
) -> DecodedShard:
    """Read (key, location) items with `read` and decode them; unreadable/bad ones rejected."""
    out = DecodedShard(shard)
    t0 = time.perf_counter()
    for key, location in items:
        try:
            data = read(location)
        except (OSError, KeyError) as exc:
            out.rejects.append(Reject(key, "unreadable", f"{type(exc).__name__}: {exc}"))
            continue
        try:
            out.images.append((key, decode_image(data, max_pixels)))
        except Exception as exc:
            out.rejects.append(_reject(key, exc))
    out.timings["read+decode"] = time.perf_counter() - t0
    return out


def detect_faces(detector: FaceDetector | None, part: DecodedShard) -> DecodedShard:
    """Fill `part.detections` (None per image without a detector); one odd image never sinks
    the batch: on an error the images are retried one by one and the error kept per image."""
    t0 = time.perf_counter()
    images = [img for _, img in part.images]
    if detector is None or not images:
        part.detections = [None] * len(images)
    else:
        try:
            part.detections = list(detector.detect(images))
        except Exception:
            part.detections = [_detect_one(detector, img) for img in images]
    part.timings["detect"] = time.perf_counter() - t0
    return part


def _detect_one(detector: FaceDetector, image: np.ndarray) -> Detections:
    try:
        return detector.detect([image])[0]
    except Exception as exc:
        return exc


def make_records(part: DecodedShard, config: PrepareConfig) -> ShardResult:
    """Choose faces, crop, build the pyramid and encode: the shard's records and rejects."""
    result = ShardResult(part.shard, rejects=list(part.rejects), nodes=list(part.nodes))
    t0 = time.perf_counter()
    detections = part.detections or [None] * len(part.images)
    for (key, image), faces in zip(part.images, detections, strict=True):
        try:
            for suffix, crop in _crops(image, faces, config):
                levels = build_pyramid(crop)
                payloads = {r: encode_record(a, config.record_format) for r, a in levels.items()}
                result.records.append((key + suffix if config.multi_face else key, payloads))
        except Exception as exc:
            result.rejects.append(_reject(key, exc))
    result.rejects.sort(key=lambda r: r.key)
    result.timings = {**part.timings, "crop+pyramid+encode": time.perf_counter() - t0}
    return result


def _crops(image: np.ndarray, faces: Detections, config: PrepareConfig):
    size = config.resolution
    if faces is None:
        return [("#0", center_crop(image, size))]
    if isinstance(faces, Exception):
        raise faces
    chosen = select_faces(faces, config)
    return [
        (f"#{i}", crop_face(image, f, size, config.margin, config.crop))
        for i, f in enumerate(chosen)
    ]


def make_detector(config: PrepareConfig, device: str | None = None) -> FaceDetector | None:
    """The configured detector (None for `detector: none`)."""
    if config.detector != "mtcnn":
        return None
    return FaceDetector(
        thresholds=config.thresholds,
        max_side=config.detect_max_side,
        batch_size=config.batch_size,
        device=device,
    )


class ShardProcessor:
    """All three steps in one process, for one detector (one MTCNN)."""

    def __init__(self, config: PrepareConfig, device: str | None = None) -> None:
        self.config = config
        self.detector = make_detector(config, device)

    def run(
        self, shard: int, items: list[tuple[str, str]], read: Callable[[str], bytes]
    ) -> ShardResult:
        """Process one shard of (key, location) items read with `read`."""
        part = read_and_decode(shard, items, read, self.config.max_image_pixels)
        return make_records(detect_faces(self.detector, part), self.config)
