"""Encoding on Ray: Ray Data tasks read, decode and crop images; encoder actors make features.

    requests (path or URI, views) --map_batches(crop_batch), CPU tasks--> blocks of uint8 crops
                                  --Encoder actors (GPUs when trials ask)--> features
                                  --the driver--> new shards in the feature store

The driver holds paths, references to the blocks queued on encoders and one output batch at a time;
Ray Data's streaming executor, not the driver's memory, bounds what is in flight. Only what the feature
store lacks is ever requested.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from clip_adapter import encoding
from clip_adapter.datasets import DatasetSplits, few_shot
from clip_adapter.features import Features, FeatureStore, Group, Request
from clip_adapter.protocol import RELEASED_CROP_SCALE, RELEASED_CROPS

from .trial import DatasetFeatures

CROP_BATCH = 64  # images per CPU task call: fewer, larger tasks keep Ray's per-task cost small
CROP_MEMORY = 512 * 2**20
IN_FLIGHT = 2  # blocks queued per encoder: one encoding, the next already there


def crop_batch(batch: dict, preprocess_cfg: dict) -> dict:
    """The Ray Data stage of clip_adapter.encoding.crop_batch: workers rebuild the preprocessing from
    plain data, and a test may hold each task at the barrier."""
    from clip_adapter.backbone import Preprocess

    from .barrier import barrier

    barrier("encode", f"crop-{os.getpid()}")
    return encoding.crop_batch(batch, Preprocess(preprocess_cfg))


class Encoder:
    """One loaded backbone per actor; blocks of crops in, features out (rows that failed upstream pass through).

    A Ray actor of its own, made from plain strings: Ray Data's actor pool hands its actors object-store
    references, for which Ray logs an error-level line about restarts at every start (ray #57733).
    """

    def __init__(self, backbone: str, weights: str, device: str, threads: int):
        import torch

        from clip_adapter.backbone import load_backbone

        torch.set_num_threads(threads)
        self.backbone = load_backbone(backbone, weights, device)  # cuda without CUDA fails: no fallback

    def encode(self, block) -> dict:
        from ray.data.block import BlockAccessor

        return encoding.encode_crops(self.backbone, BlockAccessor.for_block(block).to_batch_format("numpy"))


def wait(ref, check_stop: Callable[[], None]):
    """ray.get that `check_stop` can end (by raising) while it waits."""
    import ray

    while not ray.wait([ref], timeout=0.25)[0]:
        check_stop()
    return ray.get(ref)


def pipeline(
    requests: list[Request],
    backbone: str,
    weights: str,
    preprocess_cfg: dict,
    gpus: float,
    encoders: int,
    threads: int,
    check_stop: Callable[[], None] = lambda: None,
) -> Iterator[dict]:
    """Rows (request, image_id, view, feature, error) for `requests`: crops streamed from Ray Data, each
    block of them encoded by one of `encoders` actors, at most IN_FLIGHT blocks queued on each.
    `check_stop` is called between blocks and while waiting: it ends the encoding by raising."""
    import ray

    items = [
        dict(request=i, path=r.path, views=r.views, augment=r.augment, scale=r.scale)
        for i, r in enumerate(requests)
    ]
    requested = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // CROP_BATCH, 200)))
    # Crop tasks declare the memory a batch of decoded images needs: Ray starts no more of them at once
    # than the node's memory holds. Half a CPU each: an encoder waiting on crops (a small model, a GPU)
    # leaves its CPU idle, and two croppers fill it (benchmarks/encode.py sets the pipeline's rate
    # beside the in-process loop's).
    crops = requested.map_batches(
        crop_batch,
        fn_kwargs=dict(preprocess_cfg=preprocess_cfg),
        batch_size=CROP_BATCH,
        batch_format="numpy",
        num_cpus=0.5,
        memory=CROP_MEMORY,
    )
    # Restarted on a lost worker or node, its calls retried, as Ray Data's own pool would be.
    actor = ray.remote(Encoder).options(
        num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=-1, max_task_retries=-1
    )
    pool = [actor.remote(backbone, weights, "cuda" if gpus else "cpu", threads) for _ in range(encoders)]
    free, running = pool * IN_FLIGHT, {}

    def done(wait: bool) -> Iterator[dict]:
        """Rows of the encoded blocks: at least one block's when `wait`, else only what is ready."""
        ready, _ = ray.wait(
            list(running), num_returns=1 if wait else len(running), timeout=0.25 if wait else 0
        )
        while wait and not ready:
            check_stop()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
        for ref in ready:
            free.append(running.pop(ref))
            yield from encoding.rows(ray.get(ref))

    try:
        for bundle in crops.iter_internal_ref_bundles():
            for block in bundle.block_refs:
                check_stop()
                while not free:
                    yield from done(wait=True)
                encoder = free.pop(0)
                running[encoder.encode.remote(block)] = encoder
            yield from done(wait=False)
        while running:
            yield from done(wait=True)
    finally:
        for encoder in pool:
            ray.kill(encoder)


def model_and_text(
    backbone: str,
    weights: str,
    gpus: float,
    prompts: list[tuple[list[str], object]],
    check_stop: Callable[[], None],
):
    """(model facts, text classifiers) from one Ray task: the driver never loads a backbone."""
    import ray

    @ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)
    def load(prompts):
        from clip_adapter.backbone import load_backbone
        from clip_adapter.encoding import text_classifier

        b = load_backbone(backbone, weights, "cuda" if gpus else "cpu")
        info = dict(preprocess=b.preprocess_cfg, width=b.width, logit_scale=b.logit_scale)
        return info, [text_classifier(b, names, template) for names, template in prompts]

    return wait(load.remote(prompts), check_stop)


