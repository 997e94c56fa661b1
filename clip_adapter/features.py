"""Feature cache: each image is encoded once per (backbone, weights, view) and kept as Parquet.

Train images get `views` augmented views (seeded per image and view, so a rebuild gives the
same features); val and test get one centre-crop view. Text classifier weights are cached too.
The encoder is pluggable: in-process by default, Ray tasks in a sweep.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .backbone import Backbone, load_backbone, weights_identity
from .datasets import Item

log = logging.getLogger(__name__)

# Bump when a transform or the augmentation seeding changes: old cache entries stop matching.
TRANSFORM_VERSION = "v1"
AUGMENT, CENTER = "augment", "center"


def image_id(blob: bytes) -> str:
    return hashlib.sha1(blob).hexdigest()


def read_images(items: list[Item]) -> tuple[list[bytes | None], dict[str, str]]:
    """File bytes per item (None where unreadable) and {path: reason} for the unreadable ones."""
    blobs, bad = [], {}
    for item in items:
        try:
            blobs.append(Path(item.path).read_bytes())
        except OSError as exc:
            blobs.append(None)
            bad[item.path] = exc.strerror or str(exc)
    return blobs, bad


def _view_seed(img_id: str, view: int) -> int:
    return int(img_id[:12], 16) ^ (view * 0x9E3779B1)


def encode_blobs(backbone: Backbone, blobs: list[bytes], views: int, augment: bool,
                 batch_size: int = 64) -> tuple[np.ndarray, dict[int, str]]:
    """Features [n, views, D] for image bytes; {index: reason} for those that fail to decode."""
    out = np.zeros((len(blobs), views, backbone.width), dtype=np.float32)
    bad: dict[int, str] = {}
    tensors, where = [], []

    def flush():
        if tensors:
            feats = backbone.encode_images(torch.stack(tensors)).numpy()
            for (i, v), f in zip(where, feats):
                out[i, v] = f
            tensors.clear()
            where.clear()

    for i, blob in enumerate(blobs):
        try:
            image = Image.open(io.BytesIO(blob))
            image.load()
            image = image.convert("RGB")
        except Exception as exc:  # PIL raises several types for truncated or foreign files
            bad[i] = f"cannot decode image: {exc}"
            continue
        img = image_id(blob) if augment else ""
        for v in range(views):
            if augment:
                torch.manual_seed(_view_seed(img, v))
                tensors.append(backbone.train_transform(image))
            else:
                tensors.append(backbone.test_transform(image))
            where.append((i, v))
            if len(tensors) >= batch_size:
                flush()
    flush()
    return out, bad


def text_classifier(backbone: Backbone, classnames: list[str], template: str | list[str]) -> np.ndarray:
    """L2-normalised class weights [C, D]; a list of templates is averaged (prompt ensemble)."""
    templates = [template] if isinstance(template, str) else template
    weights = []
    for name in classnames:
        emb = backbone.encode_text([t.format(name) for t in templates])
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        weights.append(mean / mean.norm())
    return torch.stack(weights).numpy().astype(np.float32)


class Encoder(Protocol):
    """What the cache needs from a backbone; a sweep supplies one that runs on Ray."""

    def images(self, blobs: list[bytes], views: int, augment: bool) -> tuple[np.ndarray, dict[int, str]]: ...
    def text(self, classnames: list[str], template: str | list[str]) -> tuple[np.ndarray, float]: ...


@dataclass
class LocalEncoder:
    """Encodes in this process; loads the backbone on first use only."""
    backbone_name: str
    weights: str
    device: str | None = None
    _backbone: Backbone | None = field(default=None, repr=False)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.backbone_name, self.weights, self.device)
        return self._backbone

    def images(self, blobs, views, augment):
        return encode_blobs(self.backbone, blobs, views, augment)

    def text(self, classnames, template):
        return text_classifier(self.backbone, classnames, template), self.backbone.logit_scale


@dataclass
class Features:
    """Cached features of a list of items, in its order."""
    features: np.ndarray     # [n, views, D] raw image features
    labels: np.ndarray       # [n]
    ok: np.ndarray           # [n] bool: False where the image could not be read


class FeatureCache:
    def __init__(self, root: str | Path, backbone: str, weights: str):
        ident = f"{backbone}|{weights_identity(weights)}|{TRANSFORM_VERSION}"
        self.dir = Path(root).expanduser().resolve() / hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.backbone, self.weights = backbone, weights
        self.images_encoded = 0

    # -- files ---------------------------------------------------------------------------------
    def _read(self, path: Path) -> pa.Table | None:
        if not path.exists():
            return None
        try:
            return pq.read_table(path, page_checksum_verification=True)
        except Exception as exc:  # any damage (truncation, bad checksum, not parquet) means rebuild
            log.warning("feature cache file %s is damaged (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _write(self, path: Path, table: pa.Table, metadata: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if metadata:
            table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, write_page_checksum=True)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- images --------------------------------------------------------------------------------
    def images(self, items: list[Item], views: int, augment: bool, encoder: Encoder,
               on_bad: Callable[[str, str], None] | None = None) -> Features:
        """Features for `items`, encoding only (image, view) pairs the cache lacks."""
        path = self.dir / f"{AUGMENT if augment else CENTER}.parquet"
        table = self._read(path)
        known: dict[tuple[str, int], np.ndarray] = {}
        if table is not None:
            ids, vs = table.column("image_id").to_pylist(), table.column("view").to_pylist()
            flat = table.column("feature").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
            known = {(i, v): flat[r] for r, (i, v) in enumerate(zip(ids, vs))}

        blobs, bad = read_images(items)
        ids = [image_id(b) if b is not None else None for b in blobs]
        todo = {}  # image id -> blob, deduplicated (the same file may appear twice)
        for img, blob in zip(ids, blobs):
            if img is not None and any((img, v) not in known for v in range(views)):
                todo[img] = blob
        if todo:
            todo_ids = list(todo)
            feats, failed = encoder.images([todo[i] for i in todo_ids], views, augment)
            self.images_encoded += len(todo_ids) - len(failed)
            new_rows = {(img, v): feats[j, v] for j, img in enumerate(todo_ids) if j not in failed
                        for v in range(views)}
            for j, reason in failed.items():
                for item, img in zip(items, ids):
                    if img == todo_ids[j]:
                        bad[item.path] = reason
            if new_rows:
                known.update(new_rows)
                keys = list(known)
                dim = len(next(iter(known.values())))
                self._write(path, pa.table({
                    "image_id": [k[0] for k in keys],
                    "view": pa.array([k[1] for k in keys], pa.int32()),
                    "feature": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.concatenate([known[k] for k in keys]).astype(np.float32)), dim),
                }))
        for p, reason in bad.items():
            (on_bad or (lambda p, r: log.warning("skipping unreadable image %s: %s", p, r)))(p, reason)

        dim = len(next(iter(known.values()))) if known else 0
        out = np.zeros((len(items), views, dim), dtype=np.float32)
        ok = np.array([item.path not in bad for item in items])
        for r, img in enumerate(ids):
            if ok[r]:
                out[r] = np.stack([known[(img, v)] for v in range(views)])
        return Features(out, np.array([it.label for it in items], dtype=np.int64), ok)

    # -- text ----------------------------------------------------------------------------------
    def text(self, classnames: list[str], template: str | list[str], encoder: Encoder) -> tuple[np.ndarray, float]:
        key = hashlib.sha1(repr((classnames, template)).encode()).hexdigest()[:16]
        path = self.dir / f"text-{key}.parquet"
        table = self._read(path)
        if table is not None and table.schema.metadata and b"logit_scale" in table.schema.metadata:
            weights = np.stack(table.column("weight").to_numpy(zero_copy_only=False)).astype(np.float32)
            return weights, float(table.schema.metadata[b"logit_scale"])
        weights, scale = encoder.text(classnames, template)
        self._write(path, pa.table({"classname": classnames, "weight": list(weights)}),
                    {"logit_scale": scale})
        return weights, scale
