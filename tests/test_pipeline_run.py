"""The pipeline for real: Ray Train DDP phases, MLflow runs, failures and resume (tiny, CPU)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipeline.config import dump_config
from pipeline.driver.run import PhaseFailedError, run_pipeline
from pipeline.driver.run_dir import LOG_DIR, run_dir_of
from pipeline.driver.state import RunLock, RunLockedError, RunState
from pipeline.driver.storage import SNAPSHOT_FILE
from pipeline.phases.local import train_local
from pipeline.tracking.tracker import resolve_uri
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import load_checkpoint
from progan.data import PositionSampler
from progan.schedule import phase_plan
from tests import faults
from tests.conftest import REPO_ROOT
from tests.helpers import ignore_sigint, torch_threads
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def runs_of(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("progan")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def metric_steps(client: MlflowClient, run_id: str, key: str = "d_loss") -> list[int]:
    """Every logged step of `key` in logging order (a step logged twice shows twice)."""
    history = client.get_metric_history(run_id, key)
    return [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def cfg_uri(cfg) -> str:
    return resolve_uri(cfg.tracking.uri, cfg.run.root)


def expected_digest(dataset: LmdbImageDataset, shown: int, rank: int, world: int) -> str:
    """The rank's share of the global batch a ONE-worker run reads at `shown` (batch 8)."""
    order = PositionSampler(len(dataset), 8, seed=0).indices_at(shown)
    share = order[rank * 8 // world : (rank + 1) * 8 // world]
    return faults.batch_digest(torch.stack([dataset[i] for i in share]))


def assert_each_rank_read_its_share_of_the_one_worker_batches(cfg, batches: Path) -> None:
    """Every step of every phase ran once on each of the phase's ranks, each reading its share
    of the batch one worker would read at that point (`faults.records_batches` lines)."""
    seen = [line.split() for line in batches.read_text().splitlines()]
    levels = {r: LmdbImageDataset(cfg.data.dataset, r) for r in (4, 8)}
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    for shown, rank, world, digest in seen:
        shown, rank, world = int(shown), int(rank), int(world)
        phase = next(p for p in plan if p.start_images <= shown < p.end_images)
        assert world == cfg.scaling.workers_for(phase.resolution), (shown, world)
        assert digest == expected_digest(levels[phase.resolution], shown, rank, world), shown
    steps = {(int(s), int(r)) for s, r, _, _ in seen}
    for phase in plan:
        world = cfg.scaling.workers_for(phase.resolution)
        want = {
            (s, r) for s in range(phase.start_images, phase.end_images, 8) for r in range(world)
        }
        assert want <= steps, phase.name
    assert len(seen) == len(steps)  # no step trained twice


def test_a_ddp_run_growing_from_one_to_two_workers_is_tracked_and_reads_the_same_batches(
    local_ray, dataset, tmp_path
):
    # one worker at 4x4, DDP on two from 8x8 (`scaling.num_workers` by resolution)
    cfg = tiny_pipeline_config(
        dataset,
        tmp_path,
        scaling={"num_workers": {4: 1, 8: 2}},
        eval={"enabled": True, "metrics": ["swd"], "num_images": 32},
    )
    ended: list[tuple[str, dict]] = []
    batches = tmp_path / "batches.txt"
    result = run_pipeline(
        cfg,
        "ddp",
        on_phase_end=lambda p, m: ended.append((p.name, m)),
        test_hooks={"batches_file": str(batches)},
        worker_fn=faults.records_batches,
    )
    final = load_checkpoint(result.generator)
    assert final["images_shown"] == 288 and final["resolution"] == 8
    assert_each_rank_read_its_share_of_the_one_worker_batches(cfg, batches)

    client, runs = runs_of(result.tracking_uri)
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "00-0004-stabilize",
        "01-0008-transition",
        "02-0008-stabilize",
    ]
    params = parent.data.params
    assert (params["scaling.num_workers.4"], params["scaling.num_workers.8"]) == ("1", "2")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"phases.md", "images"}
    [version] = client.search_model_versions("name='progan'")
    assert version.run_id == parent.info.run_id
    for child in children:
        assert child.info.status == "FINISHED"
        tags = child.data.tags
        assert {"resolution", "phase_kind", "images", "ray_run_name", "git_commit"} <= set(tags)
        start = int(tags["phase_index"]) * 96
        assert metric_steps(client, child.info.run_id) == list(range(start + 16, start + 97, 16))
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "plots" in arts and "checkpoint" not in arts  # checkpoints stay in storage
    grids = [a for a in client.list_artifacts(parent.info.run_id, "images") if ".png" in a.path]
    assert len(grids) == 9  # 32, 64 and the end of each phase, as one image key
    # end-of-phase SWD (8x8: one level; none at 4x4) in the phase runs, parent, and caller
    for child in children:
        has_swd = "SWDx1e3_8" in child.data.metrics
        assert has_swd == (child.data.tags["resolution"] == "8"), child.info.run_name
    assert metric_steps(client, parent.info.run_id, "SWDx1e3_avg") == [192, 288]
    assert [name for name, m in ended if "SWDx1e3_avg" in m] == [
        "01-0008-transition",
        "02-0008-stabilize",
    ]
    assert "SWD x1e3" in (result.run_dir / "phases.md").read_text()
    transition = next(c for c in children if c.info.run_name == "01-0008-transition")
    alphas = [m.value for m in client.get_metric_history(transition.info.run_id, "alpha")]
    assert alphas == sorted(alphas) and 0 < alphas[-1] < 1


