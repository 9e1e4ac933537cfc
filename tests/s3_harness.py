"""A real S3 API server on 127.0.0.1 for tests: moto's standalone server (`moto_server`).

`s3_server()` starts it in its own process group, creates a bucket and yields an `S3` whose
`uri(path)` names an object prefix the way a user writes one for an S3-compatible server
(`s3://bucket/path?endpoint_override=127.0.0.1:PORT&scheme=http`), and whose `env` holds the
credentials every process that reads the bucket needs (moto accepts any key; boto3-based
clients such as MLflow's artifact store also need `MLFLOW_S3_ENDPOINT_URL`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster_harness import BIN, LOOPBACK, _wait_http, free_port, kill_group

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "progan-test",
    "AWS_SECRET_ACCESS_KEY": "progan-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing by the AWS SDKs
}


@dataclass
class S3:
    """A running server and its bucket."""

    endpoint: str  # "127.0.0.1:PORT"
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, path: str = "") -> str:
        """`s3://bucket/path` with the endpoint as pyarrow (and Ray) read it."""
        location = f"{self.bucket}/{path.strip('/')}".rstrip("/")
        return f"s3://{location}?endpoint_override={self.endpoint}&scheme=http"

    def client(self):
        """A boto3 S3 client of the server (for listing and corrupting objects)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def objects(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`."""
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(folder: Path, bucket: str = "progan-test", timeout: float = 60.0) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (its log in `folder`), with `bucket` created."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "moto.log"
    env = {**os.environ, **CREDENTIALS}
    proc = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=folder, start_new_session=True,
            )  # fmt: skip
        _wait_http(f"http://{LOOPBACK}:{port}/moto-api/", proc, log, "moto S3 server", timeout)
        s3 = S3(f"{LOOPBACK}:{port}", bucket, dict(CREDENTIALS))
        s3.client().create_bucket(Bucket=bucket)
        s3.env["MLFLOW_S3_ENDPOINT_URL"] = f"http://{s3.endpoint}"
        yield s3
    finally:
        if proc is not None:
            kill_group(proc)
