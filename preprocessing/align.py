"""Face crops: a landmark-based similarity alignment, or a plain square box crop.

`aligned` fits a similarity transform (rotation, uniform scale, translation; least squares
over MTCNN's five landmarks) onto a fixed template, so eyes, nose and mouth land at the same
place in every crop, the way CelebA-HQ was cut from CelebA's landmarks. The template is
ArcFace's five-point layout, widened by `margin` (the fraction of the tight face square
added on each side). `box_crop` cuts the square around the detector's box, grown by
`margin`. Both pad outside the photo by reflection and shrink by box filtering first when
the face is much larger than the crop, so there is no aliasing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

from preprocessing.detect import Face

# ArcFace's 112x112 five-point template, as fractions of the tight face square.
TEMPLATE = (
    np.array(
        [
            [38.2946, 51.6963],
            [73.5318, 51.5014],
            [56.0252, 71.7366],
            [41.5493, 92.3655],
            [70.7299, 92.2041],
        ]
    )
    / 112.0
)


def template_points(size: int, margin: float) -> np.ndarray:
    """Where the five landmarks land in a `size`-pixel crop with `margin`."""
    return (TEMPLATE + margin) / (1.0 + 2.0 * margin) * size


def alignment_matrix(face: Face, size: int, margin: float) -> np.ndarray:
    """3x3 matrix taking photo coordinates to crop coordinates (similarity fit)."""
    src = np.asarray(face.landmarks, float)
    tform = SimilarityTransform.from_estimate(src, template_points(size, margin))
    if not tform:
        raise ValueError("degenerate landmarks: similarity transform cannot be fitted")
    return tform.params


def box_matrix(face: Face, size: int, margin: float) -> np.ndarray:
    """3x3 matrix taking photo coordinates to crop coordinates (square box, no rotation)."""
    x1, y1, x2, y2 = face.box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    scale = size / side
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return np.array(
        [[scale, 0.0, size / 2.0 - scale * cx], [0.0, scale, size / 2.0 - scale * cy], [0, 0, 1]]
    )


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Cut the `size`x`size` crop that `matrix` (photo -> crop) describes, as uint8 RGB."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    factor = int(1.0 / scale) if scale < 0.5 else 1
    pil = Image.fromarray(image)
    if factor > 1:  # box-filter shrink first: avoids aliasing from a large face
        pil = pil.reduce(factor)
        matrix = matrix @ np.diag([factor, factor, 1.0])
    inverse = np.linalg.inv(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float)
    src = corners @ inverse.T
    w, h = pil.size
    left = max(0, int(np.ceil(-src[:, 0].min())) + 2)
    top = max(0, int(np.ceil(-src[:, 1].min())) + 2)
    right = max(0, int(np.ceil(src[:, 0].max() - w)) + 2)
    bottom = max(0, int(np.ceil(src[:, 1].max() - h)) + 2)
    if left or top or right or bottom:
        padded = np.pad(np.asarray(pil), ((top, bottom), (left, right), (0, 0)), mode="reflect")
        pil = Image.fromarray(padded)
        inverse = np.array([[1, 0, left], [0, 1, top], [0, 0, 1]], float) @ inverse
    coeffs = tuple(inverse[:2].ravel())
    out = pil.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def crop_face(image: np.ndarray, face: Face, size: int, margin: float, mode: str) -> np.ndarray:
    """The face's `size`x`size` crop: mode 'align' (landmarks) or 'box' (detector box)."""
    if mode == "align":
        matrix = alignment_matrix(face, size, margin)
    elif mode == "box":
        matrix = box_matrix(face, size, margin)
    else:
        raise ValueError(f"unknown crop mode {mode!r}")
    return warp(image, matrix, size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The largest centred square of `image`, resized to `size` (for already-aligned faces)."""
    h, w = image.shape[:2]
    side = min(h, w)
    face = Face(
        ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2), 1.0, np.zeros((5, 2))
    )
    return warp(image, box_matrix(face, size, 0.0), size)
