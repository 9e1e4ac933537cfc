"""`progan submit | status | logs`: run the pipeline as a Ray Job on a cluster.

`submit CONFIG` validates the config here (a bad config never reaches the cluster), makes
its paths absolute (the cluster must see the same paths: a shared filesystem, the same
machine, or URIs), and submits `progan run` with the project's packages in the job's
runtime env. Submitting the same `--run-id` again (after a failed or stopped job) resumes
that run. `submit tune SPEC ...` submits a sweep (the spec validated here, sent with its
base config inlined) and `submit prepare SOURCE OUT ...` a preparation (its arguments
checked here, paths as the cluster sees them); `--` before the verb passes every option
after it to the job's command.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import tempfile
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
OTHER_VERBS = ("tune", "prepare")  # `progan submit VERB ...` besides a run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit`, `status` and `logs`."""
    p = subparsers.add_parser(
        "submit", help="submit `progan run` (or `tune`, `prepare`) as a Ray Job"
    )
    p.add_argument(
        "config", help="pipeline config YAML (validated here first), or the verb tune / prepare"
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, or the verb's words")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="Ray dashboard/Jobs address")
    p.add_argument("--run-id", default=None, help="continue this run (default: a new id)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p.add_argument(
        "--python", default="python", help="interpreter on the cluster with the project's deps"
    )
    p.set_defaults(func=guarded(submit))
    for name, func, help_text in (
        ("status", status, "print a submitted job's status"),
        ("logs", logs, "print (or --follow) a submitted job's logs"),
    ):
        q = subparsers.add_parser(name, help=help_text)
        q.add_argument("job_id", help="what `progan submit` printed")
        q.add_argument("--address", default=DEFAULT_ADDRESS, help="Ray dashboard/Jobs address")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="until the job ends")
        q.set_defaults(func=guarded(func))


def guarded(verb):
    """The verb, with a dashboard it cannot reach (or a job it cannot find) ending in one
    line and an exit code (pipeline.cli.failures) instead of a traceback."""
    import functools

    @functools.wraps(verb)
    def run(args: argparse.Namespace) -> int:
        from rich.console import Console

        from pipeline.cli.failures import EXIT_CLUSTER, EXIT_CONFIG, Failure, classify, say

        try:
            return verb(args)
        except Exception as err:
            failure = classify(err)
            text = failure.text
            if "404" in text or "does not exist" in text:
                job = getattr(args, "job_id", "")
                failure = Failure(EXIT_CONFIG, "error", f"no job {job} at {args.address}")
                return say(Console(soft_wrap=True), failure, None, "`ray job list` lists them")
            if failure.code == EXIT_CLUSTER or "Failed to connect" in text:
                failure = Failure(EXIT_CLUSTER, "Ray cluster unreachable", text)
            hint = f"check that a Ray cluster's dashboard listens at {args.address} (`ray status`)"
            return say(Console(soft_wrap=True, stderr=False), failure, None, hint)

    return run


def submission_id(address: str, run_id: str) -> str:
    """`progan-<run id>`, or `progan-<run id>-<n>` when that run was submitted before."""
    taken = {job.submission_id for job in client(address).list_jobs()}
    name, n = f"progan-{run_id}", 1
    while name in taken:
        n += 1
        name = f"progan-{run_id}-{n}"
    return name


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(args: argparse.Namespace) -> int:
    """Validate locally, then submit; prints the job id."""
    from pipeline.config import ConfigError, load_config
    from pipeline.driver.run_dir import check_run_id, new_run_id

    if args.config in OTHER_VERBS:
        return submit_verb(args)
    try:
        cfg = load_config(args.config, args.overrides)  # paths absolute: jobs run elsewhere
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    try:
        run_id = check_run_id(args.run_id) if args.run_id else new_run_id()
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    job_dir = job_folder({"config.yaml": cfg.model_dump(mode="json")})
    command = [args.python, "-m", "pipeline.cli", "run", "config.yaml", "--run-id", run_id]
    # a job id is used once: a resubmission of the same run id (which resumes it) gets its
    # own, the first one keeps the plain name
    return submit_job(args, job_dir, command, run_id, {"run_id": run_id})


