"""The driver's Ray: starting or joining it, what every worker's environment holds, and the
checks of a cluster before the first phase."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PipelineConfig
from pipeline.tracking.secrets import export_secrets, runtime_env_vars
from pipeline.tracking.tracker import is_local_store, local_store_refusal, tracking_env
from preprocessing.runners import ensure_ray

# Ray Train V2's controller polls the worker group every 2 s by default; each phase waits
# for at least one poll at its start and end. 0.2 s cut the fixed cost per phase from
# ~21 s to ~13 s here (docs/benchmarks.md).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def project_modules() -> list[str]:
    """The project's package folders, shipped to a cluster as Ray `py_modules`."""
    import pipeline
    import preprocessing
    import progan

    return [str(Path(m.__file__).parent) for m in (progan, preprocessing, pipeline)]


def start_ray(address: str | None, tracking_uri: str | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray, unless one is running.

    Joining a cluster by address ships the project's code with the job (as `progan submit`
    does), so worker nodes run the driver's code whatever they have installed. The MLflow
    secrets of `tracking_uri` go into this process's environment first: a local Ray started
    here inherits them and expands the workers' `${NAME}` references (tracking.secrets).
    """
    if tracking_uri is not None:
        export_secrets(tracking_env(tracking_uri))
    if address:
        check_reachable(address)
    missing = {k: v for k, v in RAY_ENV.items() if k not in os.environ}  # a Ray Job sets them
    os.environ.update(missing)  # a local Ray started here inherits them
    runtime_env: dict[str, Any] = {"env_vars": missing} if missing else {}
    if address:
        runtime_env["py_modules"] = project_modules()
    ensure_ray(address, runtime_env=runtime_env or None)


class ClusterUnreachableError(ConnectionError):
    """Nothing answers at the Ray address (Ray itself would retry for minutes)."""


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once a `host:port` (or `ray://host:port`) where nothing listens: `ray.init`
    retries a dead GCS address for many minutes, printing a warning every few seconds."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address} ({err.strerror or err})"
        ) from None


def worker_env(uri: str) -> dict[str, str]:
    """Environment of every training worker and preflight task, for their runtime env: Ray's
    settings and MLflow's (tracking URI, auth variables), each secret as a `${NAME}`
    reference that Ray expands from the node's own environment (tracking.secrets)."""
    return runtime_env_vars({**RAY_ENV, **tracking_env(uri)})


def check_cluster(cfg: PipelineConfig, uri: str, storage: str, env: dict[str, str]) -> None:
    """Refuse a node-local MLflow store where workers may run elsewhere; then preflight."""
    from pipeline.driver.preflight import run_preflight, workers_may_run_elsewhere
    from pipeline.driver.storage import checkpoint_bytes

    if is_local_store(uri) and workers_may_run_elsewhere(cfg.scaling.worker_resources):
        raise ConfigError(local_store_refusal(uri))
    run_preflight(
        cfg.scaling.worker_resources,
        cfg.data.dataset,
        cfg.planned_resolutions,
        storage,
        uri,
        env,
        checkpoint_bytes(cfg),
        cfg.data.cache_dir,
    )
