"""ImageNet as CoOp reads it: images/{train,val}/<wnid>/ and classnames.txt; the official val is test.

The prompt is Tip-Adapter's 7-template ensemble (the text classifier averages a list): the
reference's ImageNet anchors (zero-shot RN50 60.32) come from Tip-Adapter's log, which used it;
the single "a photo of a {}." gives about two points less zero-shot.
"""

from __future__ import annotations

from . import DatasetError, DatasetKind, DatasetSplits, Item, register
from .coop import prompt_names
from .fs import Location

IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
LAYOUT = (
    "imagenet/images/train/<wnid>/*.JPEG, imagenet/images/val/<wnid>/*.JPEG and "
    'imagenet/classnames.txt ("n01440764 tench" per line; CoOp layout)'
)


def read_classnames(path: Location) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; expected {LAYOUT}")
    out = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            out[wnid] = name
    return out


def _class_folders(split_dir: Location) -> list[str]:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} is missing; expected {LAYOUT}")
    return sorted(e.name for e in split_dir.iterdir() if e.is_dir())


def _images(folder: Location, label: int) -> list[Item]:
    # CoOp lists with os.listdir unsorted (filesystem order); sorted keeps subsets stable across machines.
    return [
        Item(str(folder / n), label)
        for n in sorted(e.name for e in folder.iterdir() if e.is_file() and not e.name.startswith("."))
    ]


def read_imagenet(path: Location, dataset_name: str) -> DatasetSplits:
    classnames = read_classnames(path / "classnames.txt")
    train_dir, val_dir = path / "images" / "train", path / "images" / "val"
    folders = _class_folders(train_dir)  # label = index in the sorted listing, as CoOp
    if not folders:
        raise DatasetError(f"{train_dir} has no class folders; expected {LAYOUT}")
    unnamed = [f for f in folders if f not in classnames]
    if unnamed:
        raise DatasetError(
            f"{path / 'classnames.txt'} has no line for {', '.join(unnamed[:3])}; "
            f'expected one "<wnid> <class name>" line per folder of {train_dir}'
        )
    label_of = {f: i for i, f in enumerate(folders)}
    val_folders = _class_folders(val_dir)
    extra = [f for f in val_folders if f not in label_of]
    if extra:
        raise DatasetError(
            f"{val_dir / extra[0]} is not a class of {train_dir}; expected the same <wnid> folders"
        )
    train = [i for f in folders for i in _images(train_dir / f, label_of[f])]
    test = [i for f in val_folders for i in _images(val_dir / f, label_of[f])]
    # No held-out val exists: few_shot draws validation shots from train images not chosen for training.
    return DatasetSplits(
        dataset_name,
        "imagenet",
        path,
        prompt_names([classnames[f] for f in folders]),
        list(IMAGENET_TEMPLATES),
        train,
        [],
        test,
        val_from_train=True,
    )


register(DatasetKind(name="imagenet", folder="imagenet", layout=LAYOUT, read=read_imagenet))