def submit_verb(args: argparse.Namespace) -> int:
    """`progan submit tune|prepare ...`: check the command here, then submit it as a job."""
    import time

    from pipeline.cli import build_parser
    from pipeline.config import ConfigError, absolute_paths

    verb, words = args.config, list(args.overrides)
    try:
        parsed = build_parser().parse_args([verb, *words])  # a bad option: usage, exit 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if getattr(parsed, "address", None):
        print(f"error: the job runs on the cluster: give `progan {verb}` no --address")
        return 2
    if verb == "prepare":
        command = [args.python, "-m", "pipeline.cli", verb, *words]
        return submit_job(
            args,
            job_folder({}),
            command,
            f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}",
            {"verb": verb},
        )
    from pipeline.search.spec import build_sweep, load_spec_dict

    if parsed.resume or parsed.dry_run or not parsed.spec:
        print("error: submit a new sweep (SPEC [overrides] [--name]); resume it with "
              "`progan tune --resume DIR` on the cluster")  # fmt: skip
        return 2
    try:
        raw = load_spec_dict(parsed.spec, parsed.overrides)
        raw["name"] = parsed.name or raw["name"]
        raw["base"] = absolute_paths(raw.get("base") or {})  # the job runs elsewhere
        build_sweep(raw)  # everything checked before the cluster is contacted
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    command = [args.python, "-m", "pipeline.cli", "tune", "spec.yaml"]
    return submit_job(
        args, job_folder({"spec.yaml": raw}), command, f"tune-{raw['name']}", {"verb": verb}
    )


def job_folder(files: dict[str, dict]) -> Path:
    """A new temporary working dir for a job holding `files` as YAML (without passwords)."""
    import yaml

    from pipeline.tracking.secrets import redact_uri

    folder = Path(tempfile.mkdtemp(prefix="progan-job-"))
    for name, content in files.items():
        (folder / name).write_text(redact_uri(yaml.safe_dump(content, sort_keys=False)))
    return folder


def submit_job(
    args: argparse.Namespace, job_dir: Path, command: list[str], name: str, metadata: dict
) -> int:
    """Submit `command` from `job_dir` with the project's packages and MLflow's settings here
    (each secret as a `${NAME}` reference the head node's Ray expands, tracking.secrets) as
    job `progan-<name>`; print its id; with --wait, follow it to its end."""
    from pipeline.driver.ray_session import RAY_ENV, project_modules
    from pipeline.tracking.secrets import runtime_env_vars
    from pipeline.tracking.tracker import mlflow_settings

    env = runtime_env_vars({**RAY_ENV, **mlflow_settings()})
    job_id = client(args.address).submit_job(
        entrypoint=shlex.join(command),
        submission_id=submission_id(args.address, name),
        runtime_env={"working_dir": str(job_dir), "py_modules": project_modules(), "env_vars": env},
        metadata=metadata,
    )
    print(job_id)
    print(f"follow it: progan logs {job_id} --follow --address {args.address}")
    return follow(args.address, job_id) if args.wait else 0


def follow(address: str, job_id: str) -> int:
    """Stream a job's logs until it ends; exit 0 only if it succeeded."""

    async def tail() -> None:
        async for lines in client(address).tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    final = client(address).get_job_status(job_id)
    print(f"job {job_id}: {final}")
    return 0 if str(final).endswith("SUCCEEDED") else 1


def status(args: argparse.Namespace) -> int:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    info = client(args.address).get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    """Print the job's logs so far, or follow them."""
    if args.follow:
        return follow(args.address, args.job_id)
    print(client(args.address).get_job_logs(args.job_id), end="")
    return 0
