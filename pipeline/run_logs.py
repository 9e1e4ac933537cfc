"""Where a command's log output goes: Ray's and MLflow's chatter into files, ours on the
console.

A run prints what its user needs (the plan, progress, warnings, the result); what Ray and
MLflow say about themselves (worker groups, process groups, checkpoint reports, database
migrations, system-metrics monitors) goes to `<folder>/driver.log` (the driver's Python
loggers, and the traceback of any failure) and `<folder>/workers.log` (every Ray worker's
and actor's output, which Ray streams to the driver), and so do other packages' Python
warnings and every Python logger's records. What the project tells its user is printed by
its rich console and is unaffected. `verbose` keeps all of the chatter on the console too.
Both files get every line through `pipeline.tracking.secrets.redact` (URI passwords and
the values of secret variables masked), as the console does.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.tracking.secrets import redact

DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
# loggers whose INFO lines are other projects' internals
CHATTY = (
    "ray",
    "ray.data",  # its own console handler, not propagated
    "mlflow",
    "alembic",
    "urllib3",
    "filelock",
    "matplotlib",
    "httpx",
    "botocore",
)
RAY_HANDLER = "ray_print_logs"  # the name Ray gives its worker-output printer
OUR_HANDLER = "progan_run_logs"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

log = logging.getLogger("progan")


class RunLogs:
    """Context manager: route the chatter of this process (and of its Ray workers, once Ray
    is connected through `preprocessing.runners.ensure_ray`) into `folder`."""

    def __init__(self, folder: Path, verbose: bool = False, ray: bool = True) -> None:
        self.folder, self.verbose, self.ray = Path(folder), verbose, ray
        self.driver_log, self.workers_log = self.folder / DRIVER_LOG, self.folder / WORKERS_LOG
        self._handler: logging.Handler | None = None
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._propagate: dict[str, bool] = {}
        self._workers_file: Any = None
        self._lock = threading.Lock()
        self._env: dict[str, str | None] = {}

    def __enter__(self) -> RunLogs:
        from preprocessing.runners import AFTER_RAY_INIT

        if self.ray:
            import mlflow  # noqa: F401  these configure their loggers when first imported
            import ray
            import ray.data  # (Ray Train imports it anyway)

        self.folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.driver_log, encoding="utf-8")
        handler.setFormatter(RedactingFormatter(FORMAT))
        handler.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        self._handler = handler
        if not self.verbose:  # other packages' warnings (DeprecationWarning...) to the log too
            logging.captureWarnings(True)
        logging.getLogger().addHandler(handler)  # ours and anything that propagates
        log.setLevel(logging.INFO)
        for name in CHATTY:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            self._propagate[name] = logger.propagate
            logger.propagate = False  # the root's file handler would write it twice
            if not self.verbose:
                for h in list(logger.handlers):
                    if _writes_to_console(h):
                        logger.removeHandler(h)
                        self._removed.append((logger, h))
        if not self.verbose:
            self._mlflow_stream(enabled=False)  # mlflow's eprint (e.g. "Created version")
            for key, value in QUIET_ENV.items():
                self._env[key] = os.environ.get(key)
                os.environ[key] = value
        if self.ray:
            AFTER_RAY_INIT.append(self.attach_ray)
            if ray.is_initialized():
                self.attach_ray()
        return self

    def attach_ray(self) -> None:
        """Write Ray's streamed worker output to workers.log (instead of the console)."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if self._workers_file is None:
            self._workers_file = open(self.workers_log, "a", encoding="utf-8")  # noqa: SIM115
        if not self.verbose:
            dispatcher.remove_handler(RAY_HANDLER)
        dispatcher.remove_handler(OUR_HANDLER)
        dispatcher.add_handler(OUR_HANDLER, self._write_worker_output)

    def _write_worker_output(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status dumps: keep its events only
            lines = [line for line in lines if ":event_summary:" in line]
        with self._lock:
            if self._workers_file is None:
                return
            for line in lines:
                self._workers_file.write(redact(f"{prefix} {line}") + "\n")
            self._workers_file.flush()

    def record_failure(self, error: BaseException) -> None:
        """Write the full traceback of `error` to driver.log (the console gets one line)."""
        log.error("failed: %s", error, exc_info=(type(error), error, error.__traceback__))
        if self._handler is not None:
            self._handler.flush()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        from preprocessing.runners import AFTER_RAY_INIT

        if self.attach_ray in AFTER_RAY_INIT:
            AFTER_RAY_INIT.remove(self.attach_ray)
        if "ray._private.ray_logging" in sys.modules:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler(OUR_HANDLER)
        with self._lock:
            if self._workers_file is not None:
                self._workers_file.close()
                self._workers_file = None
        for logger, h in self._removed:
            logger.addHandler(h)
        for name, propagate in self._propagate.items():
            logging.getLogger(name).propagate = propagate
        if self._handler is not None:
            for name in CHATTY:
                logging.getLogger(name).removeHandler(self._handler)
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        if not self.verbose:
            self._mlflow_stream(enabled=True)
            logging.captureWarnings(False)
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _mlflow_stream(self, enabled: bool) -> None:
        """MLflow's own prints (eprint: "Created version '3' of model ...") go to its
        stream object, which MLflow switches on and off itself: send it to driver.log."""
        if not self.ray:
            return
        from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM as stream

        if enabled:
            for name in ("write", "flush"):
                stream.__dict__.pop(name, None)
            return
        stream.write = self._write_driver_text  # type: ignore[method-assign]
        stream.flush = lambda: None  # type: ignore[method-assign]

    def _write_driver_text(self, text: str) -> None:
        if text.strip():
            logging.getLogger("mlflow.eprint").info(text.rstrip())


class RedactingFormatter(logging.Formatter):
    """A log line with its secrets masked (pipeline.tracking.secrets)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _writes_to_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    if type(stream).__name__ == "MlflowLoggingStream":  # MLflow's wrapper of sys.stderr
        return True
    return not isinstance(handler, logging.FileHandler) and stream in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )
