"""The 11 CoOp datasets: generated miniatures of each exact layout, parsed, found and sampled."""

import io
import json
import os
import random
import sys
import zlib
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from clip_adapter.datasets import REGISTRY, DatasetError, discover, few_shot, load, resolve
from clip_adapter.datasets.imagenet import IMAGENET_TEMPLATES
from clip_adapter.encoding import text_classifier

PER_SPLIT = {"train": 5, "val": 2, "test": 3}
_buf = io.BytesIO()
Image.new("RGB", (8, 8), (120, 60, 30)).save(_buf, "JPEG")
JPEG = _buf.getvalue()

# name: (folder, images under, split file, template, [(relative path pattern, name in the JSON)], prompt names)
JSON_KINDS = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        "a photo of a {}.",
        [
            ("accordion/image_{i:04d}.jpg", "accordion"),
            ("dollar_bill/image_{i:04d}.jpg", "dollar_bill"),
            ("Faces_easy/image_{i:04d}.jpg", "face"),
        ],
        ["accordion", "dollar bill", "face"],
    ),
    "oxford_pets": (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        "a photo of a {}, a type of pet.",
        [("Abyssinian_{i}.jpg", "abyssinian"), ("american_bulldog_{i}.jpg", "american_bulldog")],
        ["abyssinian", "american bulldog"],
    ),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        "a photo of a {}.",
        [
            ("cars_train/0{i:04d}.jpg", "2012 Tesla Model S"),
            ("cars_test/1{i:04d}.jpg", "AM General Hummer SUV 2000"),
        ],
        ["2012 Tesla Model S", "AM General Hummer SUV 2000"],
    ),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        "a photo of a {}, a type of flower.",
        [("image_0{i:04d}.jpg", "pink primrose"), ("image_1{i:04d}.jpg", "hard-leaved pocket orchid")],
        ["pink primrose", "hard-leaved pocket orchid"],
    ),
    "food101": (
        "food-101",
        "images",
        "split_zhou_Food101.json",
        "a photo of {}, a type of food.",
        [
            ("apple_pie/{i}.jpg", "apple_pie"),
            ("baby_back_ribs/{i}.jpg", "baby_back_ribs"),
            ("ramen/{i}.jpg", "ramen"),
        ],
        ["apple pie", "baby back ribs", "ramen"],
    ),
    "sun397": (
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        "a photo of a {}.",
        [("a/abbey/sun_{i}.jpg", "abbey"), ("a/apse/indoor/sun_{i}.jpg", "indoor apse")],
        ["abbey", "indoor apse"],
    ),
    "dtd": (
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        "{} texture.",
        [("banded/banded_{i:04d}.jpg", "banded"), ("zigzagged/zigzagged_{i:04d}.jpg", "zigzagged")],
        ["banded", "zigzagged"],
    ),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        "a centered satellite photo of {}.",
        [("AnnualCrop/AnnualCrop_{i}.jpg", "Annual Crop Land"), ("SeaLake/SeaLake_{i}.jpg", "Sea or Lake")],
        ["Annual Crop Land", "Sea or Lake"],
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        "a photo of a person doing {}.",
        [
            ("Apply_Eye_Makeup/v_ApplyEyeMakeup_g{i:02d}_c01.jpg", "Apply_Eye_Makeup"),
            ("Yo_Yo/v_YoYo_g{i:02d}_c01.jpg", "Yo_Yo"),
        ],
        ["Apply Eye Makeup", "Yo Yo"],
    ),
}
FGVC = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]  # spaces and slashes, as the real variants.txt
IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n02085620": "Chihuahua dog"}
ALL = [*JSON_KINDS, "fgvc_aircraft", "imagenet"]


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)


def make_json_kind(root, name):
    folder, image_dir, split_file, _, classes, _ = JSON_KINDS[name]
    split, i = {s: [] for s in PER_SPLIT}, 0
    for label, (pattern, classname) in enumerate(classes):
        for part, n in PER_SPLIT.items():
            for _ in range(n):
                rel = pattern.format(i=i)
                _image(root / folder / image_dir / rel)
                split[part].append([rel, label, classname])
                i += 1
    (root / folder / split_file).write_text(json.dumps(split))


