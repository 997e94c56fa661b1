"""FGVCAircraft as CoOp reads it: no split JSON, the dataset's own variant lists instead."""

from __future__ import annotations

from . import DatasetError, DatasetKind, DatasetSplits, Item, register
from .coop import prompt_names
from .fs import Location

LAYOUT = (
    "fgvc_aircraft/images/<id>.jpg, fgvc_aircraft/variants.txt and "
    "fgvc_aircraft/images_variant_{train,val,test}.txt (CoOp layout)"
)


def _lines(path: Location) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; expected {LAYOUT}")
    # Only blank lines are dropped (a trailing newline); CoOp keeps every other line as it is.
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_split(path: Location, images: Location, label_of: dict[str, int]) -> list[Item]:
    items = []
    for n, line in enumerate(_lines(path), 1):
        image_id, _, variant = line.partition(" ")  # "IMAGEID VARIANT NAME WITH SPACES"
        if variant not in label_of:
            raise DatasetError(f"{path} line {n}: variant {variant!r} is not in variants.txt")
        items.append(Item(str(images / f"{image_id}.jpg"), label_of[variant]))
    return items


def read_fgvc(path: Location, dataset_name: str) -> DatasetSplits:
    images = path / "images"
    if not images.is_dir():
        raise DatasetError(f"{images} is missing; expected {LAYOUT}")
    names = _lines(path / "variants.txt")  # label = line index, in file order, as CoOp's cname2lab
    label_of = {name: i for i, name in enumerate(names)}
    train, val, test = (
        _read_split(path / f"images_variant_{s}.txt", images, label_of) for s in ("train", "val", "test")
    )
    return DatasetSplits(
        dataset_name,
        "fgvc_aircraft",
        path,
        prompt_names(names),
        "a photo of a {}, a type of aircraft.",
        train,
        val,
        test,
    )


register(DatasetKind(name="fgvc_aircraft", folder="fgvc_aircraft", layout=LAYOUT, read=read_fgvc))
