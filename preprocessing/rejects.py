"""Reject reasons: every input that does not become a record gets one, plus a CSV writer."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from progan.files import atomic_file

#: Reason codes, with what each means (also in docs/preprocessing.md).
REASONS: dict[str, str] = {
    "unreadable": "the file could not be read (vanished, permission, I/O error)",
    "empty": "zero-byte file",
    "not_image": "content is not an image format Pillow recognises",
    "unsupported_format": "an image, but not JPEG, PNG, WEBP or BMP (e.g. GIF, TIFF)",
    "animated": "an animated image (several frames)",
    "truncated": "the image data ends early or is corrupt",
    "too_large": "more pixels than max_image_pixels (decompression-bomb guard)",
    "no_face": "the detector found no face",
    "low_probability": "faces found, but none with probability >= min_prob",
    "face_too_small": "faces found, but none at least min_face_size pixels",
    "error": "an unexpected error while processing this file (message in detail)",
}


class RejectError(Exception):
    """Raised for one input that cannot become a record; carries a reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reject:
    """One rejected input: its source key, reason code and a human-readable detail."""

    key: str
    reason: str
    detail: str = ""


def summarize(rejects: list[Reject]) -> dict[str, int]:
    """Counts per reason code, sorted by code."""
    return dict(sorted(Counter(r.reason for r in rejects).items()))


def write_csv(path: Path, rejects: list[Reject]) -> None:
    """Write `key,reason,detail` rows, sorted by key, atomically. UTF-8; a file name that is
    not valid UTF-8 is written as its own bytes (as the LMDB keys hold it), so the row
    names the file exactly as the file system does."""
    with (
        atomic_file(path) as raw,
        io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["key", "reason", "detail"])
        for r in sorted(rejects, key=lambda r: r.key):
            writer.writerow([r.key, r.reason, r.detail])
