"""Shared pytest fixtures: where ../shared/data is, a local Ray that tests share, one torch
thread for the modules that train tiny networks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Every Ray the tests start (local ones, `ray start` clusters, the CLI in subprocesses) runs
# without token auth: Ray turns it on for a local start once ~/.ray/auth_token exists and
# keeps it on in the process afterwards, and a driver with token auth cannot start actors
# on a later cluster that has none (tests/cluster_harness.py starts its nodes without it).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Under pytest-xdist (`make test`), each worker process gets a Ray temp dir of its own. A bare
# `ray.init()` joins the latest cluster whose address file lies in the temp dir (what `ray
# start` and ray.cluster_utils write), so with a shared /tmp/ray one worker's local Ray would
# join the cluster another worker's test had just started. The CLI in subprocesses inherits it.
# Each worker also gets its share of the cores as torch (OpenMP) threads, it and the CLI in its
# subprocesses: two workers of two threads each on two cores spend a third of the CPU spinning
# (`make test-fast` 59 s -> 41 s with one thread each). Ray's workers already use one.
if _xdist_worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"{os.environ.get('RAY_TMPDIR', '/tmp/ray')}-{_xdist_worker}"
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
SHARED_DATA = Path(os.environ.get("PROGAN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the slow end-to-end tests first (otherwise in file order): the long
    runs start at once and the unit tests fill the gaps, rather than one long run finishing
    alone at the end while the other worker idles."""
    if _xdist_worker:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module (`pytestmark = usefixtures("one_thread")`):
    tiny networks gain nothing from more threads, and on a busy box extra threads spin."""
    from tests.helpers import torch_threads  # imports torch: only modules that ask pay for it

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def local_ray():
    """A local Ray (2 CPUs) shared by the tests that need one; started on first use.

    Tests that build their own `ray.cluster_utils.Cluster` must `ray.shutdown()` first and
    after; the next user of this fixture then starts a fresh local Ray.
    """
    import ray

    from pipeline.driver.ray_session import RAY_ENV

    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The tiny `make demo` run (tests/demo_run.py), finished once and shared by the CLI
    test and the MLflow review tests."""
    from tests.demo_run import run_tiny_demo

    return run_tiny_demo(tmp_path_factory.mktemp("demo"))
