"""Feature store: each image is encoded once per (backbone, weights, transform, view), kept as Parquet.

    <root>/<model key>/model.json                        the backbone's preprocessing, width, logit scale
    <root>/<model key>/text-<key>.parquet                a text classifier (class names + prompt)
    <root>/<model key>/<dataset>/augment/part-*.parquet  image_id, view, feature: seeded augmented views
    <root>/<model key>/<dataset>/augment-0.5/part-*.parquet   the same, cropped from 0.5 (Tip-Adapter's)
    <root>/<model key>/<dataset>/center/part-*.parquet   image_id, view, feature: one centre crop
    <root>/<model key>/<dataset>/index/part-*.parquet    path, size, mtime_ns, image_id

Images are keyed by content (sha1 of their bytes); the index maps (path relative to the dataset,
size, mtime) to that key, so a warm sweep stats its files and reads no image bytes. Shards are only
ever added, never rewritten: two sweeps writing at once lose nothing, and reads take the first copy
of a row. A shard that is damaged or of another schema is warned about, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .backbone import CROP_SCALE, weights_identity
from .datasets import Item
from .datasets.fs import Location, stat

log = logging.getLogger(__name__)

# Bump when a transform or the augmentation seeding changes: old entries stop matching.
TRANSFORM_VERSION = "v2"
AUGMENT, CENTER, INDEX = "augment", "center", "index"
SHARD_ROWS = 50_000


def view_kind(augment: bool, scale: float = CROP_SCALE) -> str:
    """The store's folder for a view kind: CoOp's augmented views keep the name they always had."""
    if not augment:
        return CENTER
    return AUGMENT if scale == CROP_SCALE else f"{AUGMENT}-{scale:g}"


# a new shard every so many rows: an interrupted encode keeps what it wrote
SCHEMAS = {
    "features": pa.schema(
        [("image_id", pa.string()), ("view", pa.int32()), ("feature", pa.list_(pa.float32()))]
    ),
    INDEX: pa.schema(
        [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("image_id", pa.string())]
    ),
}


# -- what to encode -------------------------------------------------------------------------------


@dataclass
class Request:
    """One image whose features (some views of it) the store lacks."""

    dataset: str
    path: str  # where workers read it (local path or URI)
    rel: str  # relative to the dataset's folder: the index key, with size and mtime
    size: int
    mtime_ns: int
    views: list[int]
    augment: bool
    scale: float = CROP_SCALE  # the smallest crop of an augmented view


@dataclass
class Group:
    """Items of one dataset wanted with `views` views, augmented or centre-cropped."""

    dataset: str
    root: Location  # the dataset's folder: index paths are relative to it
    items: list[Item]
    views: int
    augment: bool
    scale: float = CROP_SCALE


@dataclass
class Plan:
    """For a list of items: the content key of each (None if unknown or unreadable) and what to encode."""

    ids: list[str | None]
    todo: list[Request]
    missing: dict[str, str] = field(default_factory=dict)  # path -> reason (not there at all)


# -- the store ------------------------------------------------------------------------------------


class FeatureStore:
    def __init__(self, root: str | Path, backbone: str, weights: str):
        ident = f"{backbone}|{weights_identity(weights)}|{TRANSFORM_VERSION}"
        self.root = Path(root).expanduser().resolve()
        self.dir = self.root / hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.backbone, self.weights = backbone, weights
        self.images_encoded = 0

    # -- shards --------------------------------------------------------------------------------
    def _shards(self, dataset: str, part: str) -> list[Path]:
        return sorted((self.dir / dataset / part).glob("part-*.parquet"))

    def _read_shards(self, dataset: str, part: str, columns=None, filters=None) -> list[pa.Table]:
        schema = SCHEMAS[INDEX if part == INDEX else "features"]
        tables = []
        for path in self._shards(dataset, part):
            try:
                found = pq.read_schema(path)
                if not found.equals(schema, check_metadata=False):
                    raise ValueError(f"schema {found.names} is not ca-flow's {schema.names}")
                tables.append(
                    pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)
                )
            except Exception as exc:  # truncation, bad checksum, not Parquet, another schema
                log.warning(
                    "feature store shard %s is damaged (%s); removing it, its rows are rebuilt", path, exc
                )
                path.unlink(missing_ok=True)
        return tables

    def _index(self, dataset: str) -> dict[tuple[str, int, int], str]:
        out = {}
        for t in self._read_shards(dataset, INDEX):
            for rel, size, mtime, img in zip(
                *(t.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "image_id"))
            ):
                out.setdefault((rel, size, mtime), img)
        return out

    def _have(self, dataset: str, kind: str) -> set[tuple[str, int]]:
        have = set()
        for t in self._read_shards(dataset, kind, columns=["image_id", "view"]):
            have.update(zip(t.column("image_id").to_pylist(), t.column("view").to_pylist()))
        return have

    # -- planning and reading ------------------------------------------------------------------
    def plan(
        self,
        dataset: str,
        root: Location,
        items: list[Item],
        views: int,
        augment: bool,
        scale: float = CROP_SCALE,
    ) -> Plan:
        """Stat the items, find their content keys in the index, and list what lacks features."""
        kind = view_kind(augment, scale)
        index, have = self._index(dataset), self._have(dataset, kind)
        ids, todo, missing = [], [], {}
        for item, st in zip(items, stat([i.path for i in items])):
            if st is None:
                ids.append(None)
                missing[item.path] = "no such file"
                continue
            rel = root.relative(item.path)
            img = index.get((rel, *st))
            ids.append(img)
            lacking = list(range(views)) if img is None else [v for v in range(views) if (img, v) not in have]
            if lacking:
                todo.append(Request(dataset, item.path, rel, st[0], st[1], lacking, augment, scale))
        # the same file listed twice (a few-shot subset overlapping another) is encoded once
        todo = list({(r.path, r.augment, r.scale): r for r in todo}.values())
        return Plan(ids, todo, missing)

    def read(
        self, dataset: str, ids: list[str | None], views: int, augment: bool, scale: float = CROP_SCALE
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, views, D], ok [n]) for content keys; rows a sweep does not need are not loaded."""
        wanted = sorted({i for i in ids if i is not None})
        rows: dict[tuple[str, int], np.ndarray] = {}
        if wanted:
            for t in self._read_shards(
                dataset, view_kind(augment, scale), filters=[("image_id", "in", wanted)]
            ):
                if not len(t):
                    continue
                flat = t.column("feature").combine_chunks()
                dim = len(flat[0])
                feats = flat.flatten().to_numpy().reshape(len(t), dim)
                for img, v, f in zip(t.column("image_id").to_pylist(), t.column("view").to_pylist(), feats):
                    if v < views:
                        rows.setdefault((img, v), f)
        dim = len(next(iter(rows.values()))) if rows else 0
        out = np.zeros((len(ids), views, dim), dtype=np.float32)
        ok = np.array([i is not None and all((i, v) in rows for v in range(views)) for i in ids], dtype=bool)
        for r, img in enumerate(ids):
            if ok[r]:
                out[r] = np.stack([rows[(img, v)] for v in range(views)])
        return out, ok

    # -- writing -------------------------------------------------------------------------------
    def writer(self) -> ShardWriter:
        return ShardWriter(self)

    def images(
        self,
        dataset: str,
        root: Location,
        items: list[Item],
        views: int,
        augment: bool,
        encode: Callable[[list[Request]], Iterable[dict]],
        on_bad: Callable[[str, str], None] | None = None,
        scale: float = CROP_SCALE,
    ) -> Features:
        """Features for `items`, encoding (with `encode`) only the images and views the store lacks."""
        return self.images_of([Group(dataset, Location(root), items, views, augment, scale)], encode, on_bad)[
            0
        ]

    def images_of(
        self,
        groups: list[Group],
        encode: Callable[[list[Request]], Iterable[dict]],
        on_bad: Callable[[str, str], None] | None = None,
    ) -> list[Features]:
        """Features per group; whatever any group lacks goes to `encode` in one call.

        A shard found damaged only when its features are read is removed; one more pass then
        encodes what it held.
        """
        bad: dict[str, str] = {}
        for _ in range(2):
            plans = [self.plan(g.dataset, g.root, g.items, g.views, g.augment, g.scale) for g in groups]
            todo = [r for p in plans for r in p.todo]
            for p in plans:
                bad.update(p.missing)
            if todo:
                with self.writer() as w:
                    bad.update(w.add_all(todo, encode(todo)))
                plans = [self.plan(g.dataset, g.root, g.items, g.views, g.augment, g.scale) for g in groups]
            read = [self.read(g.dataset, p.ids, g.views, g.augment, g.scale) for g, p in zip(groups, plans)]
            if all(ok.sum() == sum(i is not None for i in p.ids) for (_, ok), p in zip(read, plans)):
                break
        report = on_bad or (lambda p, r: log.warning("skipping unreadable image %s: %s", p, r))
        for path, reason in bad.items():
            report(path, reason)
        return [
            Features(f, np.array([it.label for it in g.items], dtype=np.int64), ok)
            for g, (f, ok) in zip(groups, read)
        ]

    # -- the backbone's own facts, and text classifiers ----------------------------------------
    def model_info(self) -> dict | None:
        try:
            return json.loads((self.dir / "model.json").read_text())
        except (OSError, ValueError):
            return None

    def put_model_info(self, info: dict) -> None:
        _atomic_write(self.dir / "model.json", lambda tmp: tmp.write_text(json.dumps(info)))

    def _text_path(self, classnames: list[str], template: str | list[str]) -> Path:
        key = hashlib.sha1(repr((classnames, template)).encode()).hexdigest()[:16]
        return self.dir / f"text-{key}.parquet"

    def text(self, classnames: list[str], template: str | list[str]) -> tuple[np.ndarray, float] | None:
        path = self._text_path(classnames, template)
        if not path.exists():
            return None
        try:
            table = pq.read_table(path, page_checksum_verification=True)
            weights = np.stack(table.column("weight").to_numpy(zero_copy_only=False)).astype(np.float32)
            return weights, float(table.schema.metadata[b"logit_scale"])
        except Exception as exc:
            log.warning("feature store file %s is damaged (%s); removing it, it is rebuilt", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put_text(
        self, classnames: list[str], template: str | list[str], weights: np.ndarray, scale: float
    ) -> None:
        table = pa.table({"classname": classnames, "weight": [np.asarray(w, np.float32) for w in weights]})
        table = table.replace_schema_metadata({"logit_scale": str(scale)})
        _atomic_write(
            self._text_path(classnames, template),
            lambda tmp: pq.write_table(table, tmp, write_page_checksum=True),
        )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Readers see the old file or the new one, never half of one. Files get the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Collects encoded rows into new shards per (dataset, kind) and an index shard per dataset.

    Rows are flushed into shards of SHARD_ROWS; each shard appears whole (written aside, then
    renamed) and is never rewritten. Closing flushes the rest; an exception drops what is unflushed.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self.rows: dict[tuple[str, str], list] = {}
        self.encoded: set[tuple[str, str]] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            for key in list(self.rows):
                self._flush(*key)

    def add(self, req: Request, img: str, view: int, feature: np.ndarray) -> None:
        self._append(
            req.dataset, view_kind(req.augment, req.scale), (img, view, np.asarray(feature, np.float32))
        )
        if (req.dataset, req.rel) not in self.encoded:
            self.encoded.add((req.dataset, req.rel))
            self.store.images_encoded += 1
            self._append(req.dataset, INDEX, (req.rel, req.size, req.mtime_ns, img))

    def add_all(self, requests: list[Request], rows: Iterable[dict]) -> dict[str, str]:
        """Write every row; returns {path: reason} for images that could not be read."""
        bad = {}
        for row in rows:
            req = requests[row["request"]]
            if row["error"]:
                bad[req.path] = row["error"]
            else:
                self.add(req, row["image_id"], int(row["view"]), row["feature"])
        return bad

    def _append(self, dataset: str, part: str, row: tuple) -> None:
        rows = self.rows.setdefault((dataset, part), [])
        rows.append(row)
        if len(rows) >= SHARD_ROWS:
            self._flush(dataset, part)

    def _flush(self, dataset: str, part: str) -> None:
        rows = self.rows.pop((dataset, part), [])
        if not rows:
            return
        schema = SCHEMAS[INDEX if part == INDEX else "features"]
        columns = list(zip(*rows))
        if part != INDEX:
            feats = np.stack(columns[2])
            offsets = np.arange(0, feats.size + 1, feats.shape[1], dtype=np.int32)
            columns[2] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(feats.ravel()))
        table = pa.table(dict(zip(schema.names, columns)), schema=schema)
        path = self.store.dir / dataset / part / f"part-{uuid.uuid4().hex}.parquet"
        _atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


@dataclass
class Features:
    """Features of a list of items, in its order."""

    features: np.ndarray  # [n, views, D] raw image features
    labels: np.ndarray  # [n]
    ok: np.ndarray  # [n] bool: False where the image could not be read
