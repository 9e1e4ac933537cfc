"""A dataset in object storage, staged onto a node's disk one resolution at a time.

`progan prepare SOURCE s3://bucket/celeba-128` publishes the dataset's files and, last, a
manifest listing each file's size and sha256 (`publish`). A training worker asks `stage`
for the resolutions of its phase: the node's cache (`data.cache_dir`, default
`$PROGAN_CACHE_DIR` or `~/.cache/progan/datasets`) gets a folder per dataset URI holding
the manifest and those LMDBs, in the layout of a local dataset, so everything that reads a
dataset reads the staged folder. Per node and dataset:

- one stager at a time (`.lock`): the workers of a node share one download;
- a cached file is used when it is what the manifest lists: size and sha256, the hash
  re-checked whenever the file's size or mtime differ from when it was last verified (a
  file changed or damaged since is fetched again);
- a dataset prepared again at the same URI (another fingerprint) replaces the old copy;
- the cache stays under `data.cache_max_gb`: least recently used files of other
  resolutions and datasets go first.

Every decision is one line in `<cache>/staging.jsonl` (hit, download, refetch, evict), which
the benchmark and the tests count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from preprocessing.lmdb_records import (
    KEYS_DIR,
    MANIFEST,
    close_readers,
    read_manifest,
    resolution_dir,
    write_json_atomic,
)
from preprocessing.object_store import (
    display,
    download,
    is_uri,
    join,
    read_bytes,
    sha256_of,
    upload,
    write_bytes,
)
from progan.files import FolderBusyError, FolderLock

CACHE_ENV = "PROGAN_CACHE_DIR"
EVENTS = "staging.jsonl"
STAMP = ".verified"  # beside each staged file: the size, mtime and sha256 it was verified at
LOCK_WAIT_S = 3600.0  # another worker of the node may be downloading a large LMDB


class StagingError(RuntimeError):
    """A dataset in object storage that cannot be staged here, in one line."""


def default_cache_root() -> Path:
    """`$PROGAN_CACHE_DIR`, else `~/.cache/progan/datasets`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "progan" / "datasets"


def dataset_folder(root: Path, uri: str) -> Path:
    """The cache folder of one dataset URI (credentials are not part of the name)."""
    return root / hashlib.sha256(display(uri).encode()).hexdigest()[:16]


def data_file(resolution: int | None) -> str:
    """The dataset-relative name of one LMDB file (None: the key table)."""
    folder = KEYS_DIR if resolution is None else resolution_dir("", resolution).name
    return f"{folder}/data.mdb"


def read_remote_manifest(uri: str) -> dict:
    """A published dataset's manifest (FileNotFoundError naming the URI if there is none)."""
    try:
        return json.loads(read_bytes(join(uri, MANIFEST)))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{display(uri)} has no {MANIFEST}: not a finished prepared dataset"
        ) from None


