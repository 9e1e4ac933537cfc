"""Secrets stay where the operator put them: in environment variables, never in records.

Two kinds of secret reach this project: variables whose name says so (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...) and passwords inside URIs
(`http://user:pw@host`, `postgresql://user:pw@host/db`, `s3://KEY:SECRET@bucket`).

- What the project stores, logs or prints (config.yaml, state.json, MLflow params and tags,
  the console) holds URIs with the password replaced by `***` (`redact_uri`).
- What Ray records (a job's or a worker's runtime env, shown by `ray job list`, the
  dashboard and Ray's own logs) holds a secret as a reference, `"${NAME}"`, which Ray
  expands from the environment of the node that starts the process (`runtime_env_vars`).
  A Ray started by `progan run` inherits the driver's environment, so this is automatic;
  on a cluster the operator sets the variables where each node's Ray is started
  (docs/using.md, "Secrets").
- A redacted URI read back (a resumed run's config.yaml, a worker's job) gets its
  password from the environment's MLFLOW_TRACKING_URI when that names the same place
  (`with_credentials`).
"""

from __future__ import annotations

import os
import re

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|CREDENTIAL|PRIVATE|(^|_)KEY($|_)|API_KEY")
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@"
)


def has_password(uri: str | None) -> bool:
    """Whether `uri` carries a password (`scheme://user:password@...`) that is not masked."""
    if not uri:
        return False
    match = _USERINFO.search(uri)
    return bool(match) and match.group("pw") != MASK


def redact_uri(text: str) -> str:
    """`text` with every `scheme://user:password@` turned into `scheme://user:***@`."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text)


def redact(text: str) -> str:
    """`redact_uri`, and the value of every secret-named variable of this process masked:
    for console lines and error messages that may quote them."""
    out = redact_uri(text)
    for name, value in os.environ.items():
        if len(value) >= 6 and is_secret(name, value):
            out = out.replace(value, MASK)
    return out


def is_secret(name: str, value: str) -> bool:
    """A variable whose name says it is a secret, or whose value holds a password."""
    return bool(SECRET_NAME.search(name.upper())) or has_password(value)


def runtime_env_vars(env: dict[str, str]) -> dict[str, str]:
    """`env` for a Ray runtime env: each secret replaced by `${NAME}`, which Ray expands
    from the starting node's environment; the others as they are."""
    return {k: f"${{{k}}}" if is_secret(k, v) else v for k, v in env.items()}


def export_secrets(env: dict[str, str]) -> None:
    """Put `env`'s secrets into this process's environment, so that a Ray started from it
    (a local cluster) can expand their references."""
    for name, value in env.items():
        if is_secret(name, value):
            os.environ[name] = value


def with_credentials(uri: str) -> str:
    """A redacted `uri` with its password back from $MLFLOW_TRACKING_URI, when that names the
    same place; else `uri` unchanged (the server then refuses, and says so)."""
    if MASK not in uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    return env if env and redact_uri(env) == uri else uri
