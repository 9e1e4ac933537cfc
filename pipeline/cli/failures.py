"""How a command ends when something fails: one line and a distinct exit code.

The line says what happened, where the full log is and what to type next; the traceback
goes to the log file (pipeline.run_logs), never to the console. Exit codes:

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | an unexpected error (a bug: the log has the traceback) |
| 2 | a bad config or argument, or a run that cannot start as configured (a failed
preflight, storage or run folder in use, the dataset changed): nothing was trained |
| 3 | training failed (workers failed more than `run.max_failures` times, a NaN loss) |
| 4 | the MLflow tracking server cannot be reached |
| 5 | the Ray cluster (or its dashboard) cannot be reached |
| 130 | interrupted (Ctrl-C, SIGTERM); resumable |
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_TRAINING = 3
EXIT_TRACKING = 4
EXIT_CLUSTER = 5
EXIT_INTERRUPTED = 130

# refusals before training that are about the setup rather than the config file
NOT_READY = ("RunLockedError", "PreflightError", "StorageError", "FolderBusyError")


@dataclass(frozen=True)
class Failure:
    """What the console says about an error, and the exit code."""

    code: int
    label: str
    text: str


def classify(error: BaseException) -> Failure:
    """The exit code and one-line text of `error`."""
    name = type(error).__name__
    names = {t.__name__ for t in type(error).__mro__}
    text = first_line(error)
    if isinstance(error, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted", "stopped")
    ours = str(error)  # the project's own messages are written for the console already
    if names & set(NOT_READY):
        return Failure(EXIT_CONFIG, "error", ours)
    if "ConfigError" in names:
        return Failure(EXIT_CONFIG, "config error", ours)
    if "TrackingError" in names:
        return Failure(EXIT_TRACKING, "MLflow unreachable", text)
    if "TrainingFailedError" in names:
        return Failure(EXIT_TRAINING, "training failed", training_failure(error))
    if name in ("PhaseFailedError", "NonFiniteLossError"):
        return Failure(EXIT_TRAINING, "training failed", ours)
    if cluster_unreachable(error):
        return Failure(EXIT_CLUSTER, "Ray cluster unreachable", text)
    return Failure(EXIT_ERROR, "error", f"{name}: {text}")


def first_line(error: BaseException, limit: int = 400) -> str:
    """The error's message on one line (its first non-empty line), at most `limit` chars."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def training_failure(error: BaseException) -> str:
    """Ray Train's TrainingFailedError in one line: the workers' own first error."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None)
    if cause is None:
        return first_line(error)
    inner = getattr(cause, "cause", None) or cause  # RayTaskError wraps the worker's error
    return (
        "the workers failed more times than run.max_failures allows; last error: "
        f"{type(inner).__name__}: {first_line(inner)}"
    )


def cluster_unreachable(error: BaseException) -> bool:
    """Ray could not be reached: a refused connection, an unknown address, no dashboard."""
    names = {t.__name__ for t in type(error).__mro__}
    if names & {"ConnectionError", "ConnectionRefusedError", "ClientConnectorError"}:
        return True
    text = str(error)
    return any(
        s in text
        for s in (
            "Failed to connect to GCS",
            "Could not find any running Ray instance",
            "Can't find a Ray cluster",
            "Failed to connect to Ray",
            "Connection refused",
        )
    )


def say(console, failure: Failure, log_file: Path | None, next_step: str | None) -> int:
    """Print the one line; return the exit code."""
    parts = [failure.text]
    if log_file is not None:
        parts.append(f"full log: {log_file}")
    if next_step:
        parts.append(f"then: {next_step}")
    console.print(f"[red]{failure.label}:[/] " + "; ".join(parts), highlight=False, soft_wrap=True)
    return failure.code


def report(
    console: Any, error: Exception, logs: Any, next_step: Callable[[Failure], str | None]
) -> int:
    """A command's failure: the traceback into `logs` (pipeline.run_logs.RunLogs, or None),
    the one line on the console with `next_step(failure)`; returns the exit code."""
    if logs is not None:
        logs.record_failure(error)
    failure = classify(error)
    return say(console, failure, logs.driver_log if logs is not None else None, next_step(failure))


def verbose(args: argparse.Namespace) -> bool:
    """`-v`: show Ray's and MLflow's own output on the console too (pipeline.run_logs)."""
    return bool(getattr(args, "verbose", False))
