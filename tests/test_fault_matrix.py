"""Left alone, a run loses nothing: the CLI fault matrix, and an evaluation that fails.

One tiny 3-phase run (4x4 -> 8x8, evaluation at every phase end, a real `mlflow server`) is
killed with kill -9 of its whole process group at each point where a kill could lose work,
each time continued with `progan resume` (tests/fault_cli.py installs the fault as a hook in
the worker or the driver, at a named point: never a sleep). In between, Ray's checkpoint
list of a phase is truncated, and the tracking server is stopped across a phase boundary.
The generator at the end is bit-equal to the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipeline.config import dump_config
from pipeline.driver.run import run_pipeline
from pipeline.driver.state import RunState
from pipeline.driver.storage import SNAPSHOT_FILE
from pipeline.phases.local import train_local
from progan.checkpoint import load_checkpoint
from tests import faults
from tests.cluster_harness import free_port, mlflow_server
from tests.conftest import REPO_ROOT
from tests.helpers import torch_threads
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow

EVAL = {"enabled": True, "metrics": ["swd"], "num_images": 16}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), resolution=8)


def progan(*args: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`progan ARGS` (the console script), or with a fault: `python -m tests.fault_cli`;
    in its own process group, so that a kill -9 of it takes its Ray along."""
    command = faults.progan_command(*args, fault=fault)
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=400)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what a kill left of its Ray
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


class RestartingServer:
    """A real `mlflow server` on one port that a driver hook can ask to stop (it stops,
    stays down for `down_s`, then comes back on the same store and port)."""

    def __init__(self, store: Path, signal_file: Path, down_s: float = 4.0) -> None:
        self.store, self.signal, self.down_s = store, signal_file, down_s
        self.port, self.stack = free_port(), contextlib.ExitStack()
        self.url = self.stack.enter_context(mlflow_server(store, port=self.port))
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        stop = Path(f"{self.signal}.stop")
        while not self.done.is_set() and not stop.exists():
            time.sleep(0.05)
        if self.done.is_set():
            return
        self.stack.close()  # the server is gone
        Path(f"{self.signal}.stopped").touch()
        time.sleep(self.down_s)
        self.stack.enter_context(mlflow_server(self.store, port=self.port))

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=180)
        self.stack.close()


def truncate(path: Path) -> None:
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])  # a kill or a full disk mid-write


def test_kill_9_anywhere_then_progan_resume_gives_the_uninterrupted_generator(dataset, tmp_path):
    server = RestartingServer(tmp_path / "mlflow", tmp_path / "server")
    try:
        cfg = tiny_pipeline_config(
            dataset, tmp_path, eval=EVAL, tracking={"uri": server.url, "outage_wait_s": 120}
        )
        config = dump_config(cfg, tmp_path / "matrix.yaml")
        run_dir = Path(cfg.run.root) / "matrix"
        resume = ("resume", str(run_dir))
        said = []

        def killed(args, fault) -> None:
            result = progan(*args, fault=fault)
            said.append(result.stdout)
            assert result.returncode == -signal.SIGKILL, result.stdout[-3000:]

        # phases: 00 4x4 [0, 96), 01 8x8 fade-in [96, 192), 02 8x8 [192, 288); a checkpoint
        # every 32 images
        snapshot = str(run_dir / "ray" / f"matrix-00-*/{SNAPSHOT_FILE}")
        killed(("run", str(config), "--run-id", "matrix"), ("mid-step", "48", snapshot))
        truncate(next((run_dir / "ray").glob(f"matrix-00-*/{SNAPSHOT_FILE}")))
        killed(resume, ("checkpoint-write", "160"))  # phase 01, its second checkpoint
        snapshot = str(run_dir / "ray" / f"matrix-01-*/{SNAPSHOT_FILE}")
        killed(resume, ("evaluation", "1", snapshot))  # phase 01's end-of-phase evaluation
        killed(resume, ("after-final-report", "1"))  # phase 01 trained, state not written
        killed(resume, ("config-write", "0"))  # the next start, writing config.yaml
        assert not (run_dir / "config.yaml").read_text().startswith("run:\n  root: /half")
        ended = progan(*resume, fault=("server-stop", "2", str(tmp_path / "server")))
        said.append(ended.stdout)
        assert ended.returncode == 0, ended.stdout[-4000:]
    finally:
        server.close()
    console = "".join(said)
    assert "Ray's checkpoint list was unreadable" in console
    assert "continuing from images-000000032" in console
    assert "does not answer (create_run); waiting up to 120 s" in console
    assert "MLflow server answers again" in console

    state = RunState.load(run_dir / "state.json")
    assert state.finished
    # the worker starts of the drivers that outlived their fit (a killed driver never read
    # its workers' messages): phase 00 from the checkpoint found beside the truncated list,
    # phase 01 twice from its final checkpoint (evaluated only), phase 02 from phase 01's
    starts = {i: [(s["origin"], s["images"]) for s in state.phase(i).starts] for i in range(3)}
    assert starts[0] == [("storage-checkpoint", 32)]
    assert starts[1] == [("ray-checkpoint", 192), ("ray-checkpoint", 192)]
    assert starts[2] == [("previous-phase", 192)]
    assert "SWDx1e3_avg" in state.phase(1).evaluation and "SWDx1e3_avg" in state.phase(2).evaluation

    # the same plan without Ray, never interrupted (one thread, as Ray's workers run)
    with torch_threads(1):
        reference = train_local(cfg, tmp_path / "local", console=Console(file=io.StringIO()))
    a, b = load_checkpoint(run_dir / "generator.pt"), load_checkpoint(reference.generator)
    assert a["images_shown"] == b["images_shown"] == 288
    for name, tensor in b["G_ema"].items():
        assert torch.equal(a["G_ema"][name], tensor), name

    with mlflow_server(tmp_path / "mlflow", port=server.port) as url:
        runs = MlflowClient(url).search_runs(
            [MlflowClient(url).get_experiment_by_name("progan").experiment_id]
        )
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["matrix"] == "FINISHED"
    assert all(status[p] == "FINISHED" for p in status if p[:3] in ("00-", "01-", "02-"))


