"""`progan ui`: the MLflow UI on 127.0.0.1 for the runs' store.

One web worker and no job runner: MLflow 3 would otherwise start 4 uvicorn workers and
several huey consumers (for GenAI jobs this project does not use), which on a small
shared machine time out at start-up and are restarted over and over. The server runs in
its own process group, stopped as a whole on Ctrl-C (SIGINT, handled even where the parent
ignored it) or SIGTERM (its uvicorn worker would otherwise keep the port). A tracking
server (an http(s) URI) has its own UI: it is linked, not served again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
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
    """Start `mlflow ui` bound to 127.0.0.1 and wait for it (see the module doc)."""
    from pipeline.cli.run import interrupt
    from pipeline.tracking.secrets import redact_uri
    from pipeline.tracking.tracker import resolve_uri

    uri = resolve_uri(args.uri, args.root)
    if uri.startswith(("http://", "https://")):
        base = redact_uri(uri).rstrip("/")
        print(f"{base} is an MLflow tracking server with its own UI: open it there", flush=True)
        link = experiment_link(uri, args.experiment, base)
        if link:
            print(f"runs of {args.experiment} (training view): {link}", flush=True)
        return 0
    base = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI for {redact_uri(uri)} at {base} (Ctrl-C to stop)", flush=True)
    link = experiment_link(uri, args.experiment, base)
    if link:
        print(f"runs of {args.experiment} (training view): {link}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    # SIGINT too: a process started with SIGINT ignored (`cmd &` in a script, some parents)
    # keeps ignoring it, and Ctrl-C would leave the UI running
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
