"""Benchmark of the preprocessing stages: `python -m preprocessing.bench [--source S] [-n N]`.

Reports images/s for decode, detect, align+pyramid and record encode + LMDB write measured
separately in this process (one thread), end-to-end prepare with 1 and 2 Ray workers
(scaling ratio; `--prepare-only` for just these, with the machine's load average), the
merge time, and LMDB read throughput in random order, raw vs PNG records.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s"


def stage_rates(source, n: int, resolution: int) -> list[tuple[str, str]]:
    """Per-stage throughput on the first n images of source, single-threaded."""
    from preprocessing.align import crop_face
    from preprocessing.config import make_config
    from preprocessing.decode import decode_image
    from preprocessing.detect import FaceDetector
    from preprocessing.lmdb_store import LmdbWriter, encode_record
    from preprocessing.process import select_faces
    from preprocessing.pyramid import build_pyramid, resolutions_down_to_4

    keys = source.keys[:n]
    blobs = [source.read(k) for k in keys]
    t = time.perf_counter()
    images = [decode_image(b) for b in blobs]
    rows = [("decode (JPEG -> RGB)", _rate(len(images), time.perf_counter() - t))]

    detector = FaceDetector(device="cpu")
    detector.detect(images[:4])  # warm-up
    t = time.perf_counter()
    detections = detector.detect(images)
    rows.append(("detect (MTCNN, batch 32)", _rate(len(images), time.perf_counter() - t)))

    config = make_config(resolution=resolution, min_face_size=1, min_prob=0.0)
    t = time.perf_counter()
    pyramids = []
    for image, faces in zip(images, detections, strict=True):
        if faces:
            face = select_faces(faces, config)[0]
            pyramids.append(build_pyramid(crop_face(image, face, resolution, 0.25, "align")))
    rows.append(("align + pyramid", _rate(len(pyramids), time.perf_counter() - t)))

    for encoding in ("raw", "png"):
        t = time.perf_counter()
        records = [
            (f"{i:08d}", {r: encode_record(a, encoding) for r, a in p.items()})
            for i, p in enumerate(pyramids)
        ]
        t_enc = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            writer = LmdbWriter(tmp, resolutions_down_to_4(resolution))
            t = time.perf_counter()
            writer.append(records)
            writer.close()
            t_write = time.perf_counter() - t
        size = sum(len(v) for _, p in records for v in p.values()) / len(records)
        rows.append((f"encode {encoding}", _rate(len(records), t_enc)))
        rows.append((f"LMDB write {encoding} ({size / 1024:.1f} KiB/image, all levels)",
                     _rate(len(records), t_write)))  # fmt: skip
    return rows


def _load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare_rates(
    source, n: int, resolution: int, encodings=("raw", "png")
) -> tuple[list[tuple[str, str]], dict]:
    """End-to-end prepare over n images with 1 and 2 Ray workers; returns rows and outputs."""
    import ray

    from preprocessing.prepare import prepare_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows, outs, rates = [], {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="progan-bench-"))
    for workers in (1, 2):
        for encoding in encodings if workers == 2 else ("raw",):
            out = tmp / f"w{workers}-{encoding}"
            before = _load()
            s = prepare_dataset(source.limited(n), out, resolution, workers=workers,
                                record_format=encoding, shard_size=64)  # fmt: skip
            rates[(workers, encoding)] = s.inputs / s.elapsed_s
            merge = s.timings.get("merge (wall)", 0.0)
            rows.append((f"prepare end-to-end, {workers} worker(s), {encoding} "
                         f"({s.elapsed_s:.0f} s, merge {merge:.1f} s; {before} -> {_load()})",
                         _rate(s.inputs, s.elapsed_s)))  # fmt: skip
            outs[encoding] = out
    ray.shutdown()
    ratio = rates[(2, "raw")] / rates[(1, "raw")]
    rows.append(("scaling 2 workers / 1 worker", f"{ratio:.2f}x"))
    return rows, outs


def merge_rates(dataset_dir: Path, shard_size: int = 64) -> list[tuple[str, str]]:
    """Time `merge_resolution` per resolution, in this process, on shard files of
    `shard_size` records rebuilt from a prepared dataset (the merge's cost without Ray)."""
    import shutil

    from preprocessing.lmdb_store import LmdbImageDataset, available_resolutions, encode_record
    from preprocessing.merge import merge_resolution
    from preprocessing.shard_file import ShardResult, write_shard

    resolutions = available_resolutions(dataset_dir)
    sets = {r: LmdbImageDataset(dataset_dir, r) for r in resolutions}
    n = len(sets[resolutions[0]])
    tmp = Path(tempfile.mkdtemp(prefix="progan-merge-"))
    encoding = sets[resolutions[0]].encoding
    for shard, start in enumerate(range(0, n, shard_size)):
        records = [
            (sets[resolutions[0]].key(i),
             {r: encode_record(ds[i].permute(1, 2, 0).numpy(), encoding) for r, ds in sets.items()})
            for i in range(start, min(n, start + shard_size))
        ]  # fmt: skip
        write_shard(tmp, ShardResult(shard, records=records))
    shards = (n + shard_size - 1) // shard_size
    rows = []
    for r in resolutions:
        t = time.perf_counter()
        merge_resolution(str(tmp), shards, r, r == resolutions[0])
        rows.append((f"merge res {r} ({n} records, {shards} shard files; {_load()})",
                     _rate(n, time.perf_counter() - t)))  # fmt: skip
    shutil.rmtree(tmp)
    return rows


def mtcnn_actor_rates(source, n: int, actors: list[int]) -> list[tuple[str, str]]:
    """MTCNN images/s with k concurrent Ray actors sharing the GPU(s) (1/k GPU each; on CPU
    when Ray has no GPU), on n images upscaled to CelebA's full 178x218, batch 32."""
    import numpy as np
    import ray
    from PIL import Image

    from preprocessing.decode import decode_image
    from preprocessing.detect import FaceDetector

    images = [
        np.asarray(Image.fromarray(decode_image(source.read(k))).resize((178, 218)))
        for k in source.keys[:n]
    ]
    ray.init(include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)

    @ray.remote
    class Detect:
        def __init__(self) -> None:
            self.detector = FaceDetector(batch_size=32)

        def run(self, batch: list) -> int:
            self.detector.detect(batch)
            return len(batch)

    rows = []
    for k in actors:
        opts = {"num_gpus": gpus / k} if gpus else {"num_cpus": 1}
        pool = [Detect.options(**opts).remote() for _ in range(k)]
        ray.get([a.run.remote(images[:32]) for a in pool])  # load + warm up
        chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
        t = time.perf_counter()
        done = sum(ray.get([pool[i % k].run.remote(c) for i, c in enumerate(chunks)]))
        where = f"{gpus:g} GPU(s)" if gpus else "CPU"
        rows.append(
            (f"MTCNN 178x218, {k} actor(s) on {where}", _rate(done, time.perf_counter() - t))
        )
        for a in pool:
            ray.kill(a)
    ray.shutdown()
    return rows


def read_rates(outs: dict, resolution: int, reads: int = 20000) -> list[tuple[str, str]]:
    """Random-order reads through LmdbImageDataset, and a 2-worker DataLoader."""
    from preprocessing.lmdb_store import LmdbImageDataset

    rows = []
    for encoding, out in outs.items():
        ds = LmdbImageDataset(out, resolution)
        order = [random.randrange(len(ds)) for _ in range(reads)]
        t = time.perf_counter()
        for i in order:
            ds[i]
        rows.append((f"LMDB read {encoding} {resolution}x{resolution}, random, 1 process",
                     _rate(reads, time.perf_counter() - t)))  # fmt: skip
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=reads)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler, num_workers=2)
        t = time.perf_counter()
        for _ in loader:
            pass
        rows.append((f"LMDB read {encoding}, DataLoader 2 workers, batch 64",
                     _rate(reads, time.perf_counter() - t)))  # fmt: skip
    return rows