def split_digest(split: DatasetSplits) -> str:
    h = hashlib.sha1()
    for part in (split.train, split.val, split.test):
        for item in part:
            h.update(f"{split.root.relative(item.path)}\t{item.label}\n".encode())
        h.update(b"|")
    return h.hexdigest()[:12]


@dataclass
class FewShotItems:
    """The images a sweep encodes for one dataset, each once."""

    subsets: dict[tuple[int, int], tuple[list, list]]  # (shots, seed) -> few_shot's (train, val) items
    train: list  # the train images of every subset: encoded in augmented views
    val: list  # the val images of every subset, and under the released protocol the whole val split
    # (its searches run there): centre-cropped, as the test split is


def few_shot_items(split: DatasetSplits, spec) -> FewShotItems:
    subsets = {(k, seed): few_shot(split, k, seed) for k in spec.shots for seed in spec.seeds}
    train = (i for tr, _ in subsets.values() for i in tr)
    val = [
        *(i for _, va in subsets.values() for i in va),
        *(split.val if "released" in spec.protocol else []),
    ]
    return FewShotItems(subsets, list(dict.fromkeys(train)), list(dict.fromkeys(val)))


def dataset_features(
    splits: list[DatasetSplits],
    spec,
    store: FeatureStore,
    gpus: float,
    encoders: int,
    threads: int,
    on_bad,
    check_stop: Callable[[], None] = lambda: None,
) -> dict[str, DatasetFeatures]:
    """Each dataset's features for the sweep's few-shot subsets, encoding only what the store lacks."""
    items = {split.name: few_shot_items(split, spec) for split in splits}
    texts = text_classifiers(splits, spec, store, gpus, check_stop)

    def encode(requests):
        info = store.model_info()
        if info is None:
            info = model_and_text(spec.backbone, spec.pretrained, gpus, [], check_stop)[0]
            store.put_model_info(info)
        return pipeline(
            requests, spec.backbone, spec.pretrained, info["preprocess"], gpus, encoders, threads, check_stop
        )

    # Under the released protocol Tip-Adapter, Tip-Adapter-F and GDA train on views cropped from 0.5.
    tip_crops = "released" in spec.protocol and bool(set(spec.methods) & RELEASED_CROPS)
    groups = []
    for split in splits:
        groups.append(Group(split.name, split.root, items[split.name].train, spec.augment_views, True))
        groups.append(Group(split.name, split.root, items[split.name].val + split.test, 1, False))
        if tip_crops:
            groups.append(
                Group(
                    split.name,
                    split.root,
                    items[split.name].train,
                    spec.augment_views,
                    True,
                    RELEASED_CROP_SCALE,
                )
            )
    feats = store.images_of(groups, encode, on_bad)
    per = 3 if tip_crops else 2
    out = {}
    for i, split in enumerate(splits):
        train, held, *tip = feats[per * i : per * (i + 1)]
        text, scale = texts[split.name]
        out[split.name] = assemble(
            split, items[split.name], text, scale, train, held, tip[0] if tip else None
        )
    return out


def text_classifiers(splits: list[DatasetSplits], spec, store: FeatureStore, gpus: float, check_stop) -> dict:
    """Each dataset's (text classifier, logit scale): from the store, or made in one Ray task and stored."""
    texts = {split.name: store.text(split.classnames, split.template) for split in splits}
    lacking = [split for split in splits if texts[split.name] is None]
    if lacking:
        prompts = [(split.classnames, split.template) for split in lacking]
        info, weights = model_and_text(spec.backbone, spec.pretrained, gpus, prompts, check_stop)
        store.put_model_info(info)
        for split, weight in zip(lacking, weights):
            store.put_text(split.classnames, split.template, weight, info["logit_scale"])
            texts[split.name] = (weight, info["logit_scale"])
    return texts


def assemble(
    split: DatasetSplits,
    items: FewShotItems,
    text,
    scale: float,
    train: Features,
    held: Features,
    tip: Features | None,
) -> DatasetFeatures:
    """One dataset's DatasetFeatures from its encoded groups: train views, held-out (val, then test)
    centre crops, and train views cropped from 0.5 where the released protocol needs them."""
    ok = train.ok & tip.ok if tip is not None else train.ok  # a row is used only with both its views
    train_row = {item: r for r, item in enumerate(items.train) if ok[r]}
    val_row = {item: r for r, item in enumerate(items.val) if held.ok[r]}
    subset_rows = {
        key: (
            np.array([train_row[i] for i in tr if i in train_row], dtype=np.int64),
            np.array([val_row[i] for i in va if i in val_row], dtype=np.int64),
        )
        for key, (tr, va) in items.subsets.items()
    }
    n_val = len(items.val)
    test_ok = held.ok[n_val:]
    test, test_labels = held.features[n_val:, 0][test_ok], held.labels[n_val:][test_ok]
    source = dict(
        name=split.name,
        digest=split_digest(split),
        source=str(split.root),
        source_type="local" if split.root.is_local else split.root.prefix.rstrip(":/"),
    )
    return DatasetFeatures(
        split.name,
        split.classnames,
        split.template,
        text,
        scale,
        train.features,
        train.labels,
        held.features[:n_val, 0],
        held.labels[:n_val],
        test,
        test_labels,
        encoding.zero_shot_accuracy(test, test_labels, text, scale),
        subset_rows,
        source,
        whole_val=np.array([val_row[i] for i in split.val if i in val_row], dtype=np.int64),
        train_released=tip.features if tip is not None else None,
    )
