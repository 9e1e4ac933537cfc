"""Verbs run as a user types them (`progan ...` in a subprocess), checked by what they make.

Each test starts the console script the package installs, from a directory of the test's
own, and asserts the exit status and the files or pages a user would look at.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import load_config_dict
from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from tests.cluster_harness import free_port
from tests.conftest import REPO_ROOT
from tests.demo_run import PROGAN, progan
from tests.helpers import ignore_sigint

# one pytest-xdist worker runs every user of the session's demo run, so it is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_run")]


def test_run_with_the_builtin_sample_faces_prepares_then_trains_like_make_demo(demo_run):
    """`make demo`'s path at a tiny size: built-in faces -> MTCNN -> LMDBs -> training
    (4x4 and 8x8; the run is shared with tests/test_mlflow_review.py)."""
    demo = REPO_ROOT / "conf" / "demo.yaml"
    assert load_config_dict(demo)["data"]["source"] == "builtin:sample-faces"
    out, tmp_path = demo_run.out, demo_run.cwd
    assert out.returncode == 0
    assert "making 12 built-in sample faces" in out.stdout
    faces = LmdbImageDataset(tmp_path / "runs" / "demo-data", 8)
    assert len(faces) > 0 and faces[len(faces) - 1].shape == (3, 8, 8)  # opening checks counts
    run_dir = demo_run.run_dir
    assert (run_dir / "generator.pt").is_file() and (run_dir / "phases.md").is_file()
    assert (tmp_path / "runs" / "mlflow.db").is_file()

    grid = progan("generate", run_dir, "--n", "4", "--out", "grid.png", cwd=tmp_path)
    assert grid.returncode == 0 and Image.open(tmp_path / "grid.png").size[0] > 8


def test_prepare_reads_a_zip_in_place_and_inspect_draws_a_contact_sheet(tmp_path):
    from preprocessing.samples import make_sample_faces

    photos = make_sample_faces(tmp_path / "photos", n=8, seed=1)
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(Path(photos).iterdir()):
            z.write(path, f"img/{path.name}")
        z.writestr("img/broken.jpg", b"not an image")
    out = progan(
        "prepare", archive, "data", "--resolution", "16", "--workers", "1",
        "--min-face-size", "24", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0
    # the LMDB holds exactly the accepted faces; every other input is a reported reject
    faces = LmdbImageDataset(tmp_path / "data", 16)
    kept = {faces.key(i) for i in range(len(faces))}
    assert all(faces[i].shape == (3, 16, 16) for i in range(len(faces)))
    with (tmp_path / "data" / "rejects.csv").open() as f:
        rejected = {row["key"] for row in csv.DictReader(f)}
    inputs = {f"img/{p.name}" for p in Path(photos).iterdir()} | {"img/broken.jpg"}
    assert kept and "img/broken.jpg" in rejected and not kept & rejected
    assert kept | rejected == inputs
    assert read_manifest(tmp_path / "data")["counts"]["16"] == len(kept)

    sheet = progan("inspect", "data", cwd=tmp_path)
    assert sheet.returncode == 0
    assert Image.open(tmp_path / "data" / "contact_sheet.png").size[0] > 16


def signal_masks(pid: int) -> str:
    """A process's blocked, ignored and caught signal masks and kernel wait channel (Linux)."""
    proc = Path(f"/proc/{pid}")
    masks = [ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("Sig")]
    return ", ".join([*masks, f"wchan {(proc / 'wchan').read_text()}"])


