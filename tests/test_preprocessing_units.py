"""Unit tests of the preprocessing building blocks (no Ray): decode, detect+align, pyramid,
record format, config, sources, sample faces."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from preprocessing.align import crop_face, template_points
from preprocessing.config import ConfigError, make_config
from preprocessing.decode import decode_image
from preprocessing.detect import FaceDetector
from preprocessing.lmdb_store import (
    LmdbImageDataset,
    LmdbWriter,
    decode_record,
    encode_record,
    ordinal_key,
    record_format,
    write_manifest,
)
from preprocessing.process import ShardProcessor
from preprocessing.pyramid import build_pyramid
from preprocessing.rejects import RejectError
from preprocessing.resources import ResourceError, WorkerPlan, plan_workers
from preprocessing.samples import make_sample_faces
from preprocessing.sources import SourceError, open_source
from tests.fixtures_preprocessing import (
    BAD,
    GOOD,
    exif_rotated_jpeg,
    hopper,
    huge_png,
    lmdb_contents,
    write_bad_input_folder,
)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(device="cpu")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decode_good_variants_give_upright_rgb(name):
    face = hopper(256)
    arr = decode_image(GOOD[name](face))
    assert arr.dtype == np.uint8 and arr.shape == (face.height, face.width, 3)
    reference = np.asarray(face.convert("L"), float)
    gray = arr.astype(float).mean(axis=2)
    assert np.corrcoef(gray.ravel(), reference.ravel())[0, 1] > 0.95  # same picture, upright


def test_exif_orientation_is_applied():
    face = hopper(128)
    arr = decode_image(exif_rotated_jpeg(face))
    assert arr.shape[:2] == (face.height, face.width)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not_image"),
        (huge_png(30000, 30000), "too_large"),  # beyond Pillow's own bomb limit
        (huge_png(12000, 12000), "too_large"),  # beyond our max_image_pixels only
    ],
)
def test_decode_rejects_with_reason(data, reason):
    with pytest.raises(RejectError) as err:
        decode_image(data)
    assert err.value.reason == reason
    assert "BAD" not in err.value.detail


def test_bad_inputs_get_their_reasons_from_the_code(tmp_path):
    """Each bad input of the issue's list, run through reading and one shard of processing
    (decode, MTCNN, face selection; no Ray), is rejected with its reason; good ones are kept."""
    folder = write_bad_input_folder(tmp_path / "photos")
    source = open_source(folder)  # listed now ...
    (folder / "vanished.jpg").unlink()  # ... and gone when read
    config = make_config(resolution=32, min_face_size=64)
    items = [(k, source.location(k)) for k in source.keys]
    result = ShardProcessor(config, device="cpu").run(0, items, source.reader().read)
    reasons = {r.key: r.reason for r in result.rejects}
    assert reasons == BAD
    assert set(reasons.values()) >= {"truncated", "empty", "animated", "too_large", "not_image"}
    assert sorted(key for key, _ in result.records) == sorted(GOOD)


def test_alignment_puts_landmarks_on_template(detector):
    """Re-detecting the aligned crop finds eyes/nose/mouth where the template puts them."""
    photo = np.asarray(hopper(400).rotate(15, fillcolor=(0, 0, 0)))
    face = detector.detect([photo])[0][0]
    crop = crop_face(photo, face, 128, 0.25, "align")
    again = detector.detect([crop])[0][0]
    error = np.linalg.norm(again.landmarks - template_points(128, 0.25), axis=1)
    assert error.max() < 4.0, error  # pixels, in a 128 crop
    eyes = again.landmarks[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 2.0  # eyes level although the photo was rotated


def test_box_crop_is_square_around_the_box(detector):
    photo = np.asarray(hopper(300))
    face = detector.detect([photo])[0][0]
    crop = crop_face(photo, face, 64, 0.0, "box")
    again = detector.detect([np.asarray(Image.fromarray(crop).resize((160, 160)))])[0][0]
    assert again.size > 0.7 * 160


def test_pyramid_matches_average_pooling():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    levels = build_pyramid(img)
    assert sorted(levels) == [4, 8, 16, 32, 64]
    for res in (32, 16, 8, 4):
        above = torch.from_numpy(levels[2 * res]).permute(2, 0, 1)[None].float()
        pooled = F.avg_pool2d(above, 2)[0].permute(1, 2, 0).numpy()
        assert np.abs(levels[res].astype(float) - pooled).max() <= 0.5  # rounded pooling


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_record_round_trip_and_dataset(tmp_path, encoding):
    rng = np.random.default_rng(1)
    images = {f"k{i}.jpg": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(5)}
    order = ["k3.jpg", "k0.jpg", "k4.jpg", "k1.jpg", "k2.jpg"]  # records keep the given order
    writer = LmdbWriter(tmp_path, [4, 8])
    records = [
        (
            k,
            {
                8: encode_record(images[k], encoding),
                4: encode_record(images[k][::2, ::2], encoding),
            },
        )
        for k in order
    ]
    writer.append(records[:2])
    writer.append(records[2:])  # ordinals continue
    counts = writer.counts()  # what the LMDBs hold, as prepare records it in the manifest
    writer.close()
    assert counts == {4: 5, 8: 5}
    assert set(lmdb_contents(tmp_path, 4)) == {ordinal_key(i) for i in range(5)}
    write_manifest(
        tmp_path,
        {
            "resolutions": [4, 8],
            "counts": {str(r): n for r, n in counts.items()},
            "record_format": record_format(encoding),
        },
    )
    ds = pickle.loads(pickle.dumps(LmdbImageDataset(tmp_path, 8)))
    small = LmdbImageDataset(tmp_path, 4)
    assert [ds.key(i) for i in range(len(ds))] == order  # record i: the i-th appended
    for i in range(len(ds)):
        assert ds[i].dtype == torch.uint8 and ds[i].shape == (3, 8, 8)
        assert torch.equal(ds[i], torch.from_numpy(images[ds.key(i)]).permute(2, 0, 1))
        assert small.key(i) == ds.key(i)
        expected = torch.from_numpy(images[ds.key(i)][::2, ::2].copy()).permute(2, 0, 1)
        assert torch.equal(small[i], expected)
    with pytest.raises(IndexError):
        ds[5]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    assert torch.equal(next(iter(loader)), torch.stack([ds[i] for i in range(5)]))


def test_dataset_of_the_old_name_keyed_format_says_to_reprepare(tmp_path):
    write_manifest(
        tmp_path,
        {"resolutions": [4, 8], "counts": {"4": 1, "8": 1}, "record_format": {"encoding": "raw"}},
    )
    with pytest.raises(ValueError, match=r"older `progan prepare`.*--resolution 8 --force"):
        LmdbImageDataset(tmp_path, 8)


def test_raw_record_rejects_wrong_size():
    with pytest.raises(ValueError, match="expected 48"):
        decode_record(b"\0" * 10, "raw", 4)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"resolution": 100}, "resolution: must be a power of two"),
        ({"resolution": 2048}, "resolution: must be a power of two"),
        ({"resolution": 64, "min_prob": 2}, "min_prob:"),
        ({"resolution": 64, "detector": "dlib"}, "detector:"),
        ({"resolution": 64, "colour": 1}, "colour:"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        make_config(**values)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_sources_have_stable_relative_keys(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"1")
    (root / "b.png").write_bytes(b"22")
    (root / ".hidden").write_bytes(b"3")
    folder = open_source(root)
    assert folder.keys == ["a/x.jpg", "b.png"]
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as zf:
        zf.writestr("img/a/x.jpg", b"1")
        zf.writestr("img/b.png", b"22")
    archive = pickle.loads(pickle.dumps(open_source(tmp_path / "p.zip")))
    assert archive.keys == ["img/a/x.jpg", "img/b.png"] and archive.read("img/b.png") == b"22"
    (tmp_path / "list.txt").write_text("photos/b.png\n# comment\nphotos/a/x.jpg\n")
    listed = open_source(tmp_path / "list.txt")
    assert listed.keys == ["photos/a/x.jpg", "photos/b.png"]
    assert listed.read("photos/a/x.jpg") == b"1"
    assert open_source(root).fingerprint == folder.fingerprint
    (root / "b.png").write_bytes(b"333")
    assert open_source(root).fingerprint != folder.fingerprint
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")


def test_sample_faces_are_deterministic_and_detectable(tmp_path, detector):
    a = make_sample_faces(tmp_path / "a", n=40, seed=3)
    b = make_sample_faces(tmp_path / "b", n=40, seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == 40
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    images = [np.asarray(Image.open(a / f).convert("RGB")) for f in files]
    found = [faces for faces in detector.detect(images) if faces and faces[0].prob > 0.9]
    assert len(found) >= 38


NODE = {"CPU": 2.0}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("nodes", "workers", "gpus", "message"),
    [
        ([NODE, NODE], 2, 0.5, "gpus_per_worker: 0.5 asks for GPUs but the Ray cluster has 4 CPUs"),
        ([NODE], 3, None, "workers: 3 need 3 CPUs (1 each) but the Ray cluster has 2 CPUs"),
        ([GPU_NODE], 4, 0.5, "workers x gpus_per_worker = 4 x 0.5 = 2 GPUs but"),
        ([GPU_NODE, GPU_NODE], 2, 2, "gpus_per_worker: 2 does not fit on any one node"),
        ([{"CPU": 1.0, "GPU": 1.0}], None, None, "prepare needs at least 2 CPUs"),
    ],
)
def test_unschedulable_requests_are_refused_in_one_line(nodes, workers, gpus, message):
    with pytest.raises(ResourceError) as err:
        plan_workers(nodes, workers, gpus)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_worker_plans_fit_the_cluster():
    assert plan_workers([NODE, NODE], None, None) == WorkerPlan(4, 0.0)  # every CPU
    assert plan_workers([NODE, NODE], None, None, shards=3) == WorkerPlan(3, 0.0)
    assert plan_workers([GPU_NODE], 8, None) == WorkerPlan(8, 0.125)  # GPUs / workers
    assert plan_workers([GPU_NODE], None, 0.25, shards=4) == WorkerPlan(4, 0.25)
    assert plan_workers([GPU_NODE], 2, 0) == WorkerPlan(2, 0.0)  # CPU detection by choice


def test_a_stalled_pipeline_raises_after_the_timeout_saying_what_is_stuck():
    """run_pipeline's watchdog, on a stand-in for a Ray Dataset whose second shard never
    finishes (a real hang would need a hung Ray worker): it raises with the counts and the
    actor request instead of waiting forever."""
    import threading

    from preprocessing.ray_stages import StallError, run_pipeline

    release = threading.Event()

    class OneShardThenHang:
        def iter_rows(self):
            yield {"shard": 0}
            release.wait(30)

    seen = []
    try:
        with pytest.raises(StallError) as err:
            run_pipeline(OneShardThenHang(), 3, 0.5, WorkerPlan(2, 0.5), seen.append)
    finally:
        release.set()
    assert seen == [{"shard": 0}]
    assert str(err.value).startswith(
        "no shard finished in 0.5 s (1 of 3 done): stuck waiting for 2 detector actor(s) "
        "of 0.5 GPU + 1 CPU each"
    )
