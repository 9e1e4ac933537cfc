"""`progan tune`: spec validation before Ray starts, and a real sweep killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset

TINY_BASE = {
    "model": {"resolution": 16, "latent_size": 16, "fmap_base": 64, "fmap_max": 16},
    "schedule": {"transition_kimg": 0.096, "stabilize_kimg": 0.096, "batch_base": 8},
    "run": {"checkpoint_every_kimg": 0.096, "log_every_kimg": 0.048, "sample_grid": 4},
    "eval": {"metrics": ["swd"], "num_images": 32},
}


def tiny_spec(tmp_path: Path, dataset: Path, **sections) -> dict:
    """4 trials of 2 phases (8x8, 16x16 stabilizations), 2 at a time, ASHA after phase 1.

    G_ema is what is measured: ema_beta 0 shows the trained G, 0.5..1 (nearly) the initial
    one, so the 0.99 and 1.0 trials always score worse than the first ones and ASHA stops
    them whatever the order in which results arrive."""
    base = json.loads(json.dumps(TINY_BASE))
    base["data"] = {"dataset": str(dataset)}
    base["run"]["root"] = str(tmp_path / "runs")
    spec = {
        "base": base,
        "trial": {
            "schedule": {"start_resolution": 8, "transition_kimg": 0},
            "tracking": {"log_checkpoints": False},
        },
        "search_space": {"train.ema_beta": {"grid": [0.0, 0.5, 0.99, 1.0]}},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    for key, value in sections.items():
        spec[key] = value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "search_space",
            {"train.lrr": {"choice": [1]}},
            "search_space.train.lrr: unknown config key 'lrr' in 'train'; allowed there: betas",
        ),
        (
            "search_space",
            {"nope.x": {"choice": [1]}},
            "search_space.nope.x: unknown config key 'nope' in the top level",
        ),
        (
            "search_space",
            {"train": {"choice": ["adam"]}},
            "search_space.train: is a section, not a value",
        ),
        (
            "search_space",
            {"train.loss": {"normal": [0, 1]}},
            "search_space.train.loss: {'normal': [0, 1]} is not a distribution; use one of "
            "choice: [...], grid: [...], uniform: [a, b], loguniform: [a, b], randint",
        ),
        (
            "search_space",
            {"schedule.lr_base": {"loguniform": [0, 0.01]}},
            "search_space.schedule.lr_base: loguniform needs 0 < low < high",
        ),
        (
            "search_space",
            {"train.loss": {"choice": ["wgan-gp", "hinge"]}},
            "search_space.train.loss: value 'hinge' fails validation in the trial config: "
            "train.loss: Input should be 'wgan-gp'",
        ),
        (
            "search_space",
            {"schedule.batch_base": {"uniform": [8, 32]}},
            "(use randint for integer keys)",
        ),
        (
            "search_space",
            {"train.n_critic": {"randint": [0, 3]}},
            "search_space.train.n_critic: value 0 fails validation",
        ),
        ("search_space", {"run.root": {"choice": ["/tmp"]}}, "search_space.run.root: set by"),
        (
            "search",
            {"algorithm": "grid"},
            "search_space.schedule.lr_base: uniform has no grid; search.algorithm grid needs",
        ),
        ("search", {"algorithm": "bayes"}, "search.algorithm: Input should be 'random', 'grid'"),
        ("search", {"metric": "d_loss"}, "search.metric: 'd_loss' is not an end-of-phase metric"),
        ("scheduler", {"grace_period": 5}, "scheduler.grace_period: 5 exceeds max_t 2"),
        ("trial", {"model": {"resolution": 48}}, "trial: model.resolution: must be a power"),
        ("bogus", 1, "bogus: unknown key; allowed here: base, name, scheduler, search"),
    ],
)
def test_bad_spec_fails_before_ray_in_one_line(
    section, value, message, tmp_path, monkeypatch, capsys
):
    import pipeline.run

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad spec")

    monkeypatch.setattr(pipeline.run, "init_ray", no_ray)
    spec = tiny_spec(tmp_path, tmp_path / "dataset")
    spec["search_space"] = {"schedule.lr_base": {"uniform": [0.0005, 0.002]}}
    spec["search"] = {"algorithm": "random"}
    spec[section] = value
    code = main(["tune", str(write_spec(tmp_path, spec))])
    out = capsys.readouterr().out.strip()
    assert code == 2
    assert out.startswith("config error: ") and "\n" not in out, out
    assert message in out


def test_spec_overrides_dry_run_and_missing_searcher(tmp_path, capsys):
    import importlib.util

    from pipeline.tune import load_sweep

    spec = write_spec(tmp_path, tiny_spec(tmp_path, tmp_path / "dataset"))
    args = ["search.num_samples=3", "search_space.train.loss={choice: [bce, lsgan]}"]
    sweep = load_sweep(spec, args, name="x")
    assert sweep.spec.search.num_samples == 3
    assert [d.key for d in sweep.dimensions] == ["train.ema_beta", "train.loss"]
    assert sweep.sweep_dir == (tmp_path / "runs" / "tune" / "x").resolve()
    assert sweep.trial_phases == 2
    assert main(["tune", str(spec), "--dry-run", "--name", "x"]) == 0
    out = capsys.readouterr().out
    assert "train.ema_beta: grid [0.0, 0.5, 0.99, 1.0]" in out and "nothing was run" in out
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="'optuna' needs the optuna package"):
            load_sweep(
                spec, ["search.algorithm=optuna", "search_space.train.ema_beta={choice: [0]}"]
            )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def finished_trials(trials: Path) -> set[str]:
    out = set()
    for state in trials.glob("*/state.json"):
        try:
            if json.loads(state.read_text())["finished"]:
                out.add(state.parent.name)
        except (json.JSONDecodeError, KeyError):
            pass  # being written
    return out


@pytest.mark.slow
def test_sweep_killed_and_resumed_stops_bad_trials_and_writes_best_config(
    local_ray, dataset, tmp_path, capsys
):
    from pipeline.tune import resume_sweep

    spec = write_spec(tmp_path, tiny_spec(tmp_path, dataset))
    sweep_dir = tmp_path / "runs" / "tune" / "t"
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "tune", str(spec), "--name", "t"],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not finished_trials(sweep_dir / "trials") and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(5)  # > Tune's experiment-state period (2 s here): the finish is on disk
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished_trials(sweep_dir / "trials")
    assert done_before and not (sweep_dir / "summary.md").exists()
    generator_mtime = {
        t: (sweep_dir / "trials" / t / "generator.pt").stat().st_mtime_ns for t in done_before
    }

    result = resume_sweep(sweep_dir)

    rows = {r.trial_id: r for r in result.rows}
    assert len(rows) == 4
    for t in done_before:  # not rerun: one attempt, generator untouched
        assert rows[t].attempts == 1 and rows[t].status == "completed"
        assert (sweep_dir / "trials" / t / "generator.pt").stat().st_mtime_ns == generator_mtime[t]
    statuses = sorted(r.status for r in rows.values())
    assert "early_stopped" in statuses and "completed" in statuses and "error" not in statuses
    for r in rows.values():
        assert r.phases_done == (2 if r.status == "completed" else 1)
    assert result.best is not None and result.best.params == {"train.ema_beta": 0.0}

    # MLflow: the sweep run, each trial's pipeline run nested under it with its status
    client = MlflowClient(result.tracking_uri)
    sweep_run = client.get_run(result.mlflow_run_id)
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["best_trial"] == result.best.trial_id
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id)} >= {
        "summary.md",
        "summary.csv",
        "best.yaml",
        "tune.yaml",
    }
    exp = client.get_experiment_by_name("progan")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(rows)
    for child in children:
        row = rows[child.info.run_name]
        assert child.data.tags["status"] == row.status
        assert child.info.status == ("KILLED" if row.status == "early_stopped" else "FINISHED")
        assert child.data.params["train.ema_beta"] == str(row.params["train.ema_beta"])

    # best.yaml: the base's full plan (start 4, not the trial's 8) with the best value
    best = load_config(result.best_config)
    assert best.train.ema_beta == 0.0 and best.schedule.start_resolution == 4
    assert best.run.root == str(tmp_path / "runs")
    capsys.readouterr()
    assert main(["run", str(result.best_config), "--dry-run", "--run-id", "best"]) == 0
    assert "nothing was run" in capsys.readouterr().out
    assert "early_stopped" in (sweep_dir / "summary.md").read_text()
