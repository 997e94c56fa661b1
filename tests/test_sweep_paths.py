"""Paths users take through one store: flags that must reach training, local weights from sweep to
serving, a sweep where some trials fail, and a second sweep over the same data.

Oracles come from the library, run here on the same features, never from the sweep's own code."""

from __future__ import annotations

import base64
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_colour_tree
from procs import model_server
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from clip_adapter.datasets import few_shot, load, resolve
from clip_adapter.features import FeatureStore
from clip_adapter.methods import FewShot, make
from mlflow import MlflowClient
from workflows.cli import app

runner = CliRunner()
FLAGS = [
    "--methods",
    "clip-adapter",
    "--adapter",
    "visual,text,both",
    "--alphas",
    "0.3",
    "--betas",
    "0.1,0.7",
    "--shots",
    "2",
    "--seeds",
    "1",
    "--epochs",
    "3",
    "--lr",
    "0.01",
    "--batch-size",
    "4",
    "--augment-views",
    "3",
    "--cpus-per-trial",
    "0.5",
    "--max-retries",
    "0",
]
VARIANTS = {
    ("visual", 0.3, 0.1),
    ("text", 0.3, 0.1),
    ("text", 0.3, 0.7),
    ("both", 0.3, 0.1),
    ("both", 0.3, 0.7),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, colour_root, tiny, ray_local):
    work = tmp_path_factory.mktemp("paths")
    data = work / "data"
    shutil.copytree(colour_root / "colours", data / "colours")
    make_colour_tree(data / "dead", per_class=4, seed=3)
    for image in (data / "dead").rglob("*.png"):  # every image unreadable: its trials can only fail
        image.write_bytes(b"\x89PNG not really")
    from safetensors.torch import save_file

    weights = work / "tiny.safetensors"  # a local weights file, as users bring their own
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(weights))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    common = [
        "--data-root",
        str(data),
        "--backbone",
        TINY,
        "--pretrained",
        str(weights),
        "--tracking-uri",
        uri,
        "--cache-dir",
        str(work / "cache"),
        "--results-dir",
        str(work / "results"),
        "--storage-path",
        str(work / "ray_results"),
    ]
    first = runner.invoke(app, ["sweep", "--datasets", "colours,dead", *FLAGS, *common])
    second = runner.invoke(app, ["sweep", "--datasets", "colours", *FLAGS, *common])
    return dict(
        work=work,
        data=data,
        uri=uri,
        weights=weights,
        first=first,
        second=second,
        client=MlflowClient(uri),
        common=common,
    )


def sweep_runs(client, sweep_id):
    exp = client.get_experiment_by_name("ca-flow")
    runs = client.search_runs([exp.experiment_id], f"tags.`ca_flow.sweep_id` = '{sweep_id}'", max_results=500)
    return (
        [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0],
        [r for r in runs if "mlflow.parentRunId" in r.data.tags],
    )


def sweep_id_of(result):
    return next(
        line.split()[1].rstrip(":") for line in result.output.splitlines() if line.startswith("sweep ")
    )


def test_a_sweep_with_failed_trials_says_so_everywhere(store):
    first = store["first"]
    assert first.exit_code == 1, first.output
    lines = first.stderr.strip().splitlines()
    assert lines[0].startswith("error: 5 of 10 trials failed; resume with: ca-flow resume ")
    assert len(lines) == 6 and all(
        ": dead: no readable train image for 2 shots, seed 1" in x for x in lines[1:]
    )
    assert "Traceback" not in first.output + first.stderr
    sid = sweep_id_of(first)
    parent, children = sweep_runs(store["client"], sid)
    assert parent.info.status == "FAILED"
    dead = [r for r in children if r.data.tags["ca_flow.dataset"] == "dead"]
    assert len(dead) == 5 and {r.info.status for r in dead} == {"FAILED"}
    assert all(
        "no readable train image" in r.data.tags["ca_flow.error"] and "val_acc" not in r.data.metrics
        for r in dead
    )
    frame = pd.read_parquet(store["work"] / "results" / f"{sid}.parquet")
    assert (frame.loc[frame["dataset"] == "dead", "status"] == "FAILED").all()
    assert frame.loc[frame["dataset"] == "dead", "val_acc"].isna().all()
    assert (frame.loc[frame["dataset"] == "colours", "status"] == "FINISHED").all()
    # report and promote take what finished and skip what failed
    report = runner.invoke(
        app,
        [
            "report",
            "--sweep",
            sid,
            "--tracking-uri",
            store["uri"],
            "--json",
            "--out",
            str(store["work"] / "report"),
        ],
    )
    assert report.exit_code == 0, report.output + report.stderr
    assert {r["dataset"] for r in json.loads(report.stdout)["rows"]} == {"colours"}