def make_fgvc(root):
    """fgvc_aircraft/images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt."""
    d = root / "fgvc_aircraft"
    _image(d / "images" / "0000000.jpg")
    (d / "variants.txt").write_text("".join(f"{v}\n" for v in FGVC))
    i = 0
    for part, n in PER_SPLIT.items():
        lines = []
        for variant in reversed(FGVC):  # file order of the split lists must not set the labels
            for _ in range(n):
                lines.append(f"{1000000 + i:07d} {variant}\n")
                _image(d / "images" / f"{1000000 + i:07d}.jpg")
                i += 1
        (d / f"images_variant_{part}.txt").write_text("".join(lines))


def make_imagenet(root, train=12, val=3):
    """imagenet/images/{train,val}/<wnid>/*.JPEG and classnames.txt."""
    d = root / "imagenet"
    d.mkdir()
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET.items()))
    for wnid in reversed(IMAGENET):
        for i in range(train):
            _image(d / "images" / "train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(val):
            _image(d / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG")


def make(root, name):
    {"fgvc_aircraft": make_fgvc, "imagenet": make_imagenet}.get(name, lambda r: make_json_kind(r, name))(root)
    return root


def noise_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")


def make_distinct(root, names, per_split=None):
    """Miniatures whose images all differ (seeded noise), so a sweep encodes every one; `per_split`
    overrides the JSON layouts' images per split."""
    patch = pytest.MonkeyPatch()
    patch.setattr(sys.modules[__name__], "_image", noise_image)
    if per_split:
        patch.setattr(sys.modules[__name__], "PER_SPLIT", per_split)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in names:
            make(root, name)
    finally:
        patch.undo()
    return root


@pytest.fixture(scope="module")
def all_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop")
    for name in ALL:
        make(root, name)
    return root


def expected(name, root):
    """(folder, class names, template, (train, val, test) counts, first train image)."""
    if name == "fgvc_aircraft":
        return (
            "fgvc_aircraft",
            FGVC,
            "a photo of a {}, a type of aircraft.",
            (20, 8, 12),
            root / "fgvc_aircraft/images/1000000.jpg",
        )
    if name == "imagenet":
        return (
            "imagenet",
            list(IMAGENET.values()),
            IMAGENET_TEMPLATES,
            (36, 0, 9),
            root / "imagenet/images/train/n01440764/n01440764_0.JPEG",
        )
    folder, image_dir, _, template, classes, names = JSON_KINDS[name]
    c = len(classes)
    first = root / folder / image_dir / classes[0][0].format(i=0)
    return folder, names, template, (5 * c, 2 * c, 3 * c), first


@pytest.mark.parametrize("name", ALL)
def test_each_layout_is_found_parsed_and_sampled(all_root, name):
    folder, names, template, counts, first = expected(name, all_root)
    (found,) = resolve(name, all_root)
    assert (found.kind, found.path) == (name, all_root / folder)
    split = load(found)
    assert split.classnames == names and split.template == template
    assert (len(split.train), len(split.val), len(split.test)) == counts
    assert split.train[0].path == str(first)
    assert all(os.path.isfile(i.path) for i in split.train + split.val + split.test)
    n_train = Counter(i.label for i in split.train)
    n_val = Counter(i.label for i in split.val)
    for k in (1, 2, 4, 8):
        train, val = few_shot(split, k, seed=1)
        assert Counter(i.label for i in train) == {y: min(k, n) for y, n in n_train.items()}
        if split.val_from_train:  # ImageNet: val from the train images left after the K shots
            n_val = {y: n - min(k, n) for y, n in n_train.items()}
        assert Counter(i.label for i in val) == {y: min(k, 4, n) for y, n in n_val.items() if n}


def test_fgvc_labels_follow_variants_txt_and_image_ids(all_root):
    split = load(resolve("fgvc_aircraft", all_root)[0])
    first = split.train[0]  # the split list starts with the last variant
    assert (first.path, first.label) == (
        str(all_root / "fgvc_aircraft/images/1000000.jpg"),
        FGVC.index("F-16A/B"),
    )
    assert Counter(i.label for i in split.test) == {y: 3 for y in range(4)}


def test_imagenet_val_shots_come_from_unused_train_never_test(all_root):
    split = load(resolve("imagenet", all_root)[0])
    assert split.val == [] and split.val_from_train
    assert [i.label for i in split.test[:3]] == [0, 0, 0] and "/images/val/n01440764/" in split.test[0].path
    test = set(split.test)
    for k in (1, 4, 8, 16):
        for seed in (1, 2, 3):
            train, val = few_shot(split, k, seed)
            assert (train, val) == few_shot(split, k, seed)
            assert set(val) <= set(split.train) and not set(train) & set(val)
            assert not (set(train) | set(val)) & test
            assert Counter(i.label for i in train) == {y: min(k, 12) for y in range(3)}
            assert Counter(i.label for i in val) == ({y: min(k, 4) for y in range(3)} if k < 12 else {})
            random.seed(seed)  # the train shots are Dassl's: random.sample K per class on the seeded stream
            by_label = defaultdict(list)
            for item in split.train:
                by_label[item.label].append(item)
            assert train == [
                x for g in by_label.values() for x in (random.sample(g, k) if len(g) >= k else g)
            ]
    assert few_shot(split, 4, 1)[1] != few_shot(split, 4, 2)[1]


def test_imagenet_prompt_ensemble_reaches_the_text_classifier(all_root):
    split = load(resolve("imagenet", all_root)[0])
    seen = []

    class Stub:
        def encode_text(self, texts):
            seen.extend(texts)
            return torch.ones(len(texts), 4)

    assert text_classifier(Stub(), split.classnames, split.template).shape == (3, 4)
    assert len(split.template) == 7 and "itap of a Chihuahua dog." in seen


@pytest.mark.parametrize(
    "name,remove",
    [
        *[(n, spec[2]) for n, spec in JSON_KINDS.items()],
        ("fgvc_aircraft", "variants.txt"),
        ("fgvc_aircraft", "images_variant_val.txt"),
        ("imagenet", "classnames.txt"),
    ],
)
def test_a_missing_layout_file_is_named(tmp_path, name, remove):
    make(tmp_path, name)
    (tmp_path / REGISTRY[name].folder / remove).unlink()
    with pytest.raises(DatasetError, match=f"{remove} is missing; "):
        load(resolve(name, tmp_path)[0])


def test_other_layout_errors_name_the_file(tmp_path):
    make(tmp_path, "fgvc_aircraft")
    with (tmp_path / "fgvc_aircraft/images_variant_test.txt").open("a") as f:
        f.write("1234567 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_test.txt line 13: variant 'Boeing 999'"):
        load(resolve("fgvc_aircraft", tmp_path)[0])
    make(tmp_path, "imagenet")
    (tmp_path / "imagenet/classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(DatasetError, match=r"classnames.txt has no line for n01443537, n02085620"):
        load(resolve("imagenet", tmp_path)[0])
    with pytest.raises(
        DatasetError,
        match=r"dataset stanford_cars not found at .*stanford_cars; "
        r"expected stanford_cars/\.\.\. and stanford_cars/split_zhou",
    ):
        resolve("stanford_cars", tmp_path)


def test_all_and_discover_find_every_dataset_and_no_imagefolder(all_root):
    assert {REGISTRY[n].folder for n in ALL} == {
        "imagenet",
        "caltech-101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food-101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
    }
    found, _ = discover(all_root)
    assert {f.name for f in found} == {*ALL, "textile"}
    assert all(f.kind == f.name for f in found)  # no CoOp folder mistaken for an imagefolder
    assert {f.name for f in resolve("all", all_root)} == {*ALL, "textile"}
