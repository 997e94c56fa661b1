"""Datasets by name: where each lives under the data root, how its split is read, its prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CaFlowError
from ..settings import data_root as default_data_root  # noqa: F401  (the datasets' API)
from .fs import Location

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_TEMPLATE = "a photo of a {}."


class DatasetError(CaFlowError, ValueError):
    """A dataset cannot be found or parsed; the message names the fix."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute local path, or a URI (s3://...) that workers read
    label: int


@dataclass
class DatasetSplits:
    """A dataset: its class names, prompt, and its train, val and test splits of labelled images."""

    name: str
    kind: str
    root: Location
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
    folder: str  # under the data root; "" for data shipped in a package
    layout: str  # what we expect to find, for error messages
    read: Callable[[Location, str], DatasetSplits]  # (dataset folder, dataset name) -> DatasetSplits
    locate: Callable[[Location], Location] | None = None  # overrides data_root / folder


REGISTRY: dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
    REGISTRY[kind.name] = kind
    return kind


@dataclass(frozen=True)
class Found:
    name: str
    kind: str
    path: Location


@dataclass(frozen=True)
class Skipped:
    name: str
    path: Location
    reason: str


def _location(kind: DatasetKind, data_root: Location) -> Location:
    return kind.locate(data_root) if kind.locate else data_root / kind.folder


def check_root(data_root: str | Path | Location) -> Location:
    """The data root as a Location, or one line saying what is wrong with it."""
    root = Location(data_root)
    if root.is_file():
        raise DatasetError(
            f"data root {root} is a file, not a folder; pass the folder that holds the datasets",
            hint="data_root_as",
        )
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist; create it", hint="data_root_or")
    return root


def discover(data_root: str | Path | Location) -> tuple[list[Found], list[Skipped]]:
    """Every dataset present (registered layouts, plus any other folder-per-class tree), and the
    folders under the data root that are not datasets, with why."""
    from .folder import class_tree_problem  # late: folder.py registers kinds through this module

    data_root = Location(data_root)
    found = [
        Found(k.name, k.name, _location(k, data_root))
        for k in REGISTRY.values()
        if k.name != "imagefolder" and _location(k, data_root).exists()
    ]
    skipped = []
    claimed = {k.folder for k in REGISTRY.values() if k.folder}
    if data_root.is_dir():
        for sub in sorted(p for p in data_root.iterdir() if p.is_dir() and p.name not in claimed):
            problem = class_tree_problem(sub)
            if problem:
                skipped.append(Skipped(sub.name, sub, problem))
            else:
                found.append(Found(sub.name, "imagefolder", sub))
    return found, skipped


def resolve(names: str | list[str], data_root: str | Path | Location) -> list[Found]:
    """Turn `all` or a list of names into found datasets, or fail saying where we looked."""
    return resolve_all(names, data_root)[0]


def resolve_all(
    names: str | list[str], data_root: str | Path | Location
) -> tuple[list[Found], list[Skipped]]:
    """(found, skipped): with `all`, what is not a dataset is skipped with its reason; a dataset
    named explicitly must be there and valid."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise DatasetError("no dataset named", hint="datasets")
    needs_root = wanted == ["all"] or any(n not in REGISTRY or REGISTRY[n].locate is None for n in wanted)
    data_root = check_root(data_root) if needs_root else Location(data_root)
    listed, skipped = (
        discover(data_root)
        if needs_root
        else (
            [
                Found(n, n, _location(REGISTRY[n], data_root))
                for n in wanted
                if _location(REGISTRY[n], data_root).exists()
            ],
            [],
        )
    )
    found = {f.name: f for f in listed}
    if wanted == ["all"]:
        if not found:
            raise DatasetError(
                f"no dataset found under {data_root}"
                + (f" ({len(skipped)} folders are not datasets)" if skipped else "")
                + "; see `ca-flow datasets`"
            )
        return list(found.values()), skipped
    out = []
    for name in wanted:
        if name in found:
            out.append(found[name])
        elif any(s.name == name for s in skipped):
            problem = next(s for s in skipped if s.name == name)
            raise DatasetError(f"dataset {name} at {problem.path} is not usable: {problem.reason}")
        elif name in REGISTRY and name != "imagefolder":
            kind = REGISTRY[name]
            raise DatasetError(
                f"dataset {name} not found at {_location(kind, data_root)}; expected {kind.layout}"
            )
        else:
            known = ", ".join(sorted(set(REGISTRY) - {"imagefolder"}))
            raise DatasetError(
                f"unknown dataset {name!r}: not registered ({known}) and {data_root / name} "
                f"is not a folder-per-class tree of images"
            )
    return out, []


def load(found: Found) -> DatasetSplits:
    kind = REGISTRY[found.kind]
    return kind.read(found.path, found.name)


def load_splits(
    names: str | list[str], data_root: str | Path | Location
) -> tuple[list[DatasetSplits], list[Skipped]]:
    """Load what `names` asks for. With `all`, a dataset that cannot be read is skipped with its
    reason (the caller shows them); a dataset named explicitly that cannot be read is an error."""
    found, skipped = resolve_all(names, data_root)
    every = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)] == ["all"]
    splits = []
    for f in found:
        try:
            splits.append(load(f))
        except DatasetError as exc:
            if not every:
                raise
            skipped.append(Skipped(f.name, f.path, str(exc)))
    if not splits:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise DatasetError(
            f"no usable dataset under {Location(data_root)} ({reasons}); see `ca-flow datasets`"
        )
    return splits, skipped


from . import coop, fgvc, folder, imagenet  # noqa: E402,F401  (registers the built-in kinds)
from .sampling import few_shot  # noqa: E402,F401