def test_worker_killed_mid_phase_is_restarted_from_checkpoint(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(
        dataset, tmp_path, scaling={"num_workers": 2}, schedule={"start_resolution": 8}
    )
    marker = tmp_path / "died"
    hooks = {"fail_at_images": 48, "fail_marker": str(marker)}
    result = run_pipeline(cfg, "fail", test_hooks=hooks, worker_fn=faults.dies_once)
    assert marker.read_text() == "48"  # the last rank's process did die after 48 images
    state = RunState.load(result.run_dir / "state.json")
    # the restarted workers restored Ray's checkpoint at 32, not the phase start
    assert state.phase(0).starts == [
        {"origin": "scratch", "images": 0},
        {"origin": "ray-checkpoint", "images": 32},
    ]
    assert load_checkpoint(result.generator)["images_shown"] == 96  # not double-counted
    client, runs = runs_of(result.tracking_uri)
    child = next(r for r in runs if r.info.run_name == "00-0008-stabilize")
    # every step once, in order: the restart does not log 48 a second time
    assert metric_steps(client, child.info.run_id) == list(range(16, 97, 16))
    assert child.data.tags["starts"] == "scratch@0, ray-checkpoint@32"


def test_nonfinite_loss_on_one_rank_fails_the_phase_without_restarts(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(
        dataset,
        tmp_path,
        scaling={"num_workers": 2},
        schedule={"start_resolution": 8},
        run={"max_failures": 2},
    )
    starts = tmp_path / "starts"
    hooks = {"nan_at_images": 32, "starts_file": str(starts)}
    with pytest.raises(PhaseFailedError, match=r"d_loss is not finite.*images_shown=32"):
        run_pipeline(cfg, "nan", test_hooks=hooks, worker_fn=faults.nan_on_last_rank)
    assert starts.read_text().splitlines() == ["start", "start"]  # 2 ranks, started once
    _, runs = runs_of(cfg_uri(cfg))
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["nan"] == status["00-0008-stabilize"] == "FAILED"


def test_a_worker_that_cannot_log_tells_the_driver_which_logs_for_it(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, schedule={"start_resolution": 8})
    console = Console(record=True, width=200)
    result = run_pipeline(cfg, "nolog", console=console, worker_fn=faults.cannot_log)
    said = console.export_text()
    assert "rank 0 cannot log to MLflow (ConnectionError: tracking server unreachable" in said
    assert "the metrics were logged from the driver instead" in said
    client, runs = runs_of(result.tracking_uri)
    [child] = [r for r in runs if r.info.run_name == "00-0008-stabilize"]
    assert metric_steps(client, child.info.run_id) == list(range(16, 97, 16))  # none lost
    assert "replayed by the driver" in child.data.tags["tracking.incomplete"]


def test_a_second_driver_on_the_same_run_is_refused(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path)
    with RunLock(run_dir_of(cfg, "busy")), pytest.raises(RunLockedError, match="pid"):
        run_pipeline(cfg, "busy")  # refused before Ray or MLflow start


def start_run_until_checkpoint(cfg, run_id: str, phase: str, **popen) -> subprocess.Popen:
    """`progan run` in a subprocess, returned once Ray has recorded a checkpoint of `phase`."""
    config = dump_config(cfg, Path(cfg.run.root).parent / f"{run_id}.yaml")
    exe = Path(sys.executable).parent / "progan"
    proc = subprocess.Popen(
        [str(exe), "run", str(config), "--run-id", run_id], cwd=REPO_ROOT, **popen
    )
    ray_dir = Path(cfg.run.root) / run_id / "ray"
    deadline = time.time() + 240
    snapshot = str(ray_dir / f"{run_id}-{phase}-*" / SNAPSHOT_FILE)
    # a checkpoint folder alone is not enough: Ray records it at its next poll, and a kill
    # before that leaves the phase to restart from its beginning
    while not faults.recorded_checkpoints(snapshot) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its phase had a checkpoint"
        time.sleep(0.1)
    return proc


def progan_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "progan"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True)


def test_ctrl_c_stops_a_run_started_with_sigint_ignored(local_ray, dataset, tmp_path):
    # `progan run &` in a script starts it with SIGINT ignored, which Python keeps; Ctrl-C
    # before the first phase (MLflow, Ray, the data) must still stop it, resumable
    cfg = tiny_pipeline_config(dataset, tmp_path)
    config = dump_config(cfg, tmp_path / "ignoring.yaml")
    exe = Path(sys.executable).parent / "progan"
    proc = subprocess.Popen(
        [str(exe), "run", str(config), "--run-id", "ignoring"],
        cwd=REPO_ROOT,
        preexec_fn=ignore_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    logs = Path(cfg.run.root) / "ignoring" / LOG_DIR  # made once its handlers are set
    deadline = time.time() + 60
    while not logs.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "progan resume" in out


def test_ctrl_c_then_kill_9_then_progan_resume_equals_the_uninterrupted_run(
    local_ray, dataset, tmp_path
):
    # 384 images a phase, a checkpoint every 32: each interruption lands mid-phase
    cfg = tiny_pipeline_config(
        dataset, tmp_path, schedule={"transition_kimg": 0, "stabilize_kimg": 0.384}
    )
    run_dir = tmp_path / "runs" / "killed"

    # Ctrl-C in phase 0: exit 130, the runs KILLED, a resume hint
    proc = start_run_until_checkpoint(
        cfg, "killed", "00", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert f"progan resume {run_dir}" in out
    _, runs = runs_of(cfg_uri(cfg))
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["killed"] == status["00-0004-stabilize"] == "KILLED"

    # the same run id again, then kill -9 of its process group in phase 1
    proc = start_run_until_checkpoint(
        cfg,
        "killed",
        "01",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray, its workers
    proc.wait()
    assert not RunState.load(run_dir / "state.json").finished

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = progan_cli("resume", str(run_dir), cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "phase 00-0004-stabilize: done earlier, skipped" in resumed.stdout
    state = RunState.load(run_dir / "state.json")
    assert state.finished
    # each interrupted phase continued from its Ray checkpoint mid-phase, not its start
    first, second = state.phase(0).starts
    assert first == {"origin": "scratch", "images": 0}
    assert second["origin"] == "ray-checkpoint" and 0 < second["images"] < 384, second
    [start] = state.phase(1).starts
    assert start["origin"] == "ray-checkpoint" and 384 < start["images"] < 768, start

    # the same plan without Ray, never interrupted, in this process (one thread, as Ray's
    # workers run): the same generator, bit for bit
    with torch_threads(1):
        reference = train_local(cfg, tmp_path / "local", console=Console(file=io.StringIO()))
    a, b = load_checkpoint(run_dir / "generator.pt"), load_checkpoint(reference.generator)
    assert a["images_shown"] == b["images_shown"] == 768
    for name, tensor in b["G_ema"].items():
        assert torch.equal(a["G_ema"][name], tensor), name

    client, runs = runs_of(cfg_uri(cfg))
    children = {r.info.run_name: r for r in runs if r.data.tags.get("ray_run_name", "")}
    for name, steps in (
        ("00-0004-stabilize", range(16, 385, 16)),
        ("01-0008-stabilize", range(400, 769, 16)),
    ):
        assert children[name].info.status == "FINISHED"
        assert metric_steps(client, children[name].info.run_id) == list(steps)  # once each

    # a finished run: `progan resume` from the runs root (relative) and from the project
    for cwd, path in ((tmp_path / "runs", "killed"), (REPO_ROOT, str(run_dir))):
        again = progan_cli("resume", path, cwd=cwd)
        assert again.returncode == 0 and "all phases done" in again.stdout, again.stdout