def test_an_evaluation_that_raises_ends_the_phase_and_is_reported(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, eval=EVAL, schedule={"start_resolution": 8})
    console = Console(record=True, width=300)
    result = run_pipeline(cfg, "evalfails", console=console, worker_fn=faults.evaluation_raises)
    said = console.export_text()
    # trained once (no restart from an earlier checkpoint), recorded, the error said once
    state = RunState.load(result.run_dir / "state.json")
    assert state.finished and state.phase(0).done
    assert state.phase(0).starts == [{"origin": "scratch", "images": 0}]
    assert state.phase(0).evaluation_error == "RuntimeError: metrics cache is corrupt (injected)"
    assert said.count("evaluation failed (RuntimeError: metrics cache is corrupt") == 1
    assert load_checkpoint(result.generator)["images_shown"] == 96
    client = MlflowClient(result.tracking_uri)
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("progan").experiment_id])
    }
    for name in ("evalfails", "00-0008-stabilize"):
        assert runs[name].data.tags["eval.error"].startswith("RuntimeError: metrics cache")
        assert runs[name].info.status == "FINISHED"


def test_a_dataset_too_small_to_evaluate_is_refused_before_training(tmp_path):
    small = make_tiny_dataset(tmp_path / "small", n=6, resolution=8)
    cfg = tiny_pipeline_config(small, tmp_path, eval=EVAL)
    config = dump_config(cfg, tmp_path / "small.yaml")
    result = progan("run", str(config), "--run-id", "small")
    assert result.returncode == 2, result.stdout[-3000:]
    assert "has only 6 images at 4x4; the end-of-phase evaluation needs at least 8" in (
        result.stdout
    )
    assert not (Path(cfg.run.root) / "small" / "ray").exists()  # nothing was trained


def test_replicas_that_differ_at_the_end_fail_the_phase_before_its_final_checkpoint(
    local_ray, dataset, tmp_path
):
    cfg = tiny_pipeline_config(
        dataset,
        tmp_path,
        scaling={"num_workers": 2},
        schedule={"start_resolution": 8},
        run={"max_failures": 1},
    )
    starts = tmp_path / "starts"
    hooks = {"starts_file": str(starts)}
    with pytest.raises(Exception, match="DDP replicas diverged"):
        run_pipeline(cfg, "drift", test_hooks=hooks, worker_fn=faults.diverges_at_the_end)
    assert len(starts.read_text().splitlines()) == 4  # 2 ranks, started twice, failed twice
    state = RunState.load(Path(cfg.run.root) / "drift" / "state.json")
    assert not state.phase(0).done
    recorded = faults.recorded_checkpoints(
        str(Path(cfg.run.root) / "drift" / "ray" / f"drift-00-*/{SNAPSHOT_FILE}")
    )
    assert recorded and "images-000000096" not in recorded  # no final checkpoint recorded
