"""A real two-node Ray cluster on one machine, and a real MLflow tracking server, for tests.

`namespaced_cluster` starts a Ray head with `ray start --head --block` and a second Ray node
(the "worker node") inside its own mount namespace (`unshare -m`), where each `hidden` directory
and the head's temp dir are covered by an empty tmpfs. Code running on the worker node therefore
sees the filesystem a remote machine would: the shared tree, but not the driver's private dirs
nor the head's Ray session files. The calling process stays in the host namespace and is the
driver: it joins with `ray.init(address=info.address)` and sees everything.

`mlflow_server` runs `mlflow server` on a SQLite store with proxied artifacts (clients upload
artifacts over HTTP, as a remote worker must).

Both start their processes in new sessions and kill exactly those process groups at exit; they
never run `ray stop`, which would kill every Ray on the machine (other tests' local Rays too).

Linux only; the worker node needs `unshare -m` and `mount` (root, or a user namespace):
`unshare_available()` says why not, for `pytest.skip`. No psutil: processes are read from /proc.

Network: Ray on Linux rewrites 127.0.0.1 to the host's primary IP in `ray start` and `ray.init`
(`ray._private.services.resolve_ip_for_localhost`), so the nodes' IP is that address and Ray's
gRPC servers (GCS, raylet, object manager, workers) listen on all interfaces, as with any
`ray start`; Ray 2.60 has no bind-address setting for them on Linux. The dashboard, the dashboard
agents' HTTP servers and the MLflow server are bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# The venv this test session runs in: its `ray`, `mlflow` and `python` serve the child processes.
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
# Node env. No token auth: `ray start --head` turns it on by itself when ~/.ray/auth_token
# exists (any local `ray.init()` writes one), and then the worker node and drivers, which do
# not pick the token up, are refused. No 30 s drain on SIGTERM (`ray start --block` would wait
# for a GCS that is already gone at teardown). No usage-stats thread.
NODE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
HEAD_RESOURCE = "node:__internal_head__"

# Run with the venv's python in a subprocess, so the caller's process never joins the cluster
# here: prints the alive nodes as JSON once `want` are alive or the deadline passes.
_WAIT_FOR_NODES = r"""
import json, sys, time
import ray
address, want, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= want or time.time() > deadline:
        break
    time.sleep(0.2)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes]))
"""


@dataclass(frozen=True)
class ClusterInfo:
    """What a test needs to use (and check on) a running `namespaced_cluster`."""

    address: str  # "127.0.0.1:PORT", the GCS address for `ray.init(address=...)`
    dashboard_url: str  # "http://127.0.0.1:PORT": dashboard and Jobs API
    head_temp_dir: Path  # the head's --temp-dir; empty on the worker node
    worker_temp_dir: Path  # the worker node's --temp-dir and TMPDIR (host-visible: its logs)
    head_node_id: str
    worker_node_id: str  # the namespaced node
    head_pgid: int  # process groups (= pids of the `ray start --block` processes)
    worker_pgid: int


def unshare_available() -> str | None:
    """None if `unshare -m` can mount a tmpfs here, else a one-line reason for `pytest.skip`."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces need Linux, not {sys.platform}"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    with tempfile.TemporaryDirectory(prefix="ns", dir="/tmp") as tmp:
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {shlex.quote(tmp)} && true"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`unshare -m` failed: {e}"
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return f"`unshare -m` + tmpfs mount not permitted here: {why}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all sockets held open while choosing, so no repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            ports.append(s.getsockname()[1])
        return ports


# --- processes (from /proc; psutil is not a dependency) ---


