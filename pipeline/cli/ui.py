"""`progan ui`: the MLflow UI on 127.0.0.1 for the runs' store.

One web worker and no job runner: MLflow 3 would otherwise start 4 uvicorn workers and
several huey consumers (for GenAI jobs this project does not use), which on a small
shared machine time out at start-up and are restarted over and over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ui` subcommand."""
    p = subparsers.add_parser("ui", help="open the MLflow UI for the runs' tracking store")
    p.add_argument("--root", default="runs", help="runs root holding mlflow.db")
    p.add_argument("--uri", default=None, help="tracking URI (default: the root's SQLite)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")
    p.add_argument("--experiment", default="progan", help="experiment to link to")
    p.set_defaults(func=run)


def experiment_link(uri: str, experiment: str, base: str) -> str | None:
    """The experiment's training-view URL, None if the store does not have it (yet)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.tracker import fail_fast_http, training_view_url

    try:
        with fail_fast_http():
            found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # an unreachable server: the UI says so itself
        return None
    return training_view_url(base, found.experiment_id) if found else None


def run(args: argparse.Namespace) -> int:
    """Start `mlflow ui` bound to 127.0.0.1 and wait for it."""
    from pipeline.tracking.tracker import resolve_uri

    uri = resolve_uri(args.uri, args.root)
    base = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", flush=True)
    link = experiment_link(uri, args.experiment, base)
    if link:
        print(f"runs of {args.experiment} (training view): {link}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
