"""MTCNN face detection (facenet-pytorch, weights shipped in the package), batched.

Images of equal size are detected together in batches (MTCNN's batch mode needs equal
sizes); images whose longer side exceeds `max_side` are detected on a downscaled copy and
the results mapped back to full-resolution coordinates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Face:
    """One detection: box (x1, y1, x2, y2), probability, five landmarks (x, y).

    Landmarks are left eye, right eye, nose, left mouth corner, right mouth corner (as seen
    in the image).
    """

    box: tuple[float, float, float, float]
    prob: float
    landmarks: np.ndarray  # (5, 2) float

    @property
    def size(self) -> float:
        """Face size in pixels: the shorter side of the box."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        """Box area in pixels."""
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def default_device() -> str:
    """'cuda' when this process sees a GPU, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class FaceDetector:
    """A loaded MTCNN returning every face it finds, for batches of RGB uint8 arrays."""

    def __init__(
        self,
        *,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        detect_min_size: int = 20,
        max_side: int = 1280,
        batch_size: int = 32,
        device: str | None = None,
    ) -> None:
        from facenet_pytorch import MTCNN

        self.device = device or default_device()
        self.max_side = max_side
        self.batch_size = batch_size
        self.mtcnn = MTCNN(
            keep_all=True,
            select_largest=False,
            min_face_size=detect_min_size,
            thresholds=list(thresholds),
            device=self.device,
        )

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale == 1.0:
            return image, 1.0
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(small), scale

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """All faces in each image, in the detector's order; [] where none."""
        prepared = [self._prepare(img) for img in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (arr, _) in enumerate(prepared):
            groups[arr.shape].append(i)
        results: list[list[Face]] = [[] for _ in images]
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.stack([prepared[i][0] for i in chunk])
                boxes, probs, points = self.mtcnn.detect(batch, landmarks=True)
                for i, b, p, pts in zip(chunk, boxes, probs, points, strict=True):
                    results[i] = _faces(b, p, pts, prepared[i][1])
        return results


def _faces(boxes, probs, points, scale: float) -> list[Face]:
    if boxes is None:
        return []
    boxes = np.asarray(boxes, float) / scale
    points = np.asarray(points, float) / scale
    probs = np.asarray(probs, float)
    return [
        Face(tuple(float(v) for v in box), float(prob), pts)
        for box, prob, pts in zip(boxes, probs, points, strict=True)
    ]