@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-c-started-ignoring-it", "kill"])
def test_ui_serves_the_runs_store_on_loopback_and_frees_its_port_when_stopped(tmp_path, stop):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "runs"
    root.mkdir()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_run(client.create_experiment("progan"), run_name="a-run")
    port = free_port()
    # a file, not a pipe nobody reads: a log longer than a pipe holds (64 KiB) would block
    # the writer; and a failure below can show the whole log
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PROGAN, "ui", "--root", str(root), "--port", str(port)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ignore_sigint if stop == "ctrl-c-started-ignoring-it" else None,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline, page = time.time() + 120, ""
        while time.time() < deadline and not page:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    page = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert "<html" in page.lower() and "mlflow" in page.lower()
        api = f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=progan"
        with urllib.request.urlopen(api, timeout=10) as r:
            assert '"name": "progan"' in r.read().decode().replace('":"', '": "')
    finally:
        if stop.startswith("ctrl-c"):  # the terminal signals the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # `kill PID` of progan alone: its server must go too
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            signals = signal_masks(proc.pid)  # SIGINT is bit 2: blocked, ignored or caught?
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(
                f"progan ui still ran 60 s after {stop} ({signals}); its log:\n{log.read_text()}"
            )
    assert proc.returncode in (0, -signal.SIGINT, 130), log.read_text()[-3000:]
    deadline = time.time() + 15
    while True:  # nothing listens on the port any more (MLflow's uvicorn worker included)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.time() < deadline, f"port {port} still served after progan ui stopped"
        time.sleep(0.2)


def test_ui_links_a_tracking_server_instead_of_serving_it_again(tmp_path):
    done = subprocess.run(
        [PROGAN, "ui", "--uri", "http://ann:s3cret@127.0.0.1:9"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "http://ann:***@127.0.0.1:9 is an MLflow tracking server with its own UI" in (
        done.stdout
    )
    assert "s3cret" not in done.stdout + done.stderr


@pytest.mark.slow  # a real `mlflow server`
def test_ui_against_a_real_tracking_server_prints_its_training_view_link(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.cluster_harness import mlflow_server

    with mlflow_server(tmp_path / "server") as url:
        experiment = MlflowClient(tracking_uri=url).create_experiment("progan")
        done = subprocess.run(
            [PROGAN, "ui", "--uri", url], cwd=tmp_path, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    link = f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert f"runs of progan (training view): {link}" in done.stdout, done.stdout


def test_train_local_then_every_generator_tool_from_the_shell(tmp_path):
    """train-local, then generate, interpolate, edit, export and evaluate on its output,
    each as a separate `progan` process (their properties are in tests/test_tools.py)."""
    import json

    import torch

    from pipeline.config import dump_config
    from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

    dataset = make_tiny_dataset(tmp_path, n=16, resolution=8)
    cfg = tiny_pipeline_config(dataset, tmp_path, schedule={"start_resolution": 8})
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    trained = progan("train-local", config, "--out", "local", "--device", "cpu", cwd=tmp_path)
    assert trained.returncode == 0
    run = tmp_path / "local"
    assert torch.load(run / "generator.pt", weights_only=True)["images_shown"] == 96

    steps = [
        (["generate", run, "--n", "4", "--out", "grid.png"], "grid.png"),
        (["interpolate", run, "--steps", "2", "--keyframes", "2", "--out", "walk.gif"], "walk.gif"),
        (["edit", run, "--with", "1,2", "--targets", "0", "--strengths=-1,0,1",
          "--out", "edit.png"], "edit.png"),
        (["export", run, "--format", "torchscript", "--out", "g.pt"], "g.pt"),
        (["evaluate", run, "--data", dataset, "--metrics", "swd", "--num-images", "16",
          "--json", "eval.json"], "eval.json"),
    ]  # fmt: skip
    for args, made in steps:
        out = progan(*args, cwd=tmp_path)
        assert out.returncode == 0, args[0]
        assert (tmp_path / made).stat().st_size > 0, args[0]
    assert Image.open(tmp_path / "walk.gif").n_frames == 4  # 2 keyframes x 2 steps, looping
    assert "SWDx1e3_avg" in json.loads((tmp_path / "eval.json").read_text())
    z = torch.randn(2, cfg.model.latent_size)
    assert torch.jit.load(str(tmp_path / "g.pt"))(z).shape == (2, 3, 8, 8)