def test_flags_reach_training(store):
    """Each run's loss curve is what the library gives for its flags on the same features."""
    sid = sweep_id_of(store["second"])
    _, children = sweep_runs(store["client"], sid)
    assert {
        (r.data.params["adapter"], float(r.data.params["alpha"]), float(r.data.params["beta"]))
        for r in children
    } == VARIANTS
    split = load(resolve("colours", store["data"])[0])
    train, val = few_shot(split, 2, 1)
    fs = FeatureStore(store["work"] / "cache", TINY, str(store["weights"]))

    def no_encoding(requests):
        raise AssertionError(f"the features should be in the store already: {len(requests)} to encode")

    tr = fs.images("colours", split.root, train, 3, True, no_encoding)  # 3 views: --augment-views reached it
    va = fs.images("colours", split.root, val, 1, False, no_encoding)
    text, scale = fs.text(split.classnames, split.template)
    data = FewShot(tr.features, tr.labels, va.features[:, 0], va.labels, text, scale)
    torch.set_num_threads(1)
    for run in children:
        p = run.data.params
        assert (p["epochs"], p["lr"], p["batch_size"], p["views"]) == ("3", "0.01", "4", "3")
        method = make(
            "clip-adapter",
            text,
            scale,
            variant=p["adapter"],
            alpha=float(p["alpha"]),
            beta=float(p["beta"]),
            epochs=3,
            lr=0.01,
            batch_size=4,
        )
        want = method.fit(data, 1).losses
        got = [m.value for m in store["client"].get_metric_history(run.info.run_id, "train_loss")]
        assert len(got) == 3, run.info.run_name  # --epochs 3: one loss per epoch
        np.testing.assert_allclose(
            got, want, rtol=1e-5, err_msg=run.info.run_name
        )  # consistency with the library


def test_cpus_per_trial_lets_trials_share_the_cpus(store):
    """--cpus-per-trial 0.5 on 2 CPUs: trials ran side by side (their runs overlap in time)."""
    _, children = sweep_runs(store["client"], sweep_id_of(store["second"]))
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans


def test_a_second_sweep_over_the_same_data_encodes_nothing(store):
    assert store["second"].exit_code == 0, store["second"].output + store["second"].stderr
    out = " ".join(store["second"].output.split())
    assert "features colours: 0 images encoded, the rest from the feature store" in out, out


def test_report_defaults_to_the_latest_sweep_and_takes_sweep_ids(store):
    first, second = sweep_id_of(store["first"]), sweep_id_of(store["second"])
    latest = runner.invoke(
        app, ["report", "--tracking-uri", store["uri"], "--json", "--out", str(store["work"] / "r")]
    )
    assert json.loads(latest.stdout)["sweep_id"] == second
    older = runner.invoke(
        app,
        [
            "report",
            "--sweep",
            first,
            "--tracking-uri",
            store["uri"],
            "--json",
            "--out",
            str(store["work"] / "r"),
        ],
    )
    assert json.loads(older.stdout)["sweep_id"] == first


@pytest.fixture(scope="module")
def promoted(store):
    result = runner.invoke(app, ["promote", "--tracking-uri", store["uri"], "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return dict(store, promotions=json.loads(result.stdout)["promotions"])


def test_promote_skips_the_dataset_whose_trials_failed(promoted):
    assert [p["dataset"] for p in promoted["promotions"]] == ["colours"]


def _oracle(promoted, image):
    """The champion's files through CLIP-Adapter's formula, written out (tests/oracles.py)."""
    from oracles import clip_adapter_top

    version = promoted["client"].get_model_version_by_alias("clip-adapter-colours", "champion")
    assert version.tags["weights"] == str(promoted["weights"])
    folder = promoted["client"].download_artifacts(
        version.run_id, "adapter", str(promoted["work"] / "oracle")
    )
    return clip_adapter_top(folder, image, 2)


@pytest.mark.slow
def test_local_weights_through_promote_predict_and_serve(promoted, tmp_path):
    image = str(next((promoted["data"] / "colours" / "blue").glob("*.png")))
    want = _oracle(promoted, image)
    predicted = runner.invoke(
        app,
        [
            "predict",
            "--dataset",
            "colours",
            "--tracking-uri",
            promoted["uri"],
            "--top-k",
            "2",
            "--json",
            image,
        ],
    )
    assert predicted.exit_code == 0, predicted.output + predicted.stderr
    (got,) = json.loads(predicted.stdout)["predictions"]
    assert [(t["label"], round(t["score"], 4)) for t in got["top"]] == [(c, round(s, 4)) for c, s in want]
    env = dict(os.environ, MLFLOW_TRACKING_URI=promoted["uri"])
    with model_server("models:/clip-adapter-colours@champion", tmp_path, env, tmp_path) as server:
        import urllib.request

        body = json.dumps(
            {
                "dataframe_records": [{"image": base64.b64encode(open(image, "rb").read()).decode()}],
                "params": {"top_k": 2},
            }
        ).encode()
        req = urllib.request.Request(f"{server}/invocations", body, {"Content-Type": "application/json"})
        (served,) = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
    assert served["top_labels"] == [c for c, _ in want]
    assert served["top_scores"] == pytest.approx([s for _, s in want], abs=1e-5)
