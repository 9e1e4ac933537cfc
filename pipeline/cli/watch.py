"""`progan watch RUN_DIR`: the live progress of a run started elsewhere or earlier.

Reads what the run's driver keeps in its folder (progress.json, written at every log point
and phase end by pipeline.progress; state.json) and shows the same display as `progan
run`: two lines redrawn on a terminal, a plain line per new log point otherwise. It exits
when the run ends: 0 when it finished, 1 when it stopped, failed or its driver is gone
(with the `progan resume` line), 2 for a folder that is not a run.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `watch` subcommand."""
    p = subparsers.add_parser(
        "watch",
        help="follow a run's progress (one started in another terminal, or earlier)",
        description="Show RUN_DIR's progress until the run ends (exit 0 if it finished).",
    )
    p.add_argument("run_dir", help="runs/<run id>, or a `progan train-local` output folder")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reads")
    p.add_argument("--once", action="store_true", help="show where the run is now and exit")
    p.add_argument(
        "--wait-start",
        type=float,
        default=120.0,
        help="seconds to wait for a run that has not written its progress yet",
    )
    p.set_defaults(func=watch)


def driver_alive(pid: int, host: str) -> bool | None:
    """Whether the driver process still runs (None: on another host, unknown)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(args: argparse.Namespace) -> int:
    """Follow the run until it ends; see the module doc for the exit codes."""
    from rich.console import Console
    from rich.live import Live

    from pipeline.driver.run_dir import GENERATOR_FILE, STATE_FILE
    from pipeline.driver.state import RunState
    from pipeline.progress import ENDED, PROGRESS_FILE, Progress, render

    console = Console(soft_wrap=True)
    run_dir = Path(args.run_dir)
    progress_file, state_file = run_dir / PROGRESS_FILE, run_dir / STATE_FILE
    if not run_dir.is_dir():
        console.print(f"[red]error:[/] {run_dir} is not a folder", highlight=False)
        return 2
    from pipeline.driver.run_dir import CONFIG_FILE

    resume = f"`progan resume {run_dir}`"
    if not (run_dir / CONFIG_FILE).is_file():  # a train-local folder
        resume = f"`progan train-local CONFIG --out {run_dir}` again"
    waited = time.monotonic()
    while not progress_file.is_file():
        if state_file.is_file() and RunState.load(state_file).finished:
            console.print(f"run {run_dir.name}: finished; generator {run_dir / GENERATOR_FILE}")
            return 0
        if args.once or time.monotonic() - waited > args.wait_start:
            console.print(
                f"[yellow]run {run_dir.name}: no progress recorded in {run_dir} (not started, "
                f"or started by an older version)[/]",
                highlight=False,
            )
            return 1
        time.sleep(args.interval)

    live = None if args.once or not console.is_terminal else Live(console=console)
    last_update = None
    try:
        if live is not None:
            live.start()
        while True:
            try:
                progress = Progress.read(progress_file)
            except (OSError, ValueError):  # replaced while read: read again
                time.sleep(0.2)
                continue
            alive = driver_alive(progress.pid, progress.host)
            ended = progress.state in ENDED or alive is False
            if live is not None:
                live.update(render(progress), refresh=True)
            elif progress.updated != last_update and (progress.d_loss is not None or ended):
                console.print(progress.plain_line(), highlight=False, markup=False)
            last_update = progress.updated
            if ended or args.once:
                break
            time.sleep(args.interval)
    finally:
        if live is not None:
            live.stop()
    return ending(console, run_dir, progress, alive, resume, args.once)


def ending(console, run_dir: Path, progress, alive: bool | None, resume: str, once: bool) -> int:
    """The last line: how the run ended (or where it is, with --once), and the exit code."""
    from pipeline.driver.run_dir import GENERATOR_FILE

    name = run_dir.name
    where = f"phase {progress.phase_index + 1}/{progress.phases} ({progress.phase}), "
    where += f"{progress.images:,}/{progress.run_end:,} images"
    if progress.state == "done":
        console.print(
            f"[bold green]done[/]: run {progress.run}, {progress.run_end:,} images; "
            f"generator {run_dir / GENERATOR_FILE}",
            highlight=False,
        )
        return 0
    if progress.state in ("stopped", "failed"):
        console.print(
            f"[yellow]run {name} {progress.state}[/] at {where}: {progress.message}",
            highlight=False,
        )
        return 1
    if alive is False:
        console.print(
            f"[yellow]run {name} is not running[/] (its driver, pid {progress.pid}, is gone) "
            f"at {where}; continue with {resume}",
            highlight=False,
        )
        return 1
    if once:
        console.print(f"run {name}: {progress.state} at {where}", highlight=False)
    return 0
