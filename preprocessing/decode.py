"""Decode image bytes into RGB uint8 arrays, judging the type by content, not by name.

Accepts JPEG, PNG, WEBP and BMP; applies the EXIF orientation; converts CMYK, grayscale,
palette, 16-bit and alpha images to 8-bit RGB (alpha composited on white). Refuses images
with more than `max_pixels` pixels before decoding them (decompression-bomb guard).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocessing.rejects import RejectError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "MPO"})
DEFAULT_MAX_PIXELS = 100_000_000


def _to_rgb(img: Image.Image) -> np.ndarray:
    """8-bit RGB array from any Pillow mode."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `data` to an upright HxWx3 uint8 RGB array, or raise RejectError with a reason."""
    if not data:
        raise RejectError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise RejectError("not_image", "content is not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectError("truncated", f"header unreadable: {exc}") from exc
    with img:
        if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
            raise RejectError("animated", f"{img.format} with {img.n_frames} frames")
        if img.format not in ALLOWED_FORMATS:
            raise RejectError("unsupported_format", f"{img.format} is not JPEG/PNG/WEBP/BMP")
        width, height = img.size
        if width * height > max_pixels:
            raise RejectError(
                "too_large",
                f"{width}x{height} = {width * height / 1e6:.0f} MP exceeds max_image_pixels "
                f"{max_pixels / 1e6:.0f} MP",
            )
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise RejectError("truncated", str(exc)) from exc
        return _to_rgb(upright)
