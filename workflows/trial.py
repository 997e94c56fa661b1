"""One trial: fit and evaluate one grid point on features already in memory, then log it to its run.

`train_trial` knows nothing of Ray or MLflow; `run_trial` is the Ray Tune trainable around it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from clip_adapter.protocol import selection_split

from . import barrier
from .errors import FinalError, NodeError, RecorderLost, TrialError, error_line
from .names import (
    ADAPTER,
    CHOSEN,
    N_SELECT,
    PROTOCOL,
    SELECTION_SPLIT,
    TEST_ACC,
    TRAIN_LOSS_FINAL,
    TRIAL_SECONDS,
    VAL_ACC,
    ZS_TEST_ACC,
)
from .point import Pack, TrialPoint


@dataclass
class DatasetFeatures:
    """A dataset's features plus, per (shots, seed), which rows form its few-shot split.

    One object per dataset goes into Ray's object store; only the trials of that dataset fetch it.
    """

    name: str
    classnames: list[str]
    template: str | list[str]
    text: np.ndarray
    logit_scale: float
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    zs_test_acc: float  # the same for every trial of the dataset: computed once, by the driver
    subset_rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # (shots, seed) -> rows of train, val
    source: dict  # name, digest of the split, source: the run's MLflow dataset input
    whole_val: np.ndarray | None = None  # rows of the whole val split (encoded for the released protocol)
    train_released: np.ndarray | None = None  # train's views cropped from 0.5 (released Tip-Adapter, GDA)


def train_trial(point: TrialPoint, data: DatasetFeatures, device: str = "cpu"):
    """Fit and evaluate one grid point on in-memory features: no Ray, no MLflow."""
    from clip_adapter.methods import make

    few_shot, n_select = _few_shot(point, data)
    method = make(point.method, data.text.copy(), data.logit_scale, **point.hparams).to(device)
    fitted = method.fit(few_shot, point.seed)  # sees train and val only: every choice is made on val
    return _evaluate(point, data, few_shot, n_select, method, fitted)


def train_pack(pack: Pack, data: DatasetFeatures, device: str = "cpu") -> list[tuple]:
    """Fit the CLIP-Adapter points of one pack (grid.packs) as one stacked model; per point what
    `train_trial` returns for it."""
    from clip_adapter.methods import make
    from clip_adapter.methods.clip_adapter import fit_packed

    if len(pack) == 1:
        return [train_trial(pack[0], data, device)]
    few_shot, n_select = _few_shot(pack[0], data)
    methods = [make(p.method, data.text.copy(), data.logit_scale, **p.hparams).to(device) for p in pack]
    fits = fit_packed(methods, few_shot, pack[0].seed)
    return [_evaluate(p, data, few_shot, n_select, m, f) for p, m, f in zip(pack, methods, fits)]


def _few_shot(point: TrialPoint, data: DatasetFeatures):
    """The point's FewShot (what its protocol selects on) and the number of images it selects on."""
    train_rows, val_rows = data.subset_rows[(point.shots, point.seed)]
    if len(train_rows) == 0:
        raise TrialError(
            f"{point.dataset}: no readable train image for {point.shots} shots, seed {point.seed}"
        )
    return select_on(point, data, train_rows, val_rows)


def _evaluate(point: TrialPoint, data: DatasetFeatures, few_shot, n_select: int, method, fitted):
    from clip_adapter import evaluate

    method.eval()
    metrics = {
        VAL_ACC: evaluate(method, few_shot.val, few_shot.val_labels),
        TEST_ACC: evaluate(method, data.test, data.test_labels),
        ZS_TEST_ACC: data.zs_test_acc,
    }
    if few_shot.epoch_val is not None and "epoch_acc" in fitted.chosen:
        # Tip-Adapter main.py:141 reports max(best test epoch's accuracy, test after the val search).
        metrics[TEST_ACC] = max(metrics[TEST_ACC], fitted.chosen["epoch_acc"])
    if fitted.losses:
        metrics[TRAIN_LOSS_FINAL] = fitted.losses[-1]
    per_class = np.bincount(few_shot.train_labels, minlength=len(data.classnames))
    params = point.params()
    params.update(
        {PROTOCOL: point.protocol, SELECTION_SPLIT: selection_split(point.selects), N_SELECT: n_select}
    )
    params.update(
        n_train=len(few_shot.train),
        n_val=len(few_shot.val_labels),
        n_test=len(data.test),
        train_per_class_min=int(per_class.min()),
        train_per_class_max=int(per_class.max()),
    )
    params.update({(ADAPTER if k == "variant" else k): v for k, v in method.config().items()})
    params.update({f"{CHOSEN}{k}": v for k, v in fitted.chosen.items()})
    return method.cpu(), fitted.losses, metrics, params


