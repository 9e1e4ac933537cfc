"""Helpers for the preprocessing tests: face photos from installed packages, bad inputs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image
from skimage import data

from preprocessing.lmdb_store import resolution_dir
from preprocessing.samples import base_photos


def hopper(width: int = 256) -> Image.Image:
    """Grace Hopper's portrait (public domain, shipped with matplotlib), `width` wide."""
    photo = base_photos()[0][0]
    return photo.resize((width, round(photo.height * width / photo.width)))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb)."""
    raw = bytearray(_save(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytearray(raw[12:29])  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """JPEG stored rotated 90 degrees counter-clockwise, with EXIF orientation 6 to undo it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


GOOD = {
    "good.jpg": lambda f: _save(f, "JPEG"),
    "cmyk.jpg": lambda f: _save(f.convert("CMYK"), "JPEG"),
    "png16.png": lambda f: _save(
        Image.fromarray((np.asarray(f.convert("L"), np.uint16) * 257).astype(np.uint16)), "PNG"
    ),
    "palette.png": lambda f: _save(f.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "gray.jpg": lambda f: _save(f.convert("L"), "JPEG"),
    "rgba.png": lambda f: _save(f.convert("RGBA"), "PNG"),
    "webp_named.jpg": lambda f: _save(f, "WEBP"),
    "bitmap.bmp": lambda f: _save(f, "BMP"),
    "exif_rotated.jpg": exif_rotated_jpeg,
    "sub/nested.jpg": lambda f: _save(f, "JPEG"),
}

BAD = {  # file name -> expected reject reason
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "animated.gif": "animated",
    "huge.png": "too_large",
    "text.png": "not_image",
    "cat.jpg": "no_face",
    "tiny_face.jpg": "face_too_small",
    "vanished.jpg": "unreadable",
}


def write_bad_input_folder(folder: Path) -> Path:
    """Every good variant of a face photo and every bad input of issue 3, in `folder`."""
    face = hopper(256)
    for name, make in GOOD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(make(face))
    jpeg = _save(face, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    frames = [face.convert("P"), face.rotate(10).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    (folder / "animated.gif").write_bytes(gif.getvalue())
    (folder / "huge.png").write_bytes(huge_png())
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "cat.jpg").write_bytes(_save(Image.fromarray(data.chelsea()), "JPEG"))
    canvas = Image.new("RGB", (400, 400), (90, 120, 160))
    canvas.paste(hopper(110), (150, 140))
    (folder / "tiny_face.jpg").write_bytes(_save(canvas, "JPEG"))
    (folder / "vanished.jpg").write_bytes(jpeg)
    return folder


def lmdb_contents(dataset_dir: Path, resolution: int) -> dict[bytes, bytes]:
    """Every (key, value) of one resolution's LMDB."""
    env = lmdb.open(str(resolution_dir(dataset_dir, resolution)), readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor().iternext())
    env.close()
    return items


def assert_same_as_one_process(out: Path, photos: Path, resolution: int, **options) -> None:
    """The dataset in `out` holds exactly what one process (no Ray) makes of `photos`: the
    same source fingerprint, record keys in the same order, byte-equal records at every
    resolution, the same rejects."""
    from preprocessing.config import make_config
    from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
    from preprocessing.process import ShardProcessor
    from preprocessing.sources import open_source

    source = open_source(photos)
    config = make_config(resolution=resolution, **options)
    items = [(k, source.location(k)) for k in source.keys]
    expected = ShardProcessor(config, device="cpu").run(0, items, source.reader().read)
    manifest = read_manifest(out)
    assert manifest["source_fingerprint"] == source.fingerprint
    ds = LmdbImageDataset(out, resolution)
    assert [ds.key(i) for i in range(len(ds))] == [k for k, _ in expected.records]
    for res in manifest["resolutions"]:
        stored = list(lmdb_contents(out, res).values())
        assert stored == [payloads[res] for _, payloads in expected.records], res
    assert manifest["rejects"]["items"] == [
        {"key": r.key, "reason": r.reason, "detail": r.detail} for r in expected.rejects
    ]
