"""One shard of work, independent of Ray: decode -> detect -> choose faces -> crop -> pyramid
-> encode. Every input ends as records or as one Reject; nothing raises out of `run`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from preprocessing.align import center_crop, crop_face
from preprocessing.config import PrepareConfig
from preprocessing.decode import decode_image
from preprocessing.detect import Face, FaceDetector
from preprocessing.lmdb_store import encode_record, record_key
from preprocessing.pyramid import build_pyramid
from preprocessing.rejects import Reject, RejectError


@dataclass
class ShardResult:
    """Records ({resolution: bytes} per key) and rejects of one shard, with stage timings."""

    shard: int
    records: list[tuple[str, dict[int, bytes]]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    node_id: str = ""


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


class ShardProcessor:
    """Holds the detector (one MTCNN) and turns (key, bytes) items into a ShardResult."""

    def __init__(self, config: PrepareConfig, device: str | None = None) -> None:
        self.config = config
        self.detector = None
        if config.detector == "mtcnn":
            self.detector = FaceDetector(
                thresholds=config.thresholds,
                max_side=config.detect_max_side,
                batch_size=config.batch_size,
                device=device,
            )

    def run(self, shard: int, items: list[tuple[str, bytes | Reject]]) -> ShardResult:
        """Process one shard; items carry bytes, or a Reject from reading."""
        result = ShardResult(shard)
        timings = dict.fromkeys(("decode", "detect", "crop", "encode"), 0.0)
        images: list[tuple[str, np.ndarray]] = []
        t0 = time.perf_counter()
        for key, data in items:
            if isinstance(data, Reject):
                result.rejects.append(data)
                continue
            try:
                record_key(key)
                images.append((key, decode_image(data, self.config.max_image_pixels)))
            except RejectError as exc:
                result.rejects.append(Reject(key, exc.reason, exc.detail))
            except Exception as exc:
                result.rejects.append(Reject(key, "error", f"{type(exc).__name__}: {exc}"))
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        detections = self._detect([img for _, img in images])
        timings["detect"] = time.perf_counter() - t0

        for (key, image), faces in zip(images, detections, strict=True):
            try:
                t0 = time.perf_counter()
                crops = self._crops(image, faces)
                t1 = time.perf_counter()
                for suffix, crop in crops:
                    levels = build_pyramid(crop)
                    fmt = self.config.record_format
                    payloads = {r: encode_record(a, fmt) for r, a in levels.items()}
                    name = key + suffix if self.config.multi_face else key
                    result.records.append((name, payloads))
                timings["crop"] += t1 - t0
                timings["encode"] += time.perf_counter() - t1
            except RejectError as exc:
                result.rejects.append(Reject(key, exc.reason, exc.detail))
            except Exception as exc:
                result.rejects.append(Reject(key, "error", f"{type(exc).__name__}: {exc}"))
        result.timings = timings
        return result

    def _detect(self, images: list[np.ndarray]) -> list[list[Face] | None]:
        if self.detector is None or not images:
            return [None] * len(images)
        try:
            return self.detector.detect(images)
        except Exception:  # one odd image must not sink the batch: retry one by one
            return [self._detect_one(img) for img in images]

    def _detect_one(self, image: np.ndarray) -> list[Face] | Exception:
        try:
            return self.detector.detect([image])[0]
        except Exception as exc:
            return exc

    def _crops(self, image: np.ndarray, faces) -> list[tuple[str, np.ndarray]]:
        size = self.config.resolution
        if faces is None:
            return [("#0", center_crop(image, size))]
        if isinstance(faces, Exception):
            raise faces
        chosen = select_faces(faces, self.config)
        return [
            (f"#{i}", crop_face(image, f, size, self.config.margin, self.config.crop))
            for i, f in enumerate(chosen)
        ]