def select_on(point: TrialPoint, data: DatasetFeatures, train_rows, val_rows):
    """The FewShot a trial fits on, and how many images its choices are made on.

    few-shot: val is the min(K, 4) per class of the subset. released (point.select, from
    clip_adapter.protocol): val is the whole val split or test, and Tip-Adapter-F's epoch split test.
    """
    from clip_adapter.methods import FewShot

    where = point.selects
    if where["val"] == "test":
        val, val_labels = data.test, data.test_labels
    elif where["val"] == "whole":
        if data.whole_val is None or not len(data.whole_val):
            raise TrialError(
                f"{point.dataset}: the released protocol searches on the whole val split, "
                f"and this dataset has no readable val images"
            )
        val, val_labels = data.val[data.whole_val], data.val_labels[data.whole_val]
    else:
        val, val_labels = data.val[val_rows], data.val_labels[val_rows]
    epoch_val = (data.test, data.test_labels) if where["epoch"] == "test" else None
    train = data.train
    if where.get("crops"):
        if data.train_released is None:
            raise TrialError(
                f"{point.dataset}: the released protocol trains {point.method} on views cropped "
                f"from {where['crops']:g}, and they were not encoded"
            )
        train = data.train_released
    few_shot = FewShot(
        train[train_rows],
        data.train_labels[train_rows],
        val,
        val_labels,
        data.text,
        data.logit_scale,
        epoch_val,
    )
    chooses = point.method != "zero-shot"  # CLIP-Adapter's ratio is chosen across trials on val_acc
    n_select = (
        len(val_labels) + (len(data.test_labels) if epoch_val is not None and where["val"] != "test" else 0)
        if chooses
        else 0
    )
    return few_shot, n_select


# Reused trial actors keep the datasets they fetched: consecutive trials are mostly of one dataset.
_FETCHED: OrderedDict = OrderedDict()


def _fetch(ref) -> DatasetFeatures:
    import ray

    key = ref.hex()
    if key not in _FETCHED:
        _FETCHED[key] = ray.get(ref)
        while len(_FETCHED) > 2:
            _FETCHED.popitem(last=False)
    return _FETCHED[key]


ERROR_RESULT = (
    "ca_flow_error"  # the key of the result a trial that failed for good reports: its error's last line
)


def run_trial(config: dict, features: dict, recorder, threads: int, gpu: bool) -> None:
    """The Tune trainable: train one pack of grid points (one point without --pack), hand each
    point's record to the sweep's recorder, report.

    An error goes to the recorder (each point's run becomes FAILED with its last line). Ray's own
    failures and a node's go on to Tune, which retries the trial up to --max-retries times, in the same
    runs; an error of the trial itself (its data, its numbers) is final: another attempt would fail alike.
    """
    pack = config["trials"]
    if len(pack) > 1:  # a retried pack trains only the points whose records the recorder already holds
        done = set(hand_over(recorder.finished, [p.key for p in pack]))
        pack = [p for p in pack if p.key not in done]
        if not pack:
            from ray import tune

            return tune.report({"points": 0})
    # First of all, so each run starts with the trial (a worker lost during the imports below still
    # leaves its run RUNNING, attempt counted). One wall clock for the runs' start and end and for
    # trial_seconds, so a run's span always holds its trial_seconds.
    started = time.time()
    for point in pack:
        hand_over(recorder.start, point, math.floor(started * 1000))
    if barrier.holds("trial"):  # a test acts on the runs while the trial waits: the starts are written first
        hand_over(recorder.drain)
        for point in pack:
            barrier.barrier("trial", point.key, trial=point.name, dataset=point.dataset)
    import torch
    from ray import tune

    from clip_adapter.artifact import AdapterMeta, adapter_files

    torch.set_num_threads(threads)  # small matmuls: more threads than CPUs granted is much slower
    # Features come from the object store as read-only arrays; trials only read them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    try:
        if gpu and not torch.cuda.is_available():
            raise NodeError(
                "the trial was given a GPU but torch sees no CUDA device; fix the node's CUDA setup"
            )
        data = _fetch(features[pack[0].dataset])
        records = []
        for point, (method, losses, metrics, params) in zip(
            pack, train_pack(pack, data, "cuda" if gpu else "cpu")
        ):
            files = adapter_files(
                method,
                torch.from_numpy(data.text.copy()),
                AdapterMeta(
                    method=point.method,
                    config=method.config(),
                    backbone=point.backbone,
                    weights=point.weights,
                    weights_id=point.weights_id,
                    classnames=data.classnames,
                    template=data.template,
                    logit_scale=data.logit_scale,
                    dataset=point.dataset,
                ),
            )
            records.append((point, params, metrics, losses, files))
        seconds = (time.time() - started) / len(pack)  # a pack's points share its time
    except Exception as exc:
        for point in pack:
            hand_over(recorder.fail, point.key, error_line(exc))
        if _retryable(exc):
            raise
        tune.report({ERROR_RESULT: error_line(exc)})
        return
    for point, params, metrics, losses, files in records:
        metrics[TRIAL_SECONDS] = seconds
        hand_over(
            recorder.finish,
            point.key,
            params,
            metrics,
            losses,
            files,
            data.source,
            math.ceil(time.time() * 1000),
        )
    tune.report({"points": len(records)})


def hand_over(call, *record):
    """Give the recorder a record (or a question) and wait until it holds it, not until MLflow has it;
    returns its answer. A call still queued in this worker, or an argument this worker owns, would die
    with it when Tune ends it."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(call.remote(*record))
    except RayActorError as exc:  # Ray's own words name no actor: say which one, and what it means
        raise RecorderLost(
            f"the sweep's recorder died, so this trial cannot be recorded ({error_line(exc)})"
        ) from None


def _retryable(exc: Exception) -> bool:
    """Ray's failures (a lost object, a dead actor or node) and a node's are retried; the trial's own
    error (a FinalError, or anything else it raises) is final."""
    from ray.exceptions import RayError

    return isinstance(exc, (RayError, NodeError)) and not isinstance(exc, FinalError)
