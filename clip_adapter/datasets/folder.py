"""Folder-per-class trees: `imagefolder` for users' own data, `textile` from conformal-clip-data."""

from __future__ import annotations

import random

from . import DEFAULT_TEMPLATE, IMAGE_SUFFIXES, DatasetError, DatasetKind, DatasetSplits, Item, register
from .coop import read_split_json
from .fs import Location

SPLIT_SEED = 0  # fixed: the 50/20/30 split must not move with the few-shot seed


def _images(folder: Location) -> list[Location]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_tree_problem(folder: Location) -> str | None:
    """None if `folder` is a folder-per-class tree of images, else what is wrong with it."""
    classes = [d for d in folder.iterdir() if d.is_dir()]
    if len(classes) < 2:
        return f"needs at least 2 class folders, found {len(classes)}"
    empty = [d.name for d in classes if not _images(d)]
    if empty:
        return f"class folder{'s' if len(empty) > 1 else ''} without images: {', '.join(sorted(empty)[:5])}"
    return None


def seeded_split(
    by_class: list[list[Location]], fractions=(0.5, 0.2)
) -> tuple[list[Item], list[Item], list[Item]]:
    rng = random.Random(SPLIT_SEED)
    train, val, test = [], [], []
    for label, paths in enumerate(by_class):
        paths = list(paths)
        rng.shuffle(paths)
        n_train = max(1, round(fractions[0] * len(paths)))
        n_val = round(fractions[1] * len(paths))
        train += [Item(str(p), label) for p in paths[:n_train]]
        val += [Item(str(p), label) for p in paths[n_train : n_train + n_val]]
        test += [Item(str(p), label) for p in paths[n_train + n_val :]]
    return train, val, test


def read_class_tree(
    root: Location,
    name: str,
    kind: str,
    classnames: list[str] | None = None,
    folders: list[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> DatasetSplits:
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; expected one sub-folder of images per class")
    splits = root.glob("split*.json")
    if splits:  # a CoOp-format split beside the class folders wins over our own split
        train, val, test, names = read_split_json(splits[0], root)
        return DatasetSplits(name, kind, root, names, template, train, val, test)
    folders = folders or sorted(d.name for d in root.iterdir() if d.is_dir())
    by_class = [_images(root / f) for f in folders]
    empty = [f for f, imgs in zip(folders, by_class) if not imgs]
    if len(folders) < 2 or empty:
        raise DatasetError(
            f"{root} needs at least 2 class folders, each with images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); empty: {', '.join(empty) or 'none'}"
        )
    names = classnames or [f.replace("_", " ") for f in folders]
    train, val, test = seeded_split(by_class)
    return DatasetSplits(name, kind, root, names, template, train, val, test)


register(
    DatasetKind(
        name="imagefolder",
        folder="",
        layout="DATA_ROOT/NAME/<class>/<image> (optionally with a CoOp split_*.json beside the classes)",
        read=lambda path, name: read_class_tree(path, name, "imagefolder"),
    )
)


def _textile_root(_data_root: Location) -> Location:
    try:
        import conformal_clip_data
    except ImportError:  # reported as "not found" with the layout below
        return Location("conformal-clip-data-not-installed")
    return Location(conformal_clip_data.textile_simulated_root())


register(
    DatasetKind(
        name="textile",
        folder="",
        layout="the conformal-clip-data package (pip install conformal-clip-data)",
        locate=_textile_root,
        read=lambda path, name: read_class_tree(
            path,
            name,
            "textile",
            folders=["nominal", "local", "global"],
            classnames=["nominal", "local defect", "global defect"],
            template="a close-up photo of fabric with {}.",
        ),
    )
)
