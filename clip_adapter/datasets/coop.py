"""CoOp's dataset layouts: a split JSON of [relative_path, label, classname] per split."""

from __future__ import annotations

import json

from . import DatasetError, DatasetKind, DatasetSplits, Item, register
from .fs import Location


def read_split_json(
    split_file: Location, image_dir: Location
) -> tuple[list[Item], list[Item], list[Item], list[str]]:
    """Read a CoOp split file as it is, so few-shot subsets match CoOp's for the same seed."""
    if not split_file.is_file():
        raise DatasetError(
            f"split file {split_file} is missing; download it from the CoOp "
            f"DATASETS.md instructions and put it there"
        )
    try:
        raw = json.loads(split_file.read_text())
        splits = {s: [(str(p), int(y), str(c)) for p, y, c in raw[s]] for s in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"split file {split_file} is not a CoOp split "
            f"({{train, val, test}}: [[path, label, classname], ...]): {exc}"
        ) from exc
    names: dict[int, str] = {}
    for entries in splits.values():
        for _, label, classname in entries:
            names.setdefault(label, classname)
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"split file {split_file} has labels {sorted(names)[:5]}...; expected 0..C-1")
    items = {s: [Item(str(image_dir / p), y) for p, y, _ in e] for s, e in splits.items()}
    return items["train"], items["val"], items["test"], [names[i] for i in range(len(names))]


def prompt_names(names: list[str]) -> list[str]:
    # CoOp, CLIP-Adapter and Tip-Adapter all swap "_" for " " when they build prompts; the split
    # files keep folder-style names (Food101 "apple_pie", UCF101 "Apply_Eye_Makeup").
    return [n.replace("_", " ") for n in names]


def coop_kind(
    name: str, folder: str, image_dir: str, split_file: str, template: str | list[str]
) -> DatasetKind:
    def read(path: Location, dataset_name: str) -> DatasetSplits:
        images = path / image_dir  # image_dir "" is the dataset folder itself (StanfordCars)
        if not images.is_dir():
            raise DatasetError(f"{images} is missing; expected {layout}")
        train, val, test, names = read_split_json(path / split_file, images)
        return DatasetSplits(dataset_name, name, path, prompt_names(names), template, train, val, test)

    under = f"{folder}/{image_dir}" if image_dir else folder
    layout = f"{under}/... and {folder}/{split_file} (CoOp layout)"
    return register(DatasetKind(name=name, folder=folder, layout=layout, read=read))


# The 9 CoOp datasets that ship a split_zhou_*.json: folder, images under, split file, prompt.
coop_kind(
    "caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."
)
coop_kind(
    "oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."
)
coop_kind("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}.")
coop_kind(
    "oxford_flowers",
    "oxford_flowers",
    "jpg",
    "split_zhou_OxfordFlowers.json",
    "a photo of a {}, a type of flower.",
)
coop_kind("food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.")
coop_kind("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}.")
coop_kind("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.")
coop_kind("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.")
coop_kind("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.")
