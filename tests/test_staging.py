"""A dataset in object storage (moto's S3 server on 127.0.0.1), staged on a node's disk.

Published by `progan prepare SOURCE s3://...` (the CLI, as a user types it), staged one
resolution at a time into a cache shared by the node's processes: verified against the
manifest, reused, fetched again when damaged, evicted to stay under its size limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from preprocessing.staging import EVENTS, StagingError, data_file, publish, stage
from tests.pipeline_helpers import make_tiny_dataset
from tests.s3_harness import s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp, s3_server(tmp_path_factory.mktemp("s3")) as server:
        for key, value in server.env.items():
            mp.setenv(key, value)
        yield server


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("local"), n=24, resolution=16)


def events(cache: Path) -> list[dict]:
    path = cache / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def actions(cache: Path, since: int = 0) -> list[tuple[str, str]]:
    return [(e["file"], e["action"].split(" ")[0]) for e in events(cache)[since:]]


def same_images(a: Path | str, b: Path | str, resolution: int) -> bool:
    x, y = LmdbImageDataset(a, resolution), LmdbImageDataset(b, resolution)
    return len(x) == len(y) and all(torch.equal(x[i], y[i]) for i in range(len(x)))


def test_a_staged_resolution_is_verified_reused_and_fetched_again_when_damaged(s3, local, tmp_path):
    uri = s3.uri("published")
    manifest = publish(local, uri)
    assert set(manifest["files"]) >= {data_file(r) for r in (4, 8, 16)} | {"keys/data.mdb"}
    assert f"published/{data_file(8)}" in s3.objects("published/")
    cache = tmp_path / "cache"

    folder = stage(uri, [8], cache)
    assert actions(cache) == [(data_file(8), "download")]
    assert same_images(folder, local, 8)
    assert not (folder / data_file(16)).exists()  # only the phase's resolution
    assert read_manifest(folder)["fingerprint"] == read_manifest(local)["fingerprint"]

    assert stage(uri, [8], cache) == folder  # a second stage (another worker, a later run)
    assert actions(cache, 1) == [(data_file(8), "hit")]

    damaged = folder / data_file(8)  # a byte changed in place, as a bad disk would
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    stage(uri, [8], cache)
    assert actions(cache, 2) == [(data_file(8), "refetch")]
    assert same_images(folder, local, 8)


def _stage_in_a_process(uri: str, cache: str) -> str:
    """`stage` in a worker process whose downloads take 3 s longer (so that two overlap)."""
    import preprocessing.staging as staging

    download = staging.download

    def slow_download(*args):
        time.sleep(3)
        return download(*args)

    staging.download = slow_download
    return str(staging.stage(uri, [16], cache))


def test_the_workers_of_a_node_share_one_download(s3, local, tmp_path):
    """Two processes (two training workers of a node) stage the same resolution at once
    (each download slowed to 3 s, so they overlap): one downloads, the other waits on the
    dataset's lock and finds it there."""
    import multiprocessing

    uri = s3.uri("shared")
    publish(local, uri)
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.starmap(_stage_in_a_process, [(uri, str(cache))] * 2)
    assert folders[0] == folders[1]
    assert sorted(actions(cache)) == [(data_file(16), "download"), (data_file(16), "hit")]
    assert same_images(folders[0], local, 16)


def test_the_cache_stays_under_its_limit_by_evicting_the_least_recently_used(s3, local, tmp_path):
    uri = s3.uri("limited")
    files = publish(local, uri)["files"]
    size_8, size_16 = files[data_file(8)]["bytes"], files[data_file(16)]["bytes"]
    cache = tmp_path / "cache"
    limit = size_16 + size_8 // 2  # holds 16x16 or 8x8, not both
    folder = stage(uri, [8], cache, max_bytes=limit)
    stage(uri, [16], cache, max_bytes=limit)
    assert actions(cache) == [
        (data_file(8), "download"),
        (data_file(8), "evict"),
        (data_file(16), "download"),
    ]
    assert not (folder / data_file(8)).exists()
    assert same_images(folder, local, 16)
    with pytest.raises(StagingError, match=r"data\.cache_max_gb"):
        stage(uri, [8, 16], cache, max_bytes=limit)


def test_a_dataset_prepared_again_at_the_same_uri_replaces_the_staged_copy(s3, tmp_path):
    uri = s3.uri("again")
    first = make_tiny_dataset(tmp_path / "first", n=12, resolution=8)
    second = make_tiny_dataset(tmp_path / "second", n=16, resolution=8)
    cache = tmp_path / "cache"
    publish(first, uri)
    folder = stage(uri, [8], cache)
    assert len(LmdbImageDataset(folder, 8)) == 12
    publish(second, uri)
    assert stage(uri, [8], cache) == folder
    assert len(LmdbImageDataset(folder, 8)) == 16
    assert actions(cache)[-2:] == [("manifest.json", "replaced"), (data_file(8), "download")]


