"""Image sources: a folder tree, a zip archive read in place, or a list file of paths.

A source lists its entries once, in sorted order, as stable keys (the path relative to the
source root, with forward slashes), and reads one entry's bytes on demand. Workers read
through a `SourceReader` (kind + root only) and each entry's location (a file path, or a
zip member name), so they need neither the whole listing nor the driver. Keys are what
reruns and resumes line up on; the fingerprint summarises the listing (names, sizes and, for
zips, CRCs) so a changed source is noticed.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class SourceError(ValueError):
    """The source itself cannot be used (missing, empty, not a folder/zip/list)."""


@dataclass
class Source:
    """A listed source: sorted keys plus what is needed to read each one's bytes."""

    kind: str  # "folder" | "zip" | "list"
    root: str
    keys: list[str]
    fingerprint: str
    _paths: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def location(self, key: str) -> str:
        """Where one entry's bytes are: a file path, or the member name in the zip."""
        if self.kind == "zip":
            return key
        return self._paths.get(key) or os.path.join(self.root, key)

    def reader(self) -> SourceReader:
        """A small picklable reader of this source's locations (for workers)."""
        return SourceReader(self.kind, self.root)

    def read(self, key: str) -> bytes:
        """Bytes of one entry; raises OSError if it cannot be read (e.g. it vanished)."""
        return self.reader().read(self.location(key))

    def limited(self, limit: int | None) -> Source:
        """The first `limit` keys of this source (all when None), with its own fingerprint."""
        if limit is None or limit >= len(self.keys):
            return self
        keys = self.keys[:limit]
        fp = _hash([self.fingerprint, f"limit={limit}"])
        return Source(self.kind, self.root, keys, fp, self._paths)


@dataclass(frozen=True)
class SourceReader:
    """Reads entries by location; a zip is opened once per process and kept open."""

    kind: str
    root: str

    def read(self, location: str) -> bytes:
        """Bytes at `location`; OSError/KeyError if it cannot be read (e.g. it vanished)."""
        if self.kind == "zip":
            return _open_zip(self.root).read(location)
        with open(location, "rb") as fh:
            return fh.read()


_ZIPS: dict[tuple[str, int], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    key = (path, os.getpid())
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def _hash(parts: list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _folder(root: Path) -> Source:
    entries: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = Path(dirpath, name)
            try:
                size = full.stat().st_size
            except OSError:
                continue
            entries.append((full.relative_to(root).as_posix(), size))
    entries.sort()
    fp = _hash([f"{k}:{s}" for k, s in entries])
    return Source("folder", str(root), [k for k, _ in entries], fp)


def _zip(path: Path) -> Source:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = sorted(
                (i for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)),
                key=lambda i: i.filename,
            )
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: not a readable zip archive ({exc})") from exc
    fp = _hash([f"{i.filename}:{i.file_size}:{i.CRC:08x}" for i in infos])
    return Source("zip", str(path), [i.filename for i in infos], fp)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _list_file(path: Path) -> Source:
    base = path.parent
    paths: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not a folder, a zip archive or a text list of paths") from exc
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        full = Path(line) if os.path.isabs(line) else base / line
        paths[line] = str(full)
    keys = sorted(paths)
    sizes = []
    for key in keys:
        try:
            sizes.append(f"{key}:{os.stat(paths[key]).st_size}")
        except OSError:
            sizes.append(f"{key}:missing")
    return Source("list", str(base), keys, _hash(sizes), paths)


def open_source(spec: str | os.PathLike | Source) -> Source:
    """List a source: a folder, a `.zip` archive, or a text file with one path per line.

    Relative paths in a list file are relative to the list file's folder. Hidden files
    (dot-names, `__MACOSX`) are skipped; everything else is listed and judged by content.
    """
    if isinstance(spec, Source):
        return spec
    path = Path(spec)
    if path.is_dir():
        source = _folder(path)
    elif path.is_file() and zipfile.is_zipfile(path):
        source = _zip(path)
    elif path.is_file():
        source = _list_file(path)
    else:
        raise SourceError(f"source {path} does not exist")
    if not source.keys:
        raise SourceError(f"source {path} holds no files")
    return source
