"""What a user sees while a run runs and when it fails: progress, a quiet console, one line.

`progan run` on a tiny config, read from its stdout (no terminal: plain lines), with
`progan watch` following it from a second process; then each failure a user can meet,
asserting its one line, the log file it names, the next command and the exit code.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli.failures import EXIT_CLUSTER, EXIT_TRACKING, EXIT_TRAINING
from pipeline.config import dump_config
from tests import faults
from tests.cluster_harness import free_port
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow  # `progan` subprocesses with Ray

EVAL = {"enabled": True, "metrics": ["swd"], "num_images": 16}
PROGAN = str(Path(sys.executable).parent / "progan")
# what Ray and MLflow printed on the console before (issue 23's list)
CHATTER = (
    "core_worker.cc",
    "PreemptionWatcher",
    "Setting up process group",
    "Started training worker group",
    "Checkpoint successfully created",
    "Reporting training result",
    "mlflow.system_metrics",
    "Skip logging GPU metrics",
    "generated new fontManager",
    "Created version",
    "Started a local Ray instance",
    "(TrainController pid=",
    "(RayTrainWorker pid=",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), resolution=8)


def start(*args: str, fault: tuple[str, ...] = ()) -> subprocess.Popen:
    """`progan ARGS` as typed (or with a test fault installed), in its own process group."""
    return subprocess.Popen(
        faults.progan_command(*args, fault=fault),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of its Ray
    print(out[-4000:], err[-4000:])
    return proc.returncode, out, err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_run_shows_progress_keeps_ray_and_mlflow_in_logs_and_watch_follows(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, eval=EVAL)
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    run_dir = Path(cfg.run.root) / "shown"
    run = start("run", str(config), "--run-id", "shown")
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").is_file():  # watch a run that is starting
        assert time.time() < deadline and run.poll() is None, "the run did not start"
        time.sleep(0.2)
    watch = start("watch", str(run_dir), "--interval", "0.5")
    code, out, err = finish(run)
    watched, watch_out, _ = finish(watch, timeout=60)
    assert code == 0, out[-3000:] + err[-3000:]

    # progress lines with images/s and an ETA during each phase, before its "done" line
    for phase in cfg.plan:
        begin = out.index(f"phase {phase.name}: {phase.num_images} images")
        end = out.index(f"phase {phase.name}: done")
        during = [ln for ln in lines(out[begin:end]) if ln.startswith(tuple("0123456789"))]
        assert during, f"no progress line in phase {phase.name}"
        assert all(re.search(r"\d img/s \| ETA phase \d+:\d\d, run \d+:\d\d", ln) for ln in during)
        assert f"{phase.num_images}/{phase.num_images} images" in during[-1], during
    # none of Ray's or MLflow's own lines on the console; all of them in the run's logs
    said = out + err
    assert [c for c in CHATTER if c in said] == []
    assert err.strip() == "", err
    workers = (run_dir / "logs" / "workers.log").read_text()
    driver = (run_dir / "logs" / "driver.log").read_text()
    for line in ("Setting up process group", "Reporting training result", "Started training"):
        assert line in workers, line
    assert "Started a local Ray instance" in driver and "Created version" in driver

    # watch followed it to its end, showing the same progress lines
    assert watched == 0, watch_out
    assert any(re.search(r"img/s \| ETA phase", ln) for ln in lines(watch_out)), watch_out
    assert lines(watch_out)[-1].startswith("done: run shown"), watch_out
    # and on a finished run it says so at once
    again = subprocess.run(
        [PROGAN, "watch", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and lines(again.stdout)[-1].startswith("done: run shown")


def test_watch_says_a_killed_run_is_not_running_and_how_to_continue(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, eval={"enabled": False})
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    run_dir = Path(cfg.run.root) / "killed"
    run = start("run", str(config), "--run-id", "killed")
    deadline = time.time() + 180
    while '"d_loss": ' not in _text(run_dir / "progress.json"):  # training has begun
        assert time.time() < deadline and run.poll() is None, "no progress recorded"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    finish(run)
    watched = subprocess.run(
        [PROGAN, "watch", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    assert watched.returncode == 1, watched.stdout
    last = lines(watched.stdout)[-1]
    assert "is not running" in last and f"progan resume {run_dir}" in last, last


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def assert_one_line_failure(out: str, label: str, log: Path, next_step: str) -> str:
    """The failure is the last line, alone: what happened, the log, what to type next."""
    last = lines(out)[-1]
    assert last.startswith(f"{label}: "), last
    assert f"full log: {log}" in last and next_step in last, last
    assert "Traceback" in log.read_text()  # the full story is in the log
    assert "Traceback" not in out
    return last


def test_workers_failing_past_max_failures_is_one_line_exit_3(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, run={"max_failures": 0})
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    run_dir = Path(cfg.run.root) / "failing"
    code, out, err = finish(
        start("run", str(config), "--run-id", "failing", fault=("worker-raises", "0"))
    )
    assert code == EXIT_TRAINING, out[-3000:] + err[-3000:]
    last = assert_one_line_failure(
        out, "training failed", run_dir / "logs" / "driver.log", f"`progan resume {run_dir}`"
    )
    assert "RuntimeError: injected worker failure" in last, last
    assert err.strip() == "", err


def test_a_tracking_server_down_at_start_is_one_line_exit_4(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path)
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    run_dir = Path(cfg.run.root) / "nomlflow"
    uri = f"http://127.0.0.1:{free_port()}"
    code, out, err = finish(
        start("run", str(config), "--run-id", "nomlflow", f"tracking.uri={uri}")
    )
    assert code == EXIT_TRACKING, out + err
    assert len(lines(out)) == 1  # nothing else was said: Ray was not even started
    last = assert_one_line_failure(
        out, "MLflow unreachable", run_dir / "logs" / "driver.log", f"progan resume {run_dir}"
    )
    assert uri in last and "start the MLflow server" in last


def test_an_unreachable_ray_address_is_one_line_exit_5(dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path)
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    run_dir = Path(cfg.run.root) / "noray"
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    code, out, err = finish(
        start("run", str(config), "--run-id", "noray", "--address", address), timeout=120
    )
    assert code == EXIT_CLUSTER, out + err
    assert time.perf_counter() - started < 60  # not Ray's minutes of retries
    last = assert_one_line_failure(
        out, "Ray cluster unreachable", run_dir / "logs" / "driver.log", "progan resume"
    )
    assert address in last
    # the job verbs against a dashboard that is not there: one line, the same code
    dashboard = f"http://127.0.0.1:{free_port()}"
    for verb in ("status", "logs"):
        done = subprocess.run(
            [PROGAN, verb, "raysubmit_x", "--address", dashboard],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == EXIT_CLUSTER, (verb, done.stdout, done.stderr)
        [line] = lines(done.stdout)
        assert line.startswith("Ray cluster unreachable: ") and dashboard in line, line
        assert "Traceback" not in done.stderr
