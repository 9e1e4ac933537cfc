"""The smaller holes a run left alone for days could fall into, one test each: shared file
modes, non-UTF-8 file names, fewer GPUs on resume, bad values, run ids, locks, a dataset
prepared again, torch's safe loading, Ray's checkpoint list cut short."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

from pipeline.config import ConfigError, dump_config
from pipeline.driver.run import check_same_dataset
from pipeline.driver.state import RunLock, RunState
from pipeline.driver.storage import (
    SNAPSHOT_FILE,
    StorageError,
    claim_storage,
    recover_unreadable_snapshot,
)
from pipeline.phases.checkpoints import STATE_FILE, checkpoint_name
from preprocessing.lmdb_store import read_manifest, write_json_atomic
from preprocessing.prepare import OutputLock
from progan.checkpoint import rng_state, save_checkpoint, set_rng_state
from progan.files import atomic_file
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config


def progan(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "progan"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_the_umask_gives_like_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "a.bin") as f:
            f.write(b"x")
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "state.pt")
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("a.bin", "state.pt", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name


def flat_photos(folder: Path, n: int) -> Path:
    """`n` plain grey 16x16 PNGs (prepared with --detector none)."""
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow  # `progan` subprocesses
def test_prepare_reruns_with_a_rejected_file_whose_name_is_not_utf8(tmp_path):
    photos = flat_photos(tmp_path / "photos", 3)
    bad = os.fsencode(photos) + b"/caf\xe9.jpg"  # Latin-1, as old cameras and zips write
    with open(bad, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "dataset"
    args = ("prepare", str(photos), str(out), "--resolution", "4", "--detector", "none")
    for attempt in range(2):  # the rerun (resume) read and rewrote rejects.csv
        done = progan(*args)
        assert done.returncode == 0, (attempt, done.stdout[-2000:], done.stderr[-2000:])
    rows = (out / "rejects.csv").read_bytes().splitlines()
    assert rows[1].startswith(b"caf\xe9.jpg,not_image")  # the file's own name, byte for byte
    assert read_manifest(out)["counts"]["4"] == 3


def test_cuda_rng_states_restore_on_a_node_with_fewer_gpus(monkeypatch):
    # mocked: this machine has no GPU. A checkpoint saved with 2 GPUs visible, restored
    # where torch sees 1: the first state goes to GPU 0, none to a GPU that is not there
    state = rng_state()
    state["cuda"] = [torch.zeros(816, dtype=torch.uint8), torch.ones(816, dtype=torch.uint8)]
    calls = []

    def set_rng(new_state, device):
        if device >= 1:
            raise IndexError("list index out of range")  # what torch raises there
        calls.append((int(new_state[0]), device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng)
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state_all",
        lambda states: [set_rng(s, i) for i, s in enumerate(states)],
    )
    set_rng_state(state)
    assert calls == [(0, 0)]


@pytest.mark.slow  # `progan` subprocesses
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("schedule.batch_size.8=0", "schedule.batch_size.8"),
        ("schedule.lr.8=-0.001", "schedule.lr.8"),
    ],
)
def test_a_zero_batch_or_negative_lr_is_refused_naming_the_key(tmp_path, override, named):
    cfg = tiny_pipeline_config(tmp_path / "none", tmp_path)
    config = dump_config(cfg, tmp_path / "c.yaml")
    done = progan("run", str(config), override, "--dry-run")
    assert done.returncode == 2, done.stdout[-2000:]
    said = " ".join(done.stdout.split())
    assert named in said and "greater than 0" in said


@pytest.mark.slow  # `progan` subprocesses
@pytest.mark.parametrize("run_id", ["../escaped", "x;touch pwned"])
def test_a_run_id_that_is_not_a_plain_name_is_refused_by_run_and_submit(tmp_path, run_id):
    cfg = tiny_pipeline_config(tmp_path / "none", tmp_path)
    config = dump_config(cfg, tmp_path / "c.yaml")
    for verb in (("run", str(config)), ("submit", str(config), "--address", "http://127.0.0.1:1")):
        done = progan(*verb, "--run-id", run_id, cwd=tmp_path)
        assert done.returncode == 2, (verb, done.stdout[-2000:], done.stderr[-2000:])
        said = " ".join(done.stdout.split())
        assert "--run-id" in said and "letters, digits" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow  # `progan` subprocesses
def test_a_second_prepare_into_the_same_output_is_refused_and_deletes_nothing(tmp_path):
    photos = flat_photos(tmp_path / "photos", 2)
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "res-4").mkdir()  # what the other prepare has written so far
    with OutputLock(out):  # the other prepare, still running
        done = progan("prepare", str(photos), str(out), "--resolution", "4", "--detector", "none")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    said = " ".join((done.stdout + done.stderr).split())  # rich wraps at 80 columns
    assert f"{out} is being prepared by pid {os.getpid()}" in said
    assert sorted(p.name for p in out.iterdir()) == [".lock", "res-4"]


def test_a_file_system_without_flock_falls_back_to_posix_locks(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with RunLock(tmp_path / "run"):
        # another process (POSIX locks are per process) is refused with the usual message
        probe = (
            "import fcntl, os, sys\n"
            f"fd = os.open({str(tmp_path / 'run' / '.lock')!r}, os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0  # released


def test_a_second_run_root_with_the_same_run_id_and_storage_is_refused(tmp_path):
    storage = str(tmp_path / "shared-storage")
    claim_storage(storage, "exp1", "claim-of-root-a", tmp_path / "a" / "exp1")
    claim_storage(storage, "exp1", "claim-of-root-a", tmp_path / "a" / "exp1")  # a resume
    with pytest.raises(StorageError, match=r"already holds run exp1 of .*/a/exp1"):
        claim_storage(storage, "exp1", "claim-of-root-b", tmp_path / "b" / "exp1")
    claim_storage(storage, "exp2", "claim-of-root-b", tmp_path / "b" / "exp2")  # another id


def test_a_run_refuses_a_dataset_prepared_again_since_it_started(tmp_path):
    first = make_tiny_dataset(tmp_path / "one", n=12, resolution=8)
    cfg = tiny_pipeline_config(first, tmp_path)
    state = RunState(run_id="r")
    check_same_dataset(cfg, state)  # the first start records the fingerprint
    check_same_dataset(cfg, state)  # a resume on the same data
    other = make_tiny_dataset(tmp_path / "two", n=10, resolution=8)
    (first / "manifest.json").write_text((other / "manifest.json").read_text())
    with pytest.raises(ConfigError, match="was prepared again since run r started"):
        check_same_dataset(cfg, state)


def test_an_unreadable_ray_checkpoint_list_is_set_aside_for_the_newest_loadable_checkpoint(
    tmp_path,
):
    storage, name = str(tmp_path / "ray"), "run-00-0004-stabilize"
    phase_dir = tmp_path / "ray" / name
    for shown in (32, 64):
        save_checkpoint({"images_shown": shown}, phase_dir / checkpoint_name(shown) / STATE_FILE)
    (phase_dir / checkpoint_name(96)).mkdir()  # an upload cut short: no state.pt
    (phase_dir / checkpoint_name(96) / STATE_FILE).write_bytes(b"\x80\x02half")
    snapshot = phase_dir / SNAPSHOT_FILE
    snapshot.write_text(json.dumps({"checkpoint_results": []}))
    assert recover_unreadable_snapshot(storage, name) is None  # readable: left alone
    snapshot.write_text('{"ray_version": "2.60.0", "checkpoint_res')  # cut mid-write
    aside, checkpoint = recover_unreadable_snapshot(storage, name)
    assert checkpoint == f"{storage}/{name}/{checkpoint_name(64)}"
    assert not snapshot.exists() and Path(aside).read_text().endswith("checkpoint_res")


def test_torch_is_required_at_a_version_whose_safe_loading_runs_no_code():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch_dep] = [d for d in deps if d.startswith("torch>")]
    lowest = torch_dep.split(">=")[1].split(",")[0]
    assert tuple(int(x) for x in lowest.split(".")) >= (2, 6)  # CVE-2025-32434
    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