def main() -> None:
    """Run all benchmarks and print a Markdown table."""
    from preprocessing.samples import make_sample_faces
    from preprocessing.sources import open_source

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=None, help="default: generated sample faces")
    parser.add_argument("-n", type=int, default=512, help="images per measurement")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--mtcnn-actors",
        default=None,
        help="only MTCNN throughput for these concurrent actor counts, e.g. 1,4,8",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="only end-to-end prepare, raw, 1 vs 2 workers"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.source is None:
        args.source = make_sample_faces(tempfile.mkdtemp(prefix="progan-faces-"), n=args.n)
    source = open_source(args.source)
    if args.mtcnn_actors:
        actors = [int(k) for k in args.mtcnn_actors.split(",")]
        rows = mtcnn_actor_rates(source, args.n, actors)
    elif args.prepare_only:
        rows, outs = prepare_rates(source, args.n, args.resolution, encodings=("raw",))
        rows += merge_rates(outs["raw"])
    else:
        rows = stage_rates(source, args.n, args.resolution)
        prep_rows, outs = prepare_rates(source, args.n, args.resolution)
        rows += prep_rows + read_rates(outs, args.resolution)
    print(f"source: {args.source}, n={args.n}, resolution={args.resolution}\n")
    print("| measurement | throughput |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