def _proc_state(pid: int) -> str | None:
    """The one-letter state of `pid` ("Z" for a zombie), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for pid in _all_pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
        except OSError:
            continue
        if _proc_state(pid) not in (None, "Z"):
            out.append(pid)
    return out


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains `text` (e.g. a temp dir)."""
    needle = text.encode()
    out = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            blob = Path(f"/proc/{pid}/cmdline").read_bytes()
            blob += Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in blob and _proc_state(pid) not in (None, "Z"):
            out.append(pid)
    return out


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> list[int]:
    """SIGTERM the process group led by `proc`, SIGKILL what is left after `grace` seconds.

    Returns the pids still alive after that (normally none); warns about them.
    """
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, else it lingers as a zombie of ours
            if not group_pids(pgid):
                return []
            time.sleep(0.1)
    left = group_pids(pgid)
    warnings.warn(f"process group {pgid} survived SIGKILL: pids {left}", stacklevel=2)
    return left


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"    <cannot read {path}: {e}>"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _tool(name: str) -> str:
    """Path of the venv's `name` console script (ray, mlflow, python)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the tests with the project's venv")
    return str(path)


def _child_env(
    extra: Mapping[str, str] | None = None, tmpdir: Path | None = None
) -> dict[str, str]:
    """The environment for a child: ours, plus NODE_ENV, the venv on PATH, `extra`.

    `tmpdir` becomes TMPDIR, so what the node's processes leave in temp dirs (the dashboard's
    multiprocessing `pymp-*` dirs, tasks' `tempfile` files) goes away with the node's temp dir.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    # The venv first on PATH, as if activated: a Jobs API entrypoint "python ..." runs in it.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", os.defpath)])
    env.update(NODE_ENV)
    env.update(extra or {})
    return env


def driver_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a `progan` driver the test starts: ours without MLflow settings
    and RAY_ADDRESS (the test names the tracking server and cluster itself), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return env | dict(extra or {})


def _wait_until(
    ready: Callable[[], str | None],
    proc: subprocess.Popen,
    log: Path,
    what: str,
    timeout: float,
) -> None:
    """Poll `ready()` (None when ready, else what it saw) until it is; fail with `log`'s
    tail if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while (last := ready()) is not None:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; its log:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {last} after {timeout:.0f}s; its log:\n{_tail(log)}")
        time.sleep(0.2)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Until something accepts TCP connections on 127.0.0.1:`port`; fails if `proc` exits."""

    def listening() -> str | None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return None if s.connect_ex((LOOPBACK, port)) == 0 else f"no listener on {port}"

    _wait_until(listening, proc, log, what, timeout)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Until GET `url` answers 200; fails with `log`'s tail if `proc` exits or time runs out."""

    def answers() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return None if r.status == 200 else f"GET {url}: HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            return f"GET {url}: {e}"

    _wait_until(answers, proc, log, what, timeout)


