"""`progan` with one fault installed: the CLI fault matrix's test-only driver wrapper.

    python -m tests.fault_cli KIND AT [PATH] -- <progan arguments>

KIND is where the run is killed (kill -9 of its process group): in a worker ("mid-step",
"checkpoint-write", "evaluation": tests.faults.worker_fault; PATH: for "mid-step" and
"evaluation", a glob of the phase's Ray snapshot that must record a checkpoint first;
"worker-dies": the last rank exits once at AT images, PATH its marker file) or in
the driver
("after-final-report": after phase AT's fit returned, before its state is written;
"config-write": half-way through writing config.yaml). "worker-raises": every worker start
raises (AT unused). "server-stop" kills nothing: before
phase AT starts, it writes PATH + ".stop" and waits for PATH + ".stopped" (the
test stops the MLflow server in between, and restarts it later). The faults are hooks
installed here, at named points, never sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pipeline.driver.phase_driver as phase_driver
import pipeline.driver.run_dir as run_dir
import pipeline.phases.ray_train as ray_train
from pipeline.cli import main
from progan.files import atomic_file
from tests import faults


def install(kind: str, at: int, path: str | None) -> None:
    group = os.getpgrp()
    if kind in ("mid-step", "checkpoint-write", "evaluation"):
        ray_train.phase_worker = faults.worker_fault(kind, at, group, path)
    elif kind == "worker-dies":
        ray_train.phase_worker = faults.dies_at(at, path)
    elif kind == "worker-raises":
        ray_train.phase_worker = faults.worker_raises
    elif kind == "after-final-report":
        fetch = phase_driver.fetch_file

        def fetch_then_die(uri, target):
            if f"-{at:02d}-" in str(uri):
                faults.kill_run(group)
            return fetch(uri, target)

        phase_driver.fetch_file = fetch_then_die
    elif kind == "config-write":

        def dump_config(cfg, path):
            with atomic_file(path) as f:
                f.write(b"run:\n  root: /half/writ")
                faults.kill_run(group)

        run_dir.dump_config = dump_config
    elif kind == "server-stop":
        train = phase_driver.PhaseDriver.train

        def train_after_stop(self, job, *args, **kwargs):
            if job.phase_index == at:
                Path(f"{path}.stop").touch()
                while not Path(f"{path}.stopped").exists():
                    time.sleep(0.05)
            return train(self, job, *args, **kwargs)

        phase_driver.PhaseDriver.train = train_after_stop
    else:
        raise SystemExit(f"unknown fault {kind}")


if __name__ == "__main__":
    split = sys.argv.index("--")
    head, progan_args = sys.argv[1:split], sys.argv[split + 1 :]
    install(head[0], int(head[1]), head[2] if len(head) > 2 else None)
    sys.exit(main(progan_args))
