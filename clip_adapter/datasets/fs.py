"""Where dataset files live: a local folder, or any URI pyarrow reads (file://, s3://, gs://, hdfs://).

`Location` is the small part of pathlib the dataset readers use, over a pyarrow filesystem, so the
same reader lists a local tree or a bucket. Local paths stay plain paths (str() is the path itself);
other locations print as their URI, which is what items carry to the workers that read them.
"""

from __future__ import annotations

import fnmatch
import posixpath
from functools import cache
from pathlib import Path

import pyarrow.fs as pafs

_LOCAL = pafs.LocalFileSystem()


@cache
def _filesystem(uri_root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(uri_root)[0]


def _split_uri(text: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path on it, prefix that turns a path back into the URI)."""
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return _LOCAL, "/" + rest.lstrip("/"), "file://"
    bucket = rest.split("/", 1)[0]
    fs = _filesystem(f"{scheme}://{bucket}")
    return fs, rest.rstrip("/"), f"{scheme}://"


class Location:
    def __init__(self, where: str | Path | Location, _fs=None, _prefix: str = "", _info=None):
        if isinstance(where, Location):
            self.fs, self.path, self.prefix, self._info = where.fs, where.path, where.prefix, where._info
        elif _fs is not None:
            self.fs, self.path, self.prefix, self._info = _fs, str(where), _prefix, _info
        elif "://" in str(where):
            self.fs, self.path, self.prefix = _split_uri(str(where))
            self._info = None
        else:
            self.fs, self.path, self.prefix, self._info = (
                _LOCAL,
                str(Path(where).expanduser().absolute()),
                "",
                None,
            )

    # -- names ---------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def __truediv__(self, part: str) -> Location:
        return Location(posixpath.join(self.path, str(part)) if part else self.path, self.fs, self.prefix)

    def relative(self, child: str) -> str:
        """`child` (a str() of a location under this one) relative to this location."""
        return posixpath.relpath(child[len(self.prefix) :] if self.prefix else child, self.path)

    def __str__(self) -> str:
        return f"{self.prefix}{self.path}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, Path)):
            other = Location(other)
        return isinstance(other, Location) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: Location) -> bool:
        return str(self) < str(other)

    # -- what is there -------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        if self._info is None:
            self._info = self.fs.get_file_info(self.path)
        return self._info

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def iterdir(self) -> list[Location]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Location(i.path, self.fs, self.prefix, i) for i in infos]

    def glob(self, pattern: str) -> list[Location]:
        """Children whose name matches `pattern` (one level, like Path.glob without '**')."""
        return sorted(c for c in self.iterdir() if fnmatch.fnmatch(c.name, pattern))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")


def read_bytes(where: str) -> bytes:
    """An item's bytes, where it lives: what a worker calls with an item's path."""
    if "://" not in where:
        with open(where, "rb") as fh:
            return fh.read()
    return Location(where).read_bytes()


def stat(paths: list[str]) -> list[tuple[int, int] | None]:
    """(size, mtime in ns) per path, None where it is missing: what the feature index is keyed by.

    Local paths are stat-ed one by one; URIs in one pyarrow call per filesystem.
    """
    out: list[tuple[int, int] | None] = [None] * len(paths)
    remote: dict[int, tuple[pafs.FileSystem, list[tuple[int, str]]]] = {}
    for i, p in enumerate(paths):
        if "://" in p:
            fs, path, _ = _split_uri(p)
            remote.setdefault(id(fs), (fs, []))[1].append((i, path))
            continue
        try:
            st = Path(p).stat()
            out[i] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    for fs, entries in remote.values():
        for (i, _), info in zip(entries, fs.get_file_info([p for _, p in entries])):
            if info.type == pafs.FileType.File:
                out[i] = (info.size, info.mtime_ns or 0)
    return out
