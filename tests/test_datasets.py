import json
from pathlib import Path

import pytest
from conftest import make_colour_tree
from PIL import Image

from clip_adapter.datasets import DatasetError, discover, load, resolve

EUROSAT = [
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
]
FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def make_eurosat(root, per_split=(4, 2, 3)):
    """A miniature of CoOp's EuroSAT layout: eurosat/2750/<Folder>/*.jpg + split_zhou_EuroSAT.json."""
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(zip(FOLDERS, EUROSAT)):
        (root / "eurosat" / "2750" / folder).mkdir(parents=True, exist_ok=True)
        i = 0
        for part, n in zip(split, per_split):
            for _ in range(n):
                rel = f"{folder}/{folder}_{i}.jpg"
                Image.new("RGB", (64, 64), (label * 20, 100, 50)).save(root / "eurosat" / "2750" / rel)
                split[part].append([rel, label, name])
                i += 1
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def test_eurosat_coop_layout_is_read_as_is(tmp_path):
    make_eurosat(tmp_path)
    (found,) = resolve("eurosat", tmp_path)
    split = load(found)
    assert split.classnames == EUROSAT
    assert (len(split.train), len(split.val), len(split.test)) == (40, 20, 30)
    assert split.train[0].path == str(tmp_path / "eurosat/2750/AnnualCrop/AnnualCrop_0.jpg")
    assert split.template == "a centered satellite photo of {}."


def test_eurosat_missing_split_file_is_named(tmp_path):
    make_eurosat(tmp_path)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json is missing"):
        load(resolve("eurosat", tmp_path)[0])


def test_imagefolder_gets_a_seeded_50_20_30_split(tmp_path):
    make_colour_tree(tmp_path / "colours", per_class=10)
    (found,) = resolve("colours", tmp_path)
    assert found.kind == "imagefolder"
    a, b = load(found), load(found)
    assert (len(a.train), len(a.val), len(a.test)) == (15, 6, 9)
    assert a.train == b.train and a.classnames == ["blue", "green", "red"]
    assert not {i.path for i in a.train} & {i.path for i in a.test}


def test_imagefolder_uses_a_coop_split_json_when_present(tmp_path):
    tree = make_colour_tree(tmp_path / "colours", per_class=3)
    entries = [[f"red/red_00{i}.png", 0, "red"] for i in range(3)] + [
        [f"blue/blue_00{i}.png", 1, "blue"] for i in range(3)
    ]
    (tree / "split_mine.json").write_text(
        json.dumps({"train": entries[:4], "val": entries[4:5], "test": entries[5:]})
    )
    split = load(resolve("colours", tmp_path)[0])
    assert split.classnames == ["red", "blue"] and len(split.train) == 4


def test_textile_ships_2000_real_images():
    split = load(resolve("textile", Path("/nonexistent"))[0])  # textile ships with the package: no data root
    assert split.num_images == 2000
    assert split.classnames == ["nominal", "local defect", "global defect"]


def test_discover_and_errors(tmp_path):
    make_eurosat(tmp_path)
    make_colour_tree(tmp_path / "colours", per_class=2)
    assert {f.name for f in discover(tmp_path)[0]} == {"textile", "eurosat", "colours"}
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        resolve("nope", tmp_path)
    with pytest.raises(DatasetError, match="data root .* does not exist"):
        resolve("all", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"dataset eurosat not found at .*eurosat/2750"):
        resolve("eurosat", empty)