def publish(local: Path, uri: str) -> dict:
    """Upload a finished local dataset to `uri`: its LMDBs, rejects and report files, then
    the manifest with every file's size and sha256 (a reader trusts nothing before it)."""
    manifest = read_manifest(local)
    files: dict[str, dict] = {}
    names = [data_file(None)] + [data_file(int(r)) for r in manifest["resolutions"]]
    skip = (MANIFEST, FolderLock.NAME)  # the manifest goes last; the prepare's lock stays
    extras = [p.name for p in local.iterdir() if p.is_file() and p.name not in skip]
    for name in names + sorted(extras):
        sha = upload(local / name, join(uri, name))
        files[name] = {"bytes": (local / name).stat().st_size, "sha256": sha}
    manifest = {**manifest, "files": files}
    write_bytes(join(uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def stage(
    uri: str,
    resolutions: list[int],
    root: str | os.PathLike | None = None,
    max_bytes: int | None = None,
    with_keys: bool = False,
) -> Path:
    """A local dataset folder holding `uri`'s manifest and the LMDBs of `resolutions` (and the
    key table if `with_keys`), each verified against the manifest; a local path is returned
    as it is."""
    if not is_uri(uri):
        return Path(uri)
    root = Path(root) if root else default_cache_root()
    folder = dataset_folder(root, uri)
    manifest = read_remote_manifest(uri)
    files = manifest.get("files")
    if not files:
        raise StagingError(
            f"{display(uri)}: its manifest lists no files (not published by `progan prepare "
            "SOURCE URI`); prepare it into the URI again"
        )
    wanted = [data_file(r) for r in resolutions] + ([data_file(None)] if with_keys else [])
    missing = [name for name in wanted if name not in files]
    if missing:
        raise StagingError(f"{display(uri)} has no {', '.join(missing)}")
    need = sum(int(files[n]["bytes"]) for n in wanted)
    if max_bytes is not None and need > max_bytes:
        raise StagingError(
            f"data.cache_max_gb: {max_bytes / 1e9:g} GB cannot hold {display(uri)}'s "
            f"{', '.join(wanted)} ({need / 1e9:.2f} GB); raise it"
        )
    with FolderLock(folder).wait(LOCK_WAIT_S):
        _replace_if_prepared_again(folder, manifest, uri)
        keep = {folder / n for n in wanted}
        for name in wanted:
            _stage_file(uri, folder / name, files[name], root, keep, max_bytes)
    return folder


def _replace_if_prepared_again(folder: Path, manifest: dict, uri: str) -> None:
    """Start the folder over when the manifest at `uri` is another dataset's."""
    local = folder / MANIFEST
    if local.is_file():
        old = json.loads(local.read_text())
        if old.get("files") == manifest.get("files"):
            return
        close_readers([*folder.glob("res-*"), folder / KEYS_DIR])
        for path in folder.iterdir():
            if path.name != FolderLock.NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        _event(folder.parent, uri, MANIFEST, "replaced (prepared again)", 0, 0.0)
    write_json_atomic(local, manifest, indent=2, sort_keys=True)
    (folder / "source.txt").write_text(display(uri) + "\n")


def _stage_file(
    uri: str, target: Path, entry: dict, root: Path, keep: set[Path], max_bytes: int | None
) -> None:
    """One file: kept if verified, else downloaded (after making room) and verified."""
    size, sha = int(entry["bytes"]), entry["sha256"]
    name = f"{target.parent.name}/{target.name}"
    started = time.perf_counter()
    action = "download"
    if target.is_file():
        if _verified(target, size, sha):
            _touch_stamp(target)
            _event(root, uri, name, "hit", 0, time.perf_counter() - started)
            return
        action = "refetch (cached copy differs from the manifest)"
        close_readers([target.parent])
    _make_room(root, size, target.parent.parent, keep, max_bytes)
    got = download(join(uri, name), target)
    if got != sha or target.stat().st_size != size:
        target.unlink(missing_ok=True)
        raise StagingError(
            f"{display(uri)}/{name} does not match its manifest (sha256 {got[:12]}..., "
            f"expected {sha[:12]}...): the dataset changed while it was read, or is damaged; "
            "prepare it again"
        )
    _write_stamp(target, sha)
    _event(root, uri, name, action, size, time.perf_counter() - started)


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + STAMP)


def _verified(target: Path, size: int, sha: str) -> bool:
    """The file is the manifest's: by its stamp if size and mtime are unchanged, else hashed."""
    st = target.stat()
    if st.st_size != size:
        return False
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads(_stamp_path(target).read_text())
        if stamp == {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}:
            return True
    if sha256_of(target) != sha:
        return False
    _write_stamp(target, sha)
    return True


def _write_stamp(target: Path, sha: str) -> None:
    st = target.stat()
    stamp = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    write_json_atomic(_stamp_path(target), stamp)


def _touch_stamp(target: Path) -> None:
    """Mark a file used now (the stamp's mtime orders eviction; the data file's is checked)."""
    with contextlib.suppress(OSError):
        os.utime(_stamp_path(target))


def cached_files(root: Path) -> list[tuple[float, int, Path]]:
    """(last used, bytes, path) of every staged LMDB file under `root`."""
    out = []
    for stamp in root.glob(f"*/*/data.mdb{STAMP}"):
        data = stamp.with_name("data.mdb")
        with contextlib.suppress(OSError):
            out.append((stamp.stat().st_mtime, data.stat().st_size, data))
    return sorted(out)


def _make_room(
    root: Path, incoming: int, held: Path, keep: set[Path], max_bytes: int | None
) -> None:
    """Evict least recently used files (other than `keep`; `held` is the dataset folder
    whose lock this process holds) until `incoming` bytes fit under `max_bytes` and on the
    disk."""
    files = cached_files(root)
    total = sum(size for _, size, _ in files)
    free = shutil.disk_usage(root).free

    def fits() -> bool:
        under_limit = max_bytes is None or total + incoming <= max_bytes
        return under_limit and incoming < free

    for _, size, path in files:
        if fits():
            return
        dataset = path.parent.parent
        if path in keep or not _evict(path, dataset, own=dataset == held):
            continue
        total, free = total - size, free + size
        source = dataset / "source.txt"
        name = source.read_text().strip() if source.is_file() else dataset.name
        _event(root, name, f"{path.parent.name}/data.mdb", "evict", size, 0.0)
    if not fits():
        raise StagingError(
            f"staging needs {incoming / 1e9:.2f} GB in {root}: {free / 1e9:.2f} GB free, "
            f"{total / 1e9:.2f} GB cached (data.cache_max_gb "
            f"{'unset' if max_bytes is None else f'{max_bytes / 1e9:g}'}); free disk space "
            "or set data.cache_dir elsewhere"
        )


def _evict(path: Path, dataset: Path, own: bool) -> bool:
    """Delete one staged file (under its dataset's lock unless it is the one held now)."""
    lock = contextlib.nullcontext() if own else FolderLock(dataset)
    try:
        with lock:
            close_readers([path.parent])
            path.unlink(missing_ok=True)
            _stamp_path(path).unlink(missing_ok=True)
            return True
    except FolderBusyError:  # being staged by another process: leave it
        return False


def _event(root: Path, uri: str, name: str, action: str, size: int, seconds: float) -> None:
    """One line of `<cache>/staging.jsonl`."""
    line = {
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "dataset": display(uri),
        "file": name,
        "action": action,
        "bytes": size,
        "seconds": round(seconds, 4),
    }
    root.mkdir(parents=True, exist_ok=True)
    with open(root / EVENTS, "a") as f:
        f.write(json.dumps(line) + "\n")
