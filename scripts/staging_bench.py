"""Staging from an S3 server, and the training loader on the staged copy vs a local path.

    python scripts/staging_bench.py runs/bench/celeba-10k-64 [--endpoint HOST:PORT]

Without --endpoint it starts moto's S3 server (`moto_server`, the [dev] extra) on
127.0.0.1, so the figures are moto's (a Python server in-process on this box), not a
cloud's: they show what staging costs on top of the transfer. It publishes the dataset
(`preprocessing.staging.publish`), stages each resolution cold, then again warm (verified
by its stamp) and once after its stamp is dropped (re-hashed), and reads each level the two
ways the training loop does (`progan.loop`: the whole level loaded once, and batches
streamed by a DataLoader in PositionSampler order) from the local dataset and from the
staged copy. Prints one Markdown table per part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from preprocessing.lmdb_store import LmdbImageDataset, close_readers, read_manifest
from preprocessing.staging import STAMP, data_file, publish, stage
from progan.data import PositionSampler, load_level

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto(folder: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free 127.0.0.1 port, with a bucket `bench`."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = str(Path(sys.executable).parent / "moto_server")  # this venv's, not one on PATH
    log = open(folder / "moto.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            return proc, endpoint
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def loader_rates(folder: Path | str, resolution: int, batch: int, batches: int) -> tuple:
    """(images/s loading the whole level, images/s streaming `batches` batches)."""
    close_readers([Path(folder) / f"res-{resolution:04d}"])
    data = LmdbImageDataset(folder, resolution)
    started = time.perf_counter()
    load_level(data, torch.device("cpu"))
    whole = len(data) / (time.perf_counter() - started)
    sampler = PositionSampler(len(data), batch, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    started, n = time.perf_counter(), 0
    for i, images in enumerate(loader):
        n += len(images)
        if i + 1 == batches:
            break
    return whole, n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a prepared local dataset")
    parser.add_argument("--endpoint", default=None, help="an S3 server (default: start moto)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})
    work = Path(tempfile.mkdtemp(prefix="staging-bench-"))
    proc = None
    try:
        endpoint = args.endpoint
        if endpoint is None:
            proc, endpoint = start_moto(work)
        uri = f"s3://bench/{args.dataset.name}?endpoint_override={endpoint}&scheme=http"
        started = time.perf_counter()
        files = publish(args.dataset, uri)["files"]
        upload_s = time.perf_counter() - started
        total = sum(f["bytes"] for f in files.values())
        print(
            f"publish: {total / 1e6:.1f} MB in {upload_s:.1f} s "
            f"({total / 1e6 / upload_s:.1f} MB/s)\n"
        )
        print("| resolution | LMDB MB | cold stage s | MB/s | warm stage s | re-hash s |")
        print("| --- | --- | --- | --- | --- | --- |")
        cache = work / "cache"
        resolutions = [int(r) for r in read_manifest(args.dataset)["resolutions"]]
        for res in resolutions:
            size = files[data_file(res)]["bytes"]
            t0 = time.perf_counter()
            folder = stage(uri, [res], cache)
            t1 = time.perf_counter()
            stage(uri, [res], cache)
            t2 = time.perf_counter()
            (folder / data_file(res)).with_name(f"data.mdb{STAMP}").unlink()
            stage(uri, [res], cache)
            t3 = time.perf_counter()
            print(
                f"| {res} | {size / 1e6:.1f} | {t1 - t0:.2f} | {size / 1e6 / (t1 - t0):.1f} "
                f"| {t2 - t1:.4f} | {t3 - t2:.3f} |"
            )
        print(
            "\n| resolution | whole level, local img/s | staged | streamed, local img/s | staged |"
        )
        print("| --- | --- | --- | --- | --- |")
        for res in resolutions:
            local = loader_rates(args.dataset, res, args.batch, args.batches)
            staged = loader_rates(folder, res, args.batch, args.batches)
            print(
                f"| {res} | {local[0]:,.0f} | {staged[0]:,.0f} "
                f"| {local[1]:,.0f} | {staged[1]:,.0f} |"
            )
    except Exception:
        if proc is not None:
            print((work / "moto.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if proc is not None:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
