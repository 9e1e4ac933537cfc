"""Before the first phase: can every node that may host a training worker do its job?

One small Ray task per candidate node (a node whose resources can hold one training
worker) checks, in that node's own environment, what a worker will need: each planned
resolution of the dataset reads (or, in object storage, is there and fits the node's
staging cache), storage is the same storage the driver sees and is
writable, the MLflow server answers, and the project code and torch/ray/mlflow versions
are the driver's. A problem is one line naming the node, the path or package, and what to
do, within seconds instead of after a phase's restarts are spent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import ray

from pipeline.config import ConfigError, is_uri
from pipeline.tracking.secrets import redact_uri, with_credentials
from preprocessing.object_store import display, join

PACKAGES = ("torch", "ray", "mlflow", "progan-pipeline")
PREFLIGHT_DIR = ".preflight"
TIMEOUT_S = 180


class PreflightError(ConfigError):
    """A node cannot run the training workers, in one line."""


def code_digest() -> str:
    """A hash of the project's source (progan, preprocessing, pipeline) as imported here."""
    import pipeline
    import preprocessing
    import progan

    h = hashlib.sha256()
    for package in (progan, preprocessing, pipeline):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict[str, str]:
    """Package versions and the code digest of this process."""
    out = {"code": code_digest()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def node_label() -> str:
    """'<ip> (<hostname>, node <id prefix>)' of the node this runs on."""
    node_id = ray.get_runtime_context().get_node_id()
    return f"{ray.util.get_node_ip_address()} ({socket.gethostname()}, node {node_id[:8]})"


def check_dataset(dataset: str, resolutions: list[int], cache_dir: str | None) -> str | None:
    """None if every planned resolution reads one record here (a dataset in object storage:
    is listed there at its manifest's size, and the node's staging cache has room for
    it), else what is wrong."""
    from preprocessing.lmdb_store import LmdbImageDataset

    if is_uri(dataset):
        return check_remote_dataset(dataset, resolutions, cache_dir)
    for res in resolutions:
        try:
            data = LmdbImageDataset(dataset, res)
            if len(data) == 0:
                return f"data.dataset {dataset}: the {res}x{res} LMDB is empty"
            data[0]
        except Exception as err:
            return (
                f"data.dataset {dataset} ({res}x{res}) is not readable here "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}): put the prepared "
                "dataset where every node sees it at the same path (shared storage)"
            )
    return None


def check_remote_dataset(dataset: str, resolutions: list[int], cache_dir: str | None) -> str | None:
    """The object-storage half of `check_dataset`: no download, a listing and a size each."""
    import shutil

    from preprocessing.object_store import size_of
    from preprocessing.staging import data_file, default_cache_root, read_remote_manifest

    where = display(dataset)
    try:
        files = read_remote_manifest(dataset).get("files") or {}
        sizes = {data_file(r): size_of(join(dataset, data_file(r))) for r in resolutions}
    except FileNotFoundError as err:
        return f"data.dataset {err}"
    except Exception as err:
        return (
            f"data.dataset {where} is not reachable from this node ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}): give every node access to the bucket "
            "(credentials, endpoint, network)"
        )
    for name, size in sizes.items():
        if name not in files or size != int(files[name]["bytes"]):
            return (
                f"data.dataset {where}: {name} is missing or differs from its manifest "
                f"({size} bytes here); prepare it into the URI again"
            )
    root = Path(cache_dir) if cache_dir else default_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        return f"data.cache_dir {root} is not writable here ({type(err).__name__}: {err})"
    largest = max(sizes.values(), default=0)  # every size is the manifest's by here
    free = shutil.disk_usage(root).free
    if free < largest:
        return (
            f"data.cache_dir {root} has {free / 2**30:.1f} GiB free; staging {where} needs "
            f"{largest / 2**30:.1f} GiB for its largest planned LMDB"
        )
    return None


def check_storage(probe: str, storage: str, driver_token: str) -> str | None:
    """None if this node reads the driver's token under `probe` and can write there."""
    from pipeline.driver.storage import read_text, write_text

    try:
        seen = read_text(join(probe, "driver"))
    except Exception as err:
        return (
            f"run.storage_path: {storage} is not the driver's storage here "
            f"({type(err).__name__}): set run.storage_path to a path every node mounts, or "
            "to a URI (s3://, gs://)"
        )
    if seen != driver_token:
        return f"run.storage_path: {probe} holds another run's probe (token mismatch)"
    try:
        write_text(join(probe, ray.get_runtime_context().get_node_id()), "ok")
    except Exception as err:
        return (
            f"run.storage_path: {storage} is not writable here "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        )
    return None


def check_tracking(uri: str) -> str | None:
    """None if the MLflow server answers from here (local stores are not checked)."""
    from pipeline.tracking.tracker import fail_fast_http, is_local_store

    if is_local_store(uri):
        return None
    from mlflow.tracking import MlflowClient

    try:
        with fail_fast_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        return (
            f"tracking.uri: the MLflow server {redact_uri(uri)} does not answer here "
            f"({type(err).__name__}): start it on an address every node reaches"
        )
    return None


