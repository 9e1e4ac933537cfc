"""A finished run, reviewed in MLflow as a user would: through the client, the registered
model, `progan generate models:/...` and a real headless Chromium on `progan ui`.

All tests share the session's tiny demo run (tests/demo_run.py): three phases, 4x4 then
8x8, 96 images shown, logged every 16 images, checkpoints and sample grids every 32.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.driver.state import RunState
from preprocessing.lmdb_store import read_manifest
from tests.cluster_harness import free_port
from tests.conftest import REPO_ROOT
from tests.demo_run import PROGAN, progan

# one pytest-xdist worker runs every user of the session's demo run, so it is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_run")]
PHASES = ["00-0004-stabilize", "01-0008-transition", "02-0008-stabilize"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def review(demo_run):
    """The demo run's experiment, parent run and phase runs."""
    assert demo_run.out.returncode == 0, demo_run.out.stderr[-3000:]
    client = MlflowClient(demo_run.tracking_uri)
    experiment = client.get_experiment_by_name("progan")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "demo")
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == PHASES
    return SimpleNamespace(client=client, experiment=experiment, parent=parent, children=children)


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Steps of the images logged under `key` (MLflow names them KEY+step+N+...)."""
    names = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    return sorted(int(m.group(1)) for n in names if (m := re.search(rf"/{key}\+step\+(\d+)\+", n)))


def test_the_run_reads_as_one_training_run_with_its_dataset_and_system_metrics(review, demo_run):
    client, parent = review.client, review.parent
    pid = parent.info.run_id
    assert review.experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # one curve per loss over the whole run, keyed by images shown, equal to the phases' parts
    d_loss = history(client, pid, "d_loss")
    assert sorted(d_loss) == list(range(16, 97, 16))
    parts: dict[int, float] = {}
    for child in review.children.values():
        parts.update(history(client, child.info.run_id, "d_loss"))
    assert d_loss == parts
    assert sorted(history(client, pid, "g_loss")) == list(range(16, 97, 16))
    resolution = history(client, pid, "resolution")
    assert [resolution[s] for s in sorted(resolution)] == [4, 4, 8, 8, 8, 8]
    alpha = history(client, pid, "alpha")
    assert 0 < alpha[48] < alpha[64] < 1 and alpha[96] == 1  # the 8x8 fade-in
    assert sorted(history(client, pid, "SWDx1e3_avg")) == [64, 96]  # each 8x8 phase's end

    # sample grids as one image key with a step per checkpoint: the UI's slider
    assert image_steps(client, pid, "samples") == [32, 64, 96]
    grid = next(
        a.path
        for a in client.list_artifacts(pid, "images")
        if "+step+96+" in a.path and a.path.endswith(".png")
    )
    local = client.download_artifacts(pid, grid, str(demo_run.cwd))
    assert Image.open(local).size[0] > 2 * 8  # a grid of 8x8 faces

    # the prepared dataset is every run's training input
    manifest = read_manifest(demo_run.cwd / "runs" / "demo-data")
    for run in (parent, *review.children.values()):
        [used] = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert used.dataset.name == "demo-data"
        assert used.dataset.digest == manifest["fingerprint"][:16]
        assert json.loads(used.dataset.profile)["counts"] == manifest["counts"]
        assert {t.key: t.value for t in used.tags}["mlflow.data.context"] == "training"

    # MLflow's system metrics on every phase run
    for child in review.children.values():
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
            child.data.metrics
        ), child.info.run_name

    # checkpoints stored once: in Ray storage, pointed to from MLflow, not copied into it
    state = RunState.load(demo_run.run_dir / "state.json")
    for i, name in enumerate(PHASES):
        child = review.children[name]
        assert child.data.tags["checkpoint"] == state.phase(i).checkpoint
        assert "checkpoint" not in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert parent.data.tags["checkpoint"] == state.phase(2).checkpoint
    assert "generator.pt" not in {a.path for a in client.list_artifacts(pid)}

    # the phase table as an MLflow table
    table = json.loads(
        Path(client.download_artifacts(pid, "phases.json", str(demo_run.cwd))).read_text()
    )
    assert [row[table["columns"].index("phase")] for row in table["data"]] == PHASES


def test_the_registered_version_generates_what_progan_generate_does(review, demo_run, capsys):
    import mlflow.pytorch
    import torch

    from pipeline.cli import main
    from pipeline.tools.generator import sample_latents
    from pipeline.tracking.tracker import tracking_uri_set
    from progan.sampling import to_uint8

    client, pid = review.client, review.parent.info.run_id
    [version] = client.search_model_versions("name='progan'")
    assert version.run_id == pid
    swd = review.parent.data.metrics["SWDx1e3_avg"]
    assert float(version.tags["metric.SWDx1e3_avg"]) == pytest.approx(swd, rel=1e-5)
    assert version.tags["checkpoint"] == review.parent.data.tags["checkpoint"]
    # a run's new version, not yet reviewed (search results carry no aliases: ask by alias)
    assert client.get_model_version_by_alias("progan", "candidate").version == version.version
    client.set_registered_model_alias("progan", "reviewed", version.version)

    # the latent-in form for programs, logged beside the registered (servable) pyfunc
    logged = client.search_logged_models([review.experiment.experiment_id])
    [latent] = [m for m in logged if m.source_run_id == pid and m.name == "generator-latents"]
    with tracking_uri_set(demo_run.tracking_uri):
        model = mlflow.pytorch.load_model(f"models:/{latent.model_id}")
    with torch.no_grad():
        expected = to_uint8(model(sample_latents(3, 4, 16))).permute(0, 2, 3, 1).numpy()

    # as a user types it, by alias; by version and a missing version through the same code
    # in this process (each `progan` process costs ~30 s of imports on a busy machine)
    folder = demo_run.cwd / "by-alias"
    out = progan(
        "generate", "models:/progan@reviewed", "--seed", "3", "--n", "4", "--individual", folder,
        "--tracking-uri", demo_run.tracking_uri, cwd=demo_run.cwd,
    )  # fmt: skip
    assert out.returncode == 0
    assert np.array_equal(pngs(folder), expected)
    folder = demo_run.cwd / "by-version"
    argv = ["generate", f"models:/progan/{version.version}", "--seed", "3", "--n", "4",
            "--individual", str(folder), "--tracking-uri", demo_run.tracking_uri]  # fmt: skip
    assert main(argv) == 0
    assert np.array_equal(pngs(folder), expected)
    argv = ["generate", "models:/progan/99", "--out", "x.png"]
    assert main([*argv, "--tracking-uri", demo_run.tracking_uri]) == 2
    assert "cannot load models:/progan/99" in capsys.readouterr().err


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


@pytest.fixture
def ui(demo_run, tmp_path):
    """`progan ui` on a free loopback port over the demo run; yields the training-view URL
    it prints."""
    port, log = free_port(), tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PROGAN, "ui", "--root", "runs", "--port", str(port)],
            cwd=demo_run.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline, link = time.time() + 120, ""
        while not link:
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
            found = re.search(r"training view\): (\S+)", log.read_text())
            link = found.group(1) if found else ""
            time.sleep(0.2)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        yield link
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever MLflow left of its group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_progan_ui_shows_the_training_view_curves_samples_model_and_dataset(review, ui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    pid = review.parent.info.run_id
    run_page = ui.replace("/runs?", f"/runs/{pid}/model-metrics?")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # a busy machine's first search takes a while

        # the runs table in the model-training view: Dataset and Models columns filled
        page.goto(ui)
        row = page.get_by_role("row").filter(has_text="demo-data")
        expect(row).to_contain_text("demo")
        expect(row).to_contain_text(re.compile(r"progan\s*v1"))
        expect(page.get_by_role("columnheader", name="Dataset").first).to_be_visible()
        expect(page.get_by_text("Model training", exact=True)).to_be_visible()
        assert page.get_by_text("Evaluation runs").count() == 0  # no GenAI navigation
        assert "workflowType=machine_learning" in page.url and "/overview" not in page.url
        close_assistant(page)
        page.screenshot(path=shots / "mlflow-runs.png")

        # the parent run's charts: losses and SWD over images shown
        page.goto(run_page)
        search = page.get_by_placeholder("Search metric charts")
        for metric in ("d_loss", "g_loss", "SWDx1e3_avg"):
            search.fill(metric)
            expect(page.get_by_text(metric, exact=True).first).to_be_visible()
            expect(page.get_by_text(f"demo ({metric})")).to_be_visible()  # a line chart's legend
        search.fill("loss")
        close_assistant(page)
        page.wait_for_timeout(1000)
        page.screenshot(path=shots / "mlflow-losses.png")

        # the sample grids: one image card with a step slider over the checkpoints
        search.fill("samples")
        slider = page.get_by_role("slider")
        expect(slider).to_have_count(1)
        low, high = (
            int(slider.get_attribute("aria-valuemin")),
            int(slider.get_attribute("aria-valuemax")),
        )
        assert (low, high) == (32, 96)
        step = page.get_by_role("spinbutton")  # the slider's step box: move it to the end
        step.fill("96")
        step.blur()
        expect(slider).to_have_attribute("aria-valuenow", "96")
        expect(page.locator("img[src*='samples%2Bstep%2B96%2B']").first).to_be_attached()
        page.screenshot(path=shots / "mlflow-samples.png")
        browser.close()
    print(f"screenshots: {shots}")
    docs = os.environ.get("PROGAN_DOC_SCREENSHOTS")  # e.g. docs/img: refresh the docs' copies
    if docs:
        for shot in shots.iterdir():
            shutil.copy(shot, REPO_ROOT / docs / shot.name)


def close_assistant(page) -> None:
    """Close MLflow's assistant side panel (it opens by itself, a moment after the page,
    and hides part of it) if it shows up within a few seconds."""
    close = page.get_by_role("button", name="Close", exact=True)
    try:
        close.first.wait_for(state="visible", timeout=5000)
    except Exception:  # no panel: nothing to close
        return
    close.first.click()
