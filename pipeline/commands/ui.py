"""`progan ui`: the MLflow UI on 127.0.0.1 for the runs' store."""

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
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start `mlflow ui` bound to 127.0.0.1 and wait for it."""
    from pipeline.tracking import resolve_uri

    uri = resolve_uri(args.uri, args.root)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(args.port)]
    try:
        return subprocess.call(cmd, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0
