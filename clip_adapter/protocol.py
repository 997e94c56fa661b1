"""Two selection protocols: ca-flow's leak-free `few-shot` and the released code's recipe, `released`.

few-shot: every choice (a ratio, an epoch, C) is made on min(K, 4) val images per class.
released: what the released code does, per method and dataset: choices on the dataset's whole val
split, and on test where that code selects on test (such a run is tagged selection_split=test and is
never a champion). Plain data, no torch: the grid plans with it before anything heavy loads.
"""

from __future__ import annotations

PROTOCOLS = ("few-shot", "released")

# Tip-Adapter d0e2d6f, configs/<dataset>.yaml lines 17-31: search_scale [beta, alpha], init_alpha,
# train_epoch (search_step [200, 20], init_beta 1 and augment_epoch 10 in every config).
TIP_CONFIGS = {
    "caltech101": ((12, 5), 3.0, 20),
    "dtd": ((13, 13), 2.0, 20),
    "eurosat": ((12, 10), 2.0, 100),
    "fgvc_aircraft": ((30, 30), 5.0, 20),
    "food101": ((10, 10), 1.17, 20),
    "imagenet": ((7, 3), 1.17, 20),
    "oxford_flowers": ((50, 50), 10.0, 20),
    "oxford_pets": ((7, 3), 1.17, 20),
    "stanford_cars": ((20, 10), 3.0, 20),
    "sun397": ((12, 10), 1.17, 20),
    "ucf101": ((7, 3), 3.0, 20),
}
# A dataset of a user's own (no released config): the ImageNet/OxfordPets config.
TIP_DEFAULT = ((7, 3), 1.17, 20)
# CLIP-Adapter's released trainer fixes the residual ratio and reports its last epoch.
CLIP_ADAPTER_ALPHA = 0.2
# CoOp ff61507 COOP.md: ImageNet runs the *_ep50.yaml config at every shot count.
IMAGENET_EPOCHS = 50
# Tip-Adapter main.py:74-78 (its cache loader too) and ICLR24 main_few_shots.py:24-29 crop train images
# with RandomResizedCrop(224, scale=(0.5, 1)) + flip; CoOp's recipe (every other method) from 0.08.
RELEASED_CROP_SCALE = 0.5
RELEASED_CROPS = frozenset({"tip-adapter", "tip-adapter-f", "gda"})
# Datasets whose released code searches on test (Tip-Adapter's main_imagenet.py; GDA's
# main_few_shots.py:137 sets val_features = test_features for ImageNet).
SEARCH_ON_TEST = frozenset({"imagenet"})
# Methods that make a choice on a split (zero-shot and the fixed-alpha CLIP-Adapter make none inside).
SEARCHING = frozenset({"tip-adapter", "tip-adapter-f", "gda", "linear-probe"})


def hparams(protocol: str, method: str, dataset: str) -> dict:
    """The method's hparams the released recipe sets for `dataset` (none under few-shot)."""
    if protocol != "released":
        return {}
    if method in ("tip-adapter", "tip-adapter-f"):
        scale, alpha, epochs = TIP_CONFIGS.get(dataset, TIP_DEFAULT)
        out = dict(search_scale=list(scale), alpha=alpha, beta=1.0)
        return {**out, "epochs": epochs} if method == "tip-adapter-f" else out
    return {}


def selection(protocol: str, method: str, dataset: str) -> dict:
    """Where a trial makes its choices: `val` ('few-shot' = min(K, 4) per class, 'whole' = the split)
    and, for Tip-Adapter-F, `epoch` (the split its epoch is chosen on)."""
    if protocol != "released":
        return dict(val="few-shot", epoch="val")
    if dataset in SEARCH_ON_TEST and method in SEARCHING - {"linear-probe"}:
        val = "test"
    else:  # ImageNet has no val split: what does not search on test keeps the few-shot val from train
        val = "few-shot" if dataset == "imagenet" else "whole"
    return dict(
        val=val,
        crops=RELEASED_CROP_SCALE if method in RELEASED_CROPS else None,
        # Tip-Adapter main.py:111-126 keeps the epoch with the best test accuracy, everywhere.
        epoch="test" if method == "tip-adapter-f" else "val",
    )


def selection_split(where: dict) -> str:
    """'test' where any choice of a trial is made on test (`where` as `selection` gives it), else 'val'."""
    return "test" if "test" in (where.get("val"), where.get("epoch")) else "val"


def epochs_for_shots(shots: int) -> int:
    """CoOp's schedule: 50 epochs at 1 shot, 100 at 2-4, 200 at 8 and more."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200
