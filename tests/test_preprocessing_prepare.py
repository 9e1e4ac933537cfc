"""End-to-end prepare runs on real Ray, real MTCNN and real LMDB, with generated photos."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preprocessing.lmdb_store import LmdbImageDataset, read_manifest, resolution_dir
from preprocessing.prepare import PrepareError, prepare_dataset
from preprocessing.samples import make_sample_faces
from preprocessing.sources import open_source
from tests.fixtures_preprocessing import BAD, GOOD, lmdb_contents, write_bad_input_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return make_sample_faces(tmp_path_factory.mktemp("samples"), n=32, seed=0)


def test_bad_inputs_are_rejected_with_reasons_and_good_ones_kept(local_ray, tmp_path):
    folder = write_bad_input_folder(tmp_path / "photos")
    source = open_source(folder)  # listed now ...
    (folder / "vanished.jpg").unlink()  # ... and the file disappears mid-run
    out = tmp_path / "out"
    summary = prepare_dataset(source, out, 32, min_face_size=64, shard_size=6, workers=2)

    manifest = read_manifest(out)
    assert manifest["resolutions"] == [4, 8, 16, 32]
    assert set(manifest["counts"].values()) == {len(GOOD)}
    keys = {LmdbImageDataset(out, 32).key(i) for i in range(len(GOOD))}
    assert keys == set(GOOD)
    reasons = {r["key"]: r["reason"] for r in manifest["rejects"]["items"]}
    assert reasons == BAD
    assert all(r["detail"] for r in manifest["rejects"]["items"] if r["reason"] != "no_face")
    with open(out / "rejects.csv", newline="") as fh:
        assert {row["key"]: row["reason"] for row in csv.DictReader(fh)} == BAD
    assert (summary.records, summary.rejected, summary.inputs) == (len(GOOD), len(BAD), 18)
    ds = LmdbImageDataset(out, 32)
    assert all(ds[i].float().std() > 10 for i in range(len(ds)))  # real pictures, not blanks


def test_rerun_changes_nothing_and_changes_are_refused(local_ray, tmp_path, sample_dir):
    out = tmp_path / "out"
    first = prepare_dataset(sample_dir, out, 16, shard_size=8, record_format="png")
    assert first.records >= 30 and first.records + first.rejected == 32
    ds = LmdbImageDataset(out, 16)
    assert ds[0].shape == (3, 16, 16) and ds[0].dtype == torch.uint8

    def dataset_files() -> dict[Path, int]:  # the lock file only names its last holder
        return {
            p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"
        }

    before = dataset_files()
    again = prepare_dataset(sample_dir, out, 16, shard_size=8, record_format="png")
    assert again.already_complete and again.records == first.records
    assert dataset_files() == before

    with pytest.raises(PrepareError, match=r"margin: 0.25 -> 0.4"):
        prepare_dataset(sample_dir, out, 16, shard_size=8, record_format="png", margin=0.4)
    (sample_dir / "extra.jpg").write_bytes((sample_dir / "face_0000.jpg").read_bytes())
    try:
        with pytest.raises(PrepareError, match="source changed"):
            prepare_dataset(sample_dir, out, 16, shard_size=8, record_format="png")
    finally:
        (sample_dir / "extra.jpg").unlink()
    forced = prepare_dataset(sample_dir, out, 8, shard_size=8, detector="none", force=True)
    assert forced.records == 32 and read_manifest(out)["resolutions"] == [4, 8]
    assert not resolution_dir(out, 16).exists()


def test_killed_run_resumes_to_the_same_bytes(local_ray, tmp_path):
    photos = make_sample_faces(tmp_path / "photos", n=64, seed=1)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["prepare", str(photos), str(killed), "--resolution", "32", "--shard-size", "4"]
    cmd = [sys.executable, "-m", "pipeline.cli", *args, "--workers", "1"]
    # GPUs asked of a cluster without any: refused in one line before anything is written
    refused = subprocess.run(
        [*cmd, "--gpus-per-worker", "0.5"], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and not killed.exists()
    assert "gpus_per_worker: 0.5 asks for GPUs but the Ray cluster has" in refused.stderr

    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    progress = killed / "_progress"
    deadline = time.monotonic() + 120
    while len(list(progress.glob("shard-*.bin"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "prepare exited before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    done = len(list(progress.glob("shard-*.bin")))
    assert 3 <= done < 16 and not (killed / "manifest.json").exists()

    resumed = prepare_dataset(photos, killed, 32, shard_size=4)
    assert resumed.resumed_shards == done and resumed.processed_shards == 16 - done
    prepare_dataset(photos, clean, 32, shard_size=4)
    for res in (4, 8, 16, 32):
        assert lmdb_contents(killed, res) == lmdb_contents(clean, res)
    assert len(lmdb_contents(clean, 32)) == resumed.records >= 60
    a, b = read_manifest(killed), read_manifest(clean)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_multi_face_gives_one_record_per_face(local_ray, tmp_path, sample_dir):
    from PIL import Image

    group = Image.new("RGB", (480, 200), (40, 80, 40))
    for i, name in enumerate(["face_0000.jpg", "face_0001.jpg", "face_0002.jpg"]):
        group.paste(Image.open(sample_dir / name).resize((150, 150)), (10 + 160 * i, 25))
    photos = tmp_path / "photos"
    photos.mkdir()
    group.save(photos / "group.jpg")
    out = tmp_path / "out"
    summary = prepare_dataset(photos, out, 16, multi_face=True)
    ds = LmdbImageDataset(out, 16)
    assert summary.records == 3
    assert [ds.key(i) for i in range(len(ds))] == ["group.jpg#0", "group.jpg#1", "group.jpg#2"]
