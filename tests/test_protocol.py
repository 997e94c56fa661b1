"""The two protocols: each released value written out here with the file and line it comes from, and
where each protocol makes its choices (val, the whole val split, test) down to what a trial logs."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from test_tip_adapter_fidelity import released_search_hp

from clip_adapter.backbone import TINY
from clip_adapter.methods import FewShot, make
from workflows.grid import build_spec, grid
from workflows.point import TrialPoint
from workflows.report import select_on_val, side_by_side, summary
from workflows.trial import DatasetFeatures, select_on, train_trial

# Tip-Adapter d0e2d6f configs/<dataset>.yaml: search_scale (line 17), init_alpha (line 21), train_epoch
# (line 31); search_step [200, 20] (line 18) and init_beta 1 (line 20) in all eleven.
RELEASED_TIP = {
    "caltech101": ([12, 5], 3, 20),  # configs/caltech101.yaml:17,21,31
    "dtd": ([13, 13], 2, 20),  # configs/dtd.yaml:17,21,31
    "eurosat": ([12, 10], 2, 100),  # configs/eurosat.yaml:17,21,31
    "fgvc_aircraft": ([30, 30], 5, 20),  # configs/fgvc.yaml:17,21,31
    "food101": ([10, 10], 1.17, 20),  # configs/food101.yaml:17,21,31
    "imagenet": ([7, 3], 1.17, 20),  # configs/imagenet.yaml:17,21,31
    "oxford_flowers": ([50, 50], 10, 20),  # configs/oxford_flowers.yaml:17,21,31
    "oxford_pets": ([7, 3], 1.17, 20),  # configs/oxford_pets.yaml:17,21,31
    "stanford_cars": ([20, 10], 3, 20),  # configs/stanford_cars.yaml:17,21,31
    "sun397": ([12, 10], 1.17, 20),  # configs/sun397.yaml:17,21,31
    "ucf101": ([7, 3], 3, 20),  # configs/ucf101.yaml:17,21,31
}


def spec(**kw):
    base = dict(
        datasets="all",
        backbone=TINY,
        pretrained="random",
        shots=[1, 2, 4, 8, 16],
        seeds=[1],
        methods=["clip-adapter", "zero-shot", "tip-adapter", "tip-adapter-f", "gda", "linear-probe"],
        alphas=[0.2, 0.6],
    )
    return build_spec(None, {**base, **kw})


# -- the released recipe, per method and dataset ----------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(RELEASED_TIP))
def test_released_tip_adapter_configs_per_dataset(dataset):
    scale, init_alpha, epochs = RELEASED_TIP[dataset]
    trials = grid(spec(protocol=["released"]), [dataset], weights_id="w")
    tip = [t for t in trials if t.method == "tip-adapter"]
    tip_f = [t for t in trials if t.method == "tip-adapter-f"]
    assert len(tip) == len(tip_f) == 5
    assert all(t.hparams == dict(search_scale=scale, alpha=init_alpha, beta=1) for t in tip)
    assert all(t.hparams == dict(search_scale=scale, alpha=init_alpha, beta=1, epochs=epochs) for t in tip_f)


def test_released_epochs_imagenet_50_at_every_shots_else_coops_schedule():
    trials = grid(spec(protocol=["released", "few-shot"]), ["imagenet", "dtd"], weights_id="w")
    epochs = {
        (t.dataset, t.protocol, t.shots): t.hparams["epochs"] for t in trials if t.method == "clip-adapter"
    }
    # CoOp ff61507 COOP.md: "*_ep50.yaml for all settings" on ImageNet; else 50/100/100/200/200 by shots
    # (configs/trainers/CoOp/rn50_ep50.yaml, rn50_ep100.yaml, rn50.yaml).
    assert [epochs[("imagenet", "released", k)] for k in (1, 2, 4, 8, 16)] == [50, 50, 50, 50, 50]
    for dataset, proto in (("imagenet", "few-shot"), ("dtd", "released"), ("dtd", "few-shot")):
        assert [epochs[(dataset, proto, k)] for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_where_each_method_chooses_under_each_protocol():
    trials = grid(spec(protocol=["few-shot", "released"]), ["imagenet", "dtd"], weights_id="w")
    where = {(t.dataset, t.method, t.protocol): t.select for t in trials}
    for d in ("imagenet", "dtd"):
        for m in ("clip-adapter", "zero-shot", "tip-adapter", "tip-adapter-f", "gda", "linear-probe"):
            assert where[(d, m, "few-shot")] is None  # few-shot points carry nothing new
    # Tip-Adapter main.py:47 search_hp on val_features (the whole val split); main_imagenet.py on test;
    # main.py:111-126 Tip-Adapter-F's epoch on test everywhere; ICLR24 main_few_shots.py:137 val = test
    # on ImageNet. CLIP-Adapter chooses nothing; ImageNet has no val split.
    # Crops from 0.5: Tip-Adapter main.py:74-78 and ICLR24 main_few_shots.py:24-29; the rest CoOp's 0.08.
    assert where[("dtd", "tip-adapter", "released")] == {"val": "whole", "crops": 0.5, "epoch": "val"}
    assert where[("dtd", "gda", "released")] == {"val": "whole", "crops": 0.5, "epoch": "val"}
    assert where[("dtd", "tip-adapter-f", "released")] == {"val": "whole", "crops": 0.5, "epoch": "test"}
    assert where[("imagenet", "tip-adapter", "released")] == {"val": "test", "crops": 0.5, "epoch": "val"}
    assert where[("imagenet", "gda", "released")] == {"val": "test", "crops": 0.5, "epoch": "val"}
    assert where[("imagenet", "tip-adapter-f", "released")] == {"val": "test", "crops": 0.5, "epoch": "test"}
    assert where[("imagenet", "clip-adapter", "released")] == {
        "val": "few-shot",
        "crops": None,
        "epoch": "val",
    }
    assert where[("dtd", "clip-adapter", "released")] == {"val": "whole", "crops": None, "epoch": "val"}
    assert where[("dtd", "linear-probe", "released")] == {"val": "whole", "crops": None, "epoch": "val"}


def test_few_shot_keys_are_the_keys_from_before_protocols():
    s = spec(datasets="dtd", methods=["tip-adapter"], shots=[1])
    (t,) = grid(s, ["dtd"], weights_id="w")
    point = dict(
        dataset="dtd",
        method="tip-adapter",
        shots=1,
        seed=1,
        hparams={},
        backbone=TINY,
        weights="random",
        weights_id="w",
        views=10,
    )
    assert t.key == hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]
    both = grid(
        spec(datasets="dtd", methods=["tip-adapter"], shots=[1], protocol=["few-shot", "released"]),
        ["dtd"],
        weights_id="w",
    )
    assert [b.key for b in both if b.protocol == "few-shot"] == [t.key] and len({b.key for b in both}) == 2


def test_protocol_is_a_sweep_file_key_and_checked(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('protocol = ["few-shot", "released"]\n')
    assert build_spec(path, {}).protocol == ["few-shot", "released"]
    assert build_spec(path, {"protocol": "released"}).protocol == ["released"]  # the flag wins
    assert build_spec(None, {}).protocol == ["few-shot"]
    from workflows.grid import SweepError

    with pytest.raises(SweepError, match="unknown protocol 'leaky'"):
        build_spec(None, {"protocol": "leaky"})


def test_tip_adapter_searches_the_released_scale_of_its_dataset():
    rng = np.random.default_rng(4)
    c, d = 3, 8
    train = rng.normal(size=(6, 2, d)).astype(np.float32)
    labels = np.repeat(np.arange(c), 2)
    val = rng.normal(size=(30, d)).astype(np.float32)
    yval = rng.integers(c, size=30)
    text = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(c, d)).astype(np.float32)), dim=-1)
    data = FewShot(train, labels, val, yval, text.numpy(), 100.0)
    method = make("tip-adapter", data.text, 100.0, search_scale=[50, 50], alpha=10.0)
    chosen = method.fit(data, seed=1).chosen
    f = torch.nn.functional.normalize(torch.from_numpy(val), dim=-1)
    keys = method.keys.T
    values = torch.nn.functional.one_hot(torch.from_numpy(labels), c).float()
    want = released_search_hp(f, keys, values, torch.from_numpy(yval), text.T, search_scale=(50, 50))
    assert (chosen["alpha"], chosen["beta"]) == pytest.approx(want)


# -- a trial under each protocol ----------------------------------------------------------------------


def features(n_val_whole=12):
    """A dataset: 2 classes, 4 train images x 2 views, 2 few-shot val rows inside a whole val split."""
    rng = np.random.default_rng(0)
    d = 6
    centres = rng.normal(size=(2, d)) * 3
    val_labels = np.arange(n_val_whole) % 2
    test_labels = np.arange(20) % 2
    text = centres / np.linalg.norm(centres, axis=-1, keepdims=True)
    return DatasetFeatures(
        "dtd",
        ["a", "b"],
        "{}",
        text.astype(np.float32),
        10.0,
        (centres[np.arange(4) % 2][:, None] + rng.normal(size=(4, 2, d))).astype(np.float32),
        np.arange(4) % 2,
        (centres[val_labels] + rng.normal(size=(n_val_whole, d))).astype(np.float32),
        val_labels,
        (centres[test_labels] + rng.normal(size=(20, d))).astype(np.float32),
        test_labels,
        0.5,
        {(2, 1): (np.arange(4), np.array([0, 1]))},
        {},
        whole_val=np.arange(n_val_whole),
        train_released=(centres[np.arange(4) % 2][:, None] + 0.5 * rng.normal(size=(4, 2, d))).astype(
            np.float32
        ),
    )


@pytest.mark.parametrize(
    "select, n_val, epoch_test, n_select, split",
    [
        (None, 2, False, 2, "val"),  # few-shot
        ({"val": "whole", "crops": 0.5, "epoch": "val"}, 12, False, 12, "val"),  # released, Tip-Adapter / GDA
        ({"val": "test", "crops": 0.5, "epoch": "val"}, 20, False, 20, "test"),  # released, ImageNet
        ({"val": "whole", "crops": 0.5, "epoch": "test"}, 12, True, 32, "test"),  # released, Tip-Adapter-F
        ({"val": "test", "crops": 0.5, "epoch": "test"}, 20, True, 20, "test"),  # released, Tip-F ImageNet
    ],
)
def test_a_trial_chooses_where_its_protocol_says_and_logs_it(select, n_val, epoch_test, n_select, split):
    data = features()
    t = TrialPoint(
        dataset="dtd",
        method="tip-adapter-f",
        shots=2,
        seed=1,
        hparams={"epochs": 2},
        backbone=TINY,
        weights="random",
        weights_id="w",
        views=2,
    )
    if select:
        t = replace(t, protocol="released", select=select)
    few_shot, n = select_on(t, data, *data.subset_rows[(2, 1)])
    assert len(few_shot.val_labels) == n_val and n == n_select
    assert (few_shot.epoch_val is not None) == epoch_test
    if epoch_test:
        np.testing.assert_array_equal(few_shot.epoch_val[1], data.test_labels)
    # released: the views cropped from 0.5; few-shot: CoOp's
    np.testing.assert_array_equal(few_shot.train, (data.train_released if select else data.train)[:4])
    _, _, metrics, params = train_trial(t, data)
    assert (params["protocol"], params["selection_split"], params["n_select"]) == (
        "released" if select else "few-shot",
        split,
        n_select,
    )


def test_released_tip_adapter_f_reports_the_max_of_its_two_test_figures():
    data = features()
    t = TrialPoint(
        dataset="dtd",
        method="tip-adapter-f",
        shots=2,
        seed=1,
        hparams={"epochs": 3},
        backbone=TINY,
        weights="random",
        weights_id="w",
        views=2,
        protocol="released",
        select={"val": "whole", "crops": 0.5, "epoch": "test"},
    )
    method, _, metrics, params = train_trial(t, data)
    with torch.no_grad():
        searched = float((method(torch.from_numpy(data.test)).argmax(-1).numpy() == data.test_labels).mean())
    # Tip-Adapter main.py:141 prints max(best_acc, acc): the best test epoch at the initial alpha, beta
    # (main.py:121) against the test accuracy after the val search.
    assert metrics["test_acc"] == max(searched, params["chosen_epoch_acc"])
    # A text classifier that swaps the classes and a val split labelled the wrong way round: the search
    # keeps zero-shot (all wrong on test), the epoch chosen on test at alpha 10 is right: the max is it.
    data.text = data.text[::-1].copy()
    data.val_labels = 1 - data.val_labels
    t = replace(t, hparams={"epochs": 3, "alpha": 10.0})
    method, _, metrics, params = train_trial(t, data)
    with torch.no_grad():
        searched = float((method(torch.from_numpy(data.test)).argmax(-1).numpy() == data.test_labels).mean())
    assert searched < params["chosen_epoch_acc"] == metrics["test_acc"]


def test_whole_val_missing_is_an_error_naming_it():
    data = features()
    data.whole_val = np.array([], dtype=np.int64)
    t = TrialPoint(
        dataset="dtd",
        method="gda",
        shots=2,
        seed=1,
        protocol="released",
        select={"val": "whole", "epoch": "val"},
    )
    with pytest.raises(RuntimeError, match="whole val split"):
        select_on(t, data, *data.subset_rows[(2, 1)])


# -- the report: the released CLIP-Adapter figure, the side-by-side table, test marks ----------------


def row(method, protocol, alpha, val, test, split="val", dataset="dtd", shots=16, seed=1):
    return dict(
        dataset=dataset,
        method=method,
        shots=shots,
        seed=seed,
        alpha=alpha,
        beta=0.2,
        adapter="visual",
        val_acc=val,
        test_acc=test,
        zs_test_acc=0.4,
        status="FINISHED",
        protocol=protocol,
        selection_split=split,
    )


def frame(rows):
    return pd.DataFrame([{**r, "run_id": f"r{i}"} for i, r in enumerate(rows)])


def test_released_clip_adapter_is_the_alpha_02_trial_whatever_val_says():
    f = frame(
        [
            row("clip-adapter", "released", 0.2, 0.1, 0.50),
            row("clip-adapter", "released", 0.6, 0.9, 0.70),
            row("clip-adapter", "few-shot", 0.2, 0.1, 0.50),
            row("clip-adapter", "few-shot", 0.6, 0.9, 0.70),
        ]
    )
    chosen = select_on_val(f.drop(columns=["test_acc"])).set_index("protocol")["alpha"].to_dict()
    assert chosen == {"released": 0.2, "few-shot": 0.6}
    # Without an alpha 0.2 trial the released protocol falls back to val, as few-shot does.
    f = frame(
        [row("clip-adapter", "released", 0.4, 0.1, 0.5), row("clip-adapter", "released", 0.6, 0.9, 0.7)]
    )
    assert select_on_val(f.drop(columns=["test_acc"]))["alpha"].tolist() == [0.6]


def test_side_by_side_paper_released_few_shot_and_gaps():
    f = frame(
        [
            row("tip-adapter-f", "released", float("nan"), 0.8, 0.60, split="test"),
            row("tip-adapter-f", "few-shot", float("nan"), 0.7, 0.55),
            row("gda", "released", float("nan"), 0.8, 0.70, dataset="eurosat"),
            row("gda", "few-shot", float("nan"), 0.8, 0.64, dataset="eurosat"),
        ]
    )
    t = side_by_side(f, comparable=True).set_index(["method", "dataset", "shots"])
    tip = t.loc[("tip-adapter-f", "dtd", 16)]
    assert (tip["released"], tip["few_shot"], bool(tip["test_selected"])) == (
        pytest.approx(60.0),
        pytest.approx(55.0),
        True,
    )
    assert tip["protocol_gap"] == pytest.approx(-5.0) and np.isnan(
        tip["paper"]
    )  # no per-dataset Tip-F figure
    gda = t.loc[("gda", "eurosat", 16)]
    # mrflogs/ICLR24 exp.log: EuroSAT, "ours", 16 shots 86.12
    assert (gda["paper"], gda["released_gap"], gda["protocol_gap"]) == (
        pytest.approx(86.12),
        pytest.approx(70.0 - 86.12),
        pytest.approx(-6.0),
    )
    assert not bool(gda["test_selected"])
    assert np.isnan(
        side_by_side(f, comparable=False).set_index(["method", "dataset"]).loc[("gda", "eurosat"), "paper"]
    )
    s = summary(f).set_index(["method", "protocol"])
    assert bool(s.loc[("tip-adapter-f", "released"), "test_selected"])


# -- promotion: never a run chosen on test ------------------------------------------------------------


def test_choose_skips_runs_chosen_on_test(tmp_path):
    from mlflow import MlflowClient
    from workflows import promote
    from workflows.names import DATASET, METHOD, PARENT

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    ids = {}
    for name, split, val in (("oracle", "test", 0.99), ("fair", "val", 0.60), ("old", None, 0.50)):
        run = client.create_run(exp, tags={PARENT: parent, DATASET: "dtd", METHOD: "tip-adapter"}).info.run_id
        params = dict(method="tip-adapter", shots="16", seed="1", dataset="dtd")
        if split:  # a run from before protocols logs no selection_split: chosen on the few-shot val
            params["selection_split"] = split
        for k, v in params.items():
            client.log_param(run, k, v)
        client.log_metric(run, "val_acc", val)
        client.log_metric(run, "test_acc", val)
        client.set_terminated(run)
        ids[name] = run
    chosen = promote.choose(client, "e", None, ["tip-adapter"])
    assert chosen["dtd"].info.run_id == ids["fair"]  # 0.99 on val, but its choices were made on test
