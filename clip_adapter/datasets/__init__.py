"""Datasets by name: where each lives under the data root, how its split is read, its prompt."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_TEMPLATE = "a photo of a {}."


class DatasetError(ValueError):
    """A dataset cannot be found or parsed; the message names the fix."""


@dataclass(frozen=True)
class Item:
    path: str   # absolute
    label: int


@dataclass
class Split:
    name: str
    kind: str
    root: Path
    classnames: list[str]
    template: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    val_from_train: bool = False  # no held-out val (ImageNet): few_shot draws val shots from unused train

    @property
    def num_images(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


@dataclass(frozen=True)
class DatasetKind:
    name: str
    folder: str                         # under the data root; "" for data shipped in a package
    layout: str                         # what we expect to find, for error messages
    read: Callable[[Path, str], Split]  # (dataset folder, dataset name) -> Split
    locate: Callable[[Path], Path] | None = None  # overrides data_root / folder


REGISTRY: dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
    REGISTRY[kind.name] = kind
    return kind


def default_data_root() -> Path:
    return Path(os.environ.get("CA_FLOW_DATA_ROOT", "~/.cache/ca-flow/data")).expanduser()


@dataclass(frozen=True)
class Found:
    name: str
    kind: str
    path: Path


def _location(kind: DatasetKind, data_root: Path) -> Path:
    return kind.locate(data_root) if kind.locate else data_root / kind.folder


def discover(data_root: Path) -> list[Found]:
    """Every dataset present: registered layouts, plus any other folder-per-class tree."""
    from .folder import is_class_tree  # late: folder.py registers kinds through this module

    found = [Found(k.name, k.name, _location(k, data_root)) for k in REGISTRY.values()
             if k.name != "imagefolder" and _location(k, data_root).exists()]
    claimed = {k.folder for k in REGISTRY.values() if k.folder}
    if data_root.is_dir():
        for sub in sorted(p for p in data_root.iterdir() if p.is_dir() and p.name not in claimed):
            if is_class_tree(sub):
                found.append(Found(sub.name, "imagefolder", sub))
    return found


def resolve(names: str | list[str], data_root: Path) -> list[Found]:
    """Turn `all` or a list of names into found datasets, or fail saying where we looked."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise DatasetError("no dataset named; pass --datasets all or --datasets NAME[,NAME...]")
    needs_root = wanted == ["all"] or any(
        n not in REGISTRY or REGISTRY[n].locate is None for n in wanted)
    if needs_root and not data_root.is_dir():
        raise DatasetError(f"data root {data_root} does not exist; create it or pass --data-root DIR "
                           f"(or set CA_FLOW_DATA_ROOT)")
    found = {f.name: f for f in discover(data_root)}
    if wanted == ["all"]:
        if not found:
            raise DatasetError(f"no dataset found under {data_root}; see `ca-flow datasets`")
        return list(found.values())
    out = []
    for name in wanted:
        if name in found:
            out.append(found[name])
        elif name in REGISTRY and name != "imagefolder":
            kind = REGISTRY[name]
            raise DatasetError(f"dataset {name} not found at {_location(kind, data_root)}; "
                               f"expected {kind.layout}")
        else:
            known = ", ".join(sorted(set(REGISTRY) - {"imagefolder"}))
            raise DatasetError(f"unknown dataset {name!r}: not registered ({known}) and {data_root / name} "
                               f"is not a folder-per-class tree of images")
    return out


def load(found: Found) -> Split:
    kind = REGISTRY[found.kind]
    return kind.read(found.path, found.name)


from . import coop, fgvc, folder, imagenet  # noqa: E402,F401  (registers the built-in kinds)
from .sampling import few_shot  # noqa: E402,F401
