"""Checks on real photos from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from preprocessing.config import make_config
from preprocessing.detect import FaceDetector
from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from preprocessing.prepare import prepare_dataset
from preprocessing.process import select_faces

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_wild_faces_recall_at_iou_03(shared_data):
    root = shared_data / "wild-faces"
    detector = FaceDetector(device="cpu")
    config = make_config(resolution=64, min_face_size=1)
    hits = total = 0
    for xml in ("training.xml", "testing.xml"):
        for image in ET.parse(root / xml).getroot().iter("image"):
            photo = np.asarray(Image.open(root / image.get("file")).convert("RGB"))
            faces = [f for f in detector.detect([photo])[0] if f.prob >= config.min_prob]
            for box in image.iter("box"):
                t, left, w, h = (float(box.get(k)) for k in ("top", "left", "width", "height"))
                truth = (left, t, left + w, t + h)
                total += 1
                hits += any(_iou(f.box, truth) >= 0.3 for f in faces)
    assert total == 43
    assert hits >= 40, f"recall {hits}/{total}"


def test_wild_faces_multi_face_and_dogs(local_ray, shared_data, tmp_path):
    root = shared_data / "wild-faces"
    names = sorted(p.name for p in root.glob("*.jpg"))
    (tmp_path / "list.txt").write_text("".join(f"{root / n}\n" for n in names))
    out = tmp_path / "out"
    summary = prepare_dataset(
        tmp_path / "list.txt", out, 16, multi_face=True, min_face_size=16, shard_size=4
    )
    manifest = read_manifest(out)
    reasons = {r["key"]: r["reason"] for r in manifest["rejects"]["items"]}
    assert reasons == {str(root / "dogs.jpg"): "no_face"}

    config = make_config(resolution=16, multi_face=True, min_face_size=16)
    detector = FaceDetector(device="cpu")
    ds = LmdbImageDataset(out, 16)
    keys = [ds.key(i) for i in range(len(ds))]
    for name in names:
        if name == "dogs.jpg":
            continue
        photo = np.asarray(Image.open(root / name).convert("RGB"))
        expected = len(select_faces(detector.detect([photo])[0], config))
        mine = [k for k in keys if k.startswith(f"{root / name}#")]
        assert len(mine) == expected >= 1, name
    assert summary.records == len(keys) > 40


def test_celeba_zip_subset_read_in_place(local_ray, shared_data, tmp_path):
    out = tmp_path / "celeba"
    zip_path = shared_data / "celeba-10k.zip"
    args = ["prepare", str(zip_path), str(out), "--resolution", "32", "--limit", "200"]
    assert main([*args, "--shard-size", "50"]) == 0
    manifest = read_manifest(out)
    assert manifest["source"]["entries"] == 200
    assert set(manifest["counts"].values()) == {manifest["records"]}
    assert manifest["records"] >= 196  # keeps at least 98 %
    assert LmdbImageDataset(out, 32).key(0) == "img_align_celeba/000001.jpg"
    assert main(["inspect", str(out), "--sheet", str(tmp_path / "sheet.png")]) == 0
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.width > 16 * 64 and sheet.height > 4 * 64