def check_gpus(gpus_per_worker: float) -> str | None:
    """None if this node has the GPUs a worker asks for, and NCCL for DDP between them."""
    if gpus_per_worker <= 0:
        return None
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        return "scaling.use_gpu: torch sees no CUDA GPU here (driver, CUDA build of torch?)"
    if torch.cuda.device_count() < gpus_per_worker:
        return (
            f"a worker asks for {gpus_per_worker:g} GPU(s); torch sees {torch.cuda.device_count()}"
        )
    if not dist.is_nccl_available():
        return "this torch has no NCCL, which DDP on GPUs uses"
    return None


def check_temp_space(need_bytes: int) -> str | None:
    """None if the worker's temp folder (where a checkpoint is written before Ray copies it
    to storage) has room for one checkpoint."""
    import shutil
    import tempfile

    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        return (
            f"{folder} has {free / 2**20:.0f} MiB free; a checkpoint is written there first "
            f"and needs about {need_bytes / 2**20:.0f} MiB (set TMPDIR to a larger disk)"
        )
    return None


@ray.remote(num_cpus=0, max_retries=0)
def check_node(request: dict[str, Any]) -> dict[str, Any]:
    """Every check on the node this task runs on; returns its label and problems."""
    problems = []
    mine = environment()
    for name, theirs in request["environment"].items():
        if mine.get(name) != theirs:
            what = "project code" if name == "code" else name
            problems.append(
                f"{what} differs from the driver's ({mine.get(name)} here, {theirs} on the "
                "driver): install the same versions on every node (or submit with "
                "`progan submit`, which ships the project)"
            )
    for name in request["secrets"]:  # Ray expanded their ${NAME} from this node's env
        if not os.environ.get(name):
            problems.append(
                f"{name} is set for the driver but not in this node's environment, where "
                "Ray takes secrets from: start this node's Ray (`ray start`) with it set "
                "(docs/using.md, 'Secrets')"
            )
    for problem in (
        check_dataset(request["dataset"], request["resolutions"], request["cache_dir"]),
        check_storage(request["probe"], request["storage"], request["token"]),
        check_tracking(with_credentials(request["tracking_uri"])),
        check_gpus(request["gpus_per_worker"]),
        check_temp_space(request["checkpoint_bytes"]),
    ):
        if problem:
            problems.append(problem)
    return {"node": node_label(), "problems": problems}


def candidate_nodes(worker_resources: dict[str, float]) -> list[dict[str, Any]]:
    """Alive nodes whose total resources can hold one training worker."""
    return [
        node
        for node in ray.nodes()
        if node.get("Alive")
        and all(node["Resources"].get(k, 0) >= v for k, v in worker_resources.items() if v > 0)
    ]


def workers_may_run_elsewhere(worker_resources: dict[str, float]) -> bool:
    """True if some node other than the driver's could host a training worker."""
    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] != here for n in candidate_nodes(worker_resources))


def run_preflight(
    worker_resources: dict[str, float],
    dataset: str,
    resolutions: list[int],
    storage: str,
    tracking_uri: str,
    env_vars: dict[str, str],
    checkpoint_bytes: int = 0,
    cache_dir: str | None = None,
) -> list[str]:
    """Check every candidate node; raise PreflightError naming the first problem.

    Returns the labels of the nodes checked (empty if none can host a worker yet: an
    autoscaling cluster may add them later, so that is not an error here).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.driver.storage import delete_tree, write_text

    nodes = candidate_nodes(worker_resources)
    if not nodes:
        return []
    token = secrets.token_hex(8)
    probe = join(storage, f"{PREFLIGHT_DIR}-{token}")
    try:
        write_text(join(probe, "driver"), token)
    except Exception as err:
        raise PreflightError(
            f"preflight: run.storage_path {display(storage)} is not writable from the driver "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None
    request = {
        "environment": environment(),
        "dataset": dataset,
        "resolutions": resolutions,
        "cache_dir": cache_dir,
        "probe": probe,
        "storage": display(storage),
        "token": token,
        "tracking_uri": redact_uri(tracking_uri),  # a task's arguments are recorded
        "secrets": [k for k, v in env_vars.items() if v == f"${{{k}}}"],
        "gpus_per_worker": float(worker_resources.get("GPU", 0)),
        "checkpoint_bytes": checkpoint_bytes,
    }
    refs = {
        check_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            runtime_env={"env_vars": env_vars},
            num_gpus=request["gpus_per_worker"],  # Ray hides the GPUs a task does not ask for
        ).remote(request): node
        for node in nodes
    }
    try:
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=TIMEOUT_S)
        if pending:
            late = ", ".join(refs[r]["NodeManagerAddress"] for r in pending)
            raise PreflightError(
                f"preflight: node(s) {late} did not answer in {TIMEOUT_S} s; check that they "
                "can start Ray workers (`ray status`, the node's raylet.err)"
            )
        problems, checked = [], []
        for ref in ready:
            try:
                report = ray.get(ref)
            except Exception as err:  # the check could not even run there (imports, env)
                cause = str(err).strip().splitlines()[-1][:200]
                where = refs[ref]["NodeManagerAddress"]
                problems.append(f"node {where}: the check itself failed ({cause})")
                continue
            checked.append(report["node"])
            problems += [f"node {report['node']}: {p}" for p in report["problems"]]
    finally:
        delete_tree(probe)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PreflightError(f"preflight: {problems[0]}{more}")
    return checked