def test_a_manifest_without_a_file_list_is_refused_in_one_line(s3, local, tmp_path):
    from preprocessing.object_store import join, write_bytes

    uri = s3.uri("hand-copied")
    write_bytes(join(uri, "manifest.json"), json.dumps(read_manifest(local)).encode())
    with pytest.raises(StagingError, match="lists no files"):
        stage(uri, [8], tmp_path / "cache")


@pytest.mark.slow
def test_progan_prepare_publishes_into_a_bucket_and_confirms_it_on_a_rerun(s3, local, tmp_path):
    """`progan prepare PHOTOS s3://...`: the bucket holds the same records as a local prepare
    of the same photos, the manifest last; a rerun does nothing; another source is refused."""
    photos = local.parent / "photos"
    uri = s3.uri("celeba-16")
    env = {**os.environ, "PROGAN_CACHE_DIR": str(tmp_path / "work")}
    command = [sys.executable, "-m", "pipeline.cli", "prepare", str(photos), uri]
    # 3 shards: Ray Data workers (kept on this node: the work folder is on its disk)
    options = ["--resolution", "16", "--detector", "none", "--shard-size", "16", "--workers", "1"]

    def prepare(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *options, *extra], env=env, capture_output=True, text=True, timeout=300
        )

    out = prepare()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "s3://progan-test/celeba-16" in out.stdout and "endpoint_override" not in out.stdout
    manifest = read_manifest(uri)
    assert manifest["counts"] == read_manifest(local)["counts"]  # (another shard size)
    folder = stage(uri, [4, 16], tmp_path / "cache")
    assert same_images(folder, local, 16) and same_images(folder, local, 4)
    assert not list((tmp_path / "work").rglob("data.mdb"))  # the work folder is gone

    again = prepare()
    assert again.returncode == 0 and "already complete" in again.stdout
    other = prepare("--limit", "10")
    assert other.returncode == 2
    said = " ".join(other.stderr.split())  # rich wraps the line at the console's width
    assert "different source or config" in said and "limit: None -> 10" in said
    assert "--force" in said


@pytest.mark.slow
def test_train_local_stages_each_resolution_once_and_a_second_run_downloads_nothing(
    s3, local, tmp_path
):
    """`progan train-local` on `data.dataset: s3://...`: each phase reads its resolution from
    the node's cache; 8x8 (two phases and their evaluations) is fetched once, 16x16 (not
    planned) never; a second run of the same dataset on the node downloads nothing."""
    from pipeline.config import dump_config
    from tests.faults import progan_command
    from tests.pipeline_helpers import tiny_pipeline_config

    uri = s3.uri("train-local")
    publish(local, uri)
    cache = tmp_path / "cache"
    cfg = tiny_pipeline_config(
        local,
        tmp_path,
        data={"dataset": uri, "cache_dir": str(cache)},
        eval={"enabled": True, "metrics": ["swd"], "num_images": 24},
    )
    config = dump_config(cfg, tmp_path / "c.yaml")
    for run in ("first", "second"):
        out = subprocess.run(
            progan_command("train-local", str(config), "--out", str(tmp_path / run)),
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert (tmp_path / run / "generator.pt").is_file()
    staged = events(cache)
    downloads = [e["file"] for e in staged if e["action"] == "download"]
    assert downloads == [data_file(4), data_file(8)]
    second = [e["action"] for e in staged if e["pid"] == staged[-1]["pid"]]
    assert second == ["hit"] * 3  # each of 3 phases, once for its training and evaluation


def test_uris_keep_their_query_and_get_their_password_back():
    """`join` puts path parts before a URI's query (pyarrow's endpoint options); `display`
    drops the query and credentials; a checkpoint URI stored redacted gets the password back."""
    from pipeline.driver.storage import checkpoint_uri, with_storage_credentials
    from pipeline.tracking.secrets import redact_uri
    from preprocessing.object_store import display, join

    storage = "s3://key:pw-123456@bucket/ray?endpoint_override=127.0.0.1:9000&scheme=http"
    uri = checkpoint_uri(storage, "run-00-0004-stabilize", "/tmp/x/images-000000096")
    assert uri == (
        "s3://key:pw-123456@bucket/ray/run-00-0004-stabilize/images-000000096"
        "?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert display(uri) == "s3://bucket/ray/run-00-0004-stabilize/images-000000096"
    assert with_storage_credentials(redact_uri(uri), storage) == uri
    assert join("/data/set", "res-0008", "data.mdb") == "/data/set/res-0008/data.mdb"
    assert with_storage_credentials("/r/a/images-1", "/r") == "/r/a/images-1"