def _disconnect_driver(address: str) -> None:
    """`ray.shutdown()` if this process is still connected to the cluster at `address`.

    A driver whose GCS disappears exits the whole process after a timeout; a test that failed
    before its own `ray.shutdown()` must not take pytest down with it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    port = address.rpartition(":")[2]
    try:
        connected = ray.get_runtime_context().gcs_address
    except Exception:  # the connection is already broken: drop it
        connected = f":{port}"
    if connected.rpartition(":")[2] == port:
        ray.shutdown()


# --- the cluster ---


@dataclass(frozen=True)
class HeadInfo:
    """A running `ray_head`: where to reach it and what to clean up."""

    address: str  # "127.0.0.1:PORT", the GCS address
    dashboard_url: str  # "http://127.0.0.1:PORT": dashboard and Jobs API
    temp_dir: Path  # its --temp-dir (and TMPDIR); its `ray_current_cluster` file is here
    proc: subprocess.Popen  # the `ray start --block` process, leader of its process group
    log: Path


@contextlib.contextmanager
def ray_head(
    num_cpus: int = 1,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    wait_for_dashboard: bool = True,
) -> Iterator[HeadInfo]:
    """A Ray head (`ray start --head --block`, dashboard and Jobs API on 127.0.0.1), as a user
    starts one from the activated venv; killed by process group at exit, never `ray stop`.

    Every port is chosen free and the temp dir is its own, so heads of tests running in
    parallel neither clash nor are found by another test's `ray.init()` (Ray looks for the
    latest `ray start` in the default temp dir only). Yields once the GCS listens and, unless
    `wait_for_dashboard` is False (the caller waits later), the dashboard answers.
    """
    port, dash_port, client_port, agent_port = _free_ports(4)
    address = f"{LOOPBACK}:{port}"
    dashboard_url = f"http://{LOOPBACK}:{dash_port}"
    # Short paths: Ray's unix sockets live under <temp dir>/session_*/sockets (107-char limit).
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    log = tmp / "ray-start.log"
    cmd = [
        _tool("ray"), "start", "--head", "--block",
        "--node-ip-address", LOOPBACK, "--port", str(port),
        "--num-cpus", str(num_cpus),
        "--include-dashboard", "true",
        "--dashboard-host", LOOPBACK, "--dashboard-port", str(dash_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--ray-client-server-port", str(client_port),  # default 10001 clashes across clusters
        "--temp-dir", str(tmp),
        "--disable-usage-stats",
    ]  # fmt: skip
    head = None
    try:
        with open(log, "wb") as out:
            head = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_child_env(env, tmp), cwd="/", start_new_session=True,
            )  # fmt: skip
        _wait_for_port(port, head, log, "Ray head (GCS)", timeout)
        if wait_for_dashboard:
            _wait_http(f"{dashboard_url}/api/version", head, log, "Ray dashboard", timeout)
        yield HeadInfo(address, dashboard_url, tmp, head, log)
    finally:
        _disconnect_driver(address)
        if head is not None:
            kill_group(head)
        # Anything that left its process group but still names our temp dir.
        _kill_pids(processes_mentioning(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def namespaced_cluster(
    hidden: list[Path],
    worker_cpus: int = 2,
    worker_resources: dict[str, float] | None = None,
    head_cpus: int = 1,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    worker_files: Mapping[Path, Path] | None = None,
) -> Iterator[ClusterInfo]:
    """A Ray head plus one worker node that cannot see `hidden` nor the head's temp dir.

    `hidden` must be existing directories; each is covered by an empty tmpfs in the worker
    node's mount namespace, so there it exists but is empty (never hide the venv or the code
    the worker needs: Ray workers import the driver's modules from its sys.path). `env` is
    added to both nodes' environment (their Ray workers inherit it). The caller joins with
    `ray.init(address=info.address)` and must `ray.shutdown()` before the context exits
    (done here if forgotten). `timeout` bounds each start-up wait. `worker_files` maps a
    file the worker node sees to the file it sees there instead (a bind mount, e.g. its own
    /etc/hosts).
    """
    hidden = [Path(p).resolve() for p in hidden]
    for p in hidden:
        if not p.is_dir():
            raise ValueError(f"hidden path {p} must be an existing directory")
        if BIN.resolve().is_relative_to(p):
            raise ValueError(f"hidden path {p} holds the venv ({BIN}) the worker node runs")
    with ray_head(head_cpus, env=env, timeout=timeout, wait_for_dashboard=False) as head:
        (worker_agent_port,) = _free_ports(1)
        worker_tmp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
        worker_log = worker_tmp / "ray-start.log"
        worker_cmd = [
            _tool("ray"), "start", "--block",
            "--address", head.address,
            "--node-ip-address", LOOPBACK,
            "--num-cpus", str(worker_cpus),
            "--resources", json.dumps(worker_resources or {}),
            "--dashboard-agent-listen-port", str(worker_agent_port),
            # Ray 2.60 takes a per-node temp dir; without it the worker would use the head's.
            "--temp-dir", str(worker_tmp),
            "--disable-usage-stats",
        ]  # fmt: skip
        masks = [*hidden, head.temp_dir]
        script = " && ".join(
            [f"mount -t tmpfs -o size=16m tmpfs {shlex.quote(str(p))}" for p in masks]
            + [
                f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}"
                for dst, src in (worker_files or {}).items()
            ]
            + ["exec " + shlex.join(worker_cmd)]
        )
        worker = None
        try:
            # cwd="/": a process whose cwd is inside a hidden dir would still see its old contents.
            with open(worker_log, "wb") as out:
                worker = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=_child_env(env, worker_tmp), cwd="/", start_new_session=True,
                )  # fmt: skip
            nodes = _wait_for_two_nodes(
                head.address, head.proc, head.log, worker, worker_log, timeout
            )
            _wait_http(
                f"{head.dashboard_url}/api/version", head.proc, head.log, "Ray dashboard", timeout
            )
            head_ids = [n["id"] for n in nodes if HEAD_RESOURCE in n["resources"]]
            worker_ids = [n["id"] for n in nodes if HEAD_RESOURCE not in n["resources"]]
            yield ClusterInfo(
                address=head.address,
                dashboard_url=head.dashboard_url,
                head_temp_dir=head.temp_dir,
                worker_temp_dir=worker_tmp,
                head_node_id=head_ids[0],
                worker_node_id=worker_ids[0],
                head_pgid=head.proc.pid,
                worker_pgid=worker.pid,
            )
        finally:
            _disconnect_driver(head.address)
            if worker is not None:
                kill_group(worker)
            _kill_pids(processes_mentioning(str(worker_tmp)))
            shutil.rmtree(worker_tmp, ignore_errors=True)


def _wait_for_two_nodes(
    address: str,
    head: subprocess.Popen,
    head_log: Path,
    worker: subprocess.Popen,
    worker_log: Path,
    timeout: float,
) -> list[dict]:
    """The alive nodes once there are two; names the stuck node, with its log, if not."""
    cmd = [_tool("python"), "-c", _WAIT_FOR_NODES, address, "2", str(time.time() + timeout)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        poll = subprocess.Popen(cmd, stdout=out, stderr=err, env=_child_env(), cwd="/")
        try:
            deadline = time.monotonic() + timeout + 60  # ray.init's own waits on top
            while poll.poll() is None:
                for proc, log, what in (
                    (head, head_log, "Ray head"),
                    (worker, worker_log, "namespaced Ray worker node"),
                ):
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"{what} exited with {proc.returncode} during start-up; "
                            f"its log:\n{_tail(log)}"
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not list the nodes of {address} in time")
                time.sleep(0.2)
        finally:
            if poll.poll() is None:
                poll.kill()
                poll.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if poll.returncode != 0:
        raise RuntimeError(
            f"could not connect to the Ray head at {address} to list nodes:\n"
            + "\n".join("    " + line for line in stderr.splitlines()[-15:])
            + f"\nhead log:\n{_tail(head_log)}"
        )
    nodes = json.loads(stdout.strip().splitlines()[-1])
    if len(nodes) < 2:
        have_head = any(HEAD_RESOURCE in n["resources"] for n in nodes)
        stuck = "namespaced Ray worker node" if have_head else "Ray head node"
        log = worker_log if have_head else head_log
        raise TimeoutError(
            f"{stuck} did not join {address} within {timeout:.0f}s "
            f"({len(nodes)} alive node(s)); its log:\n{_tail(log)}"
        )
    return nodes


# --- MLflow ---


@contextlib.contextmanager
def mlflow_server(
    backend_dir: Path,
    *,
    timeout: float = 120.0,
    port: int | None = None,
    artifacts_destination: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """An `mlflow server` on 127.0.0.1 storing under `backend_dir`; yields its URL. Given a
    `port`, it listens there (a server restarted on the same store and address).

    SQLite backend store, artifacts proxied by the server into `backend_dir/artifacts`
    (`--serve-artifacts` is the default), one uvicorn worker, and no job-execution runner
    (MLflow 3 would otherwise start ~8 huey consumer processes and leave a dir in /dev/shm).
    `artifacts_destination` (e.g. `s3://bucket/mlflow`) puts them in object storage instead;
    `env` is added to the server's environment (its credentials and endpoint for it).
    """
    backend_dir = Path(backend_dir).resolve()
    backend_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = backend_dir / "server.log"
    cmd = [
        _tool("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{backend_dir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(backend_dir / "artifacts"),
        "--host", LOOPBACK, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | dict(env or {})
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=backend_dir, start_new_session=True,
            )  # fmt: skip
        _wait_http(f"{url}/health", proc, log, "mlflow server", timeout)
        yield url
    finally:
        if proc is not None:
            kill_group(proc)
