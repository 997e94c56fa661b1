"""End to end through the real CLI: real textile images, a real local Ray, a real MLflow store,
then `mlflow models serve` answering like `ca-flow predict`. Oracles are recomputed here from what
MLflow holds, never with the product's own selection functions."""

import base64
import json
import os
import shutil
import urllib.error
import urllib.request

import pandas as pd
import pytest
from conftest import copy_features
from procs import model_server
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from clip_adapter.datasets import few_shot, load, resolve
from mlflow import MlflowClient
from workflows.cli import app

runner = CliRunner()
SHOTS, SEEDS, ALPHAS = [1, 2], [1, 2], [0.2, 0.6]
PARAMS = {
    "dataset",
    "method",
    "shots",
    "seed",
    "alpha",
    "beta",
    "adapter",
    "backbone",
    "weights",
    "epochs",
    "lr",
    "batch_size",
    "views",
    "n_train",
    "n_val",
    "n_test",
    "train_per_class_min",
    "train_per_class_max",
}
TRIALS = 2 * len(SHOTS) * len(SEEDS) * len(ALPHAS) + 2 * len(SEEDS)  # CLIP-Adapter grid + zero-shot per seed


@pytest.fixture(scope="module")
def swept(tmp_path_factory, colour_root, ray_local, textile_features):
    """textile from the session's feature store, colours encoded here by the Ray Data pipeline."""
    work = tmp_path_factory.mktemp("work")
    copy_features(textile_features, work / "cache")
    data = work / "data"
    shutil.copytree(colour_root / "colours", data / "colours")
    # Corrupt an image that seed 1's 1-shot subset samples: the trial trains without it.
    split = load(resolve("colours", data)[0])
    corrupt = next(i for i in few_shot(split, 1, 1)[0] if i.label == 0)
    open(corrupt.path, "wb").write(b"\x89PNG truncated")
    old = os.getcwd()
    os.chdir(work)
    try:
        result = runner.invoke(
            app,
            [
                "sweep",
                "--datasets",
                "textile,colours",
                "--data-root",
                str(data),
                "--backbone",
                TINY,
                "--pretrained",
                "random",
                "--shots",
                ",".join(map(str, SHOTS)),
                "--seeds",
                ",".join(map(str, SEEDS)),
                "--alphas",
                ",".join(map(str, ALPHAS)),
                "--augment-views",
                "2",
                "--cache-dir",
                str(work / "cache"),
            ],
        )
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output + result.stderr
    uri = f"sqlite:///{work / 'mlflow.db'}"
    return dict(
        work=work,
        data=data,
        result=result,
        uri=uri,
        client=MlflowClient(uri),
        corrupt=corrupt.path,
        corrupt_label=split.classnames[0],
    )


def runs_of(swept):
    client = swept["client"]
    exp = client.get_experiment_by_name("ca-flow")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (
        exp,
        [r for r in runs if "mlflow.parentRunId" not in r.data.tags],
        [r for r in runs if "mlflow.parentRunId" in r.data.tags],
    )


def test_unreadable_sampled_train_image_is_reported_and_left_out(swept):
    out = " ".join(swept["result"].output.split())
    assert f"skipping unreadable image {swept['corrupt']}: cannot decode image" in out
    assert f"{TRIALS} trials, 0 failed" in out
    _, _, children = runs_of(swept)
    hit = [
        r
        for r in children
        if r.data.params["dataset"] == "colours"
        and r.data.params["shots"] == "1"
        and r.data.params["seed"] == "1"
    ]
    assert hit and all(
        r.data.params["n_train"] == "2" and r.data.params["train_per_class_min"] == "0" for r in hit
    )


def test_mlflow_has_parent_and_one_child_per_grid_point(swept):
    exp, parents, children = runs_of(swept)
    assert exp.artifact_location == str(swept["work"] / "mlartifacts")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == TRIALS
    assert sum(r.data.params["method"] == "zero-shot" for r in children) == 2 * len(SEEDS)
    points = set()
    for run in [r for r in children if r.data.params["method"] == "clip-adapter"]:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        assert PARAMS <= set(p) and p["weights"] == "random" and p["backbone"] == TINY
        assert {"val_acc", "test_acc", "zs_test_acc", "train_loss", "trial_seconds"} <= set(m)
        assert not {"n_train", "n_val", "n_test"} & set(m)  # counts are params, not metrics
        assert 0 < m["trial_seconds"] < (run.info.end_time - run.info.start_time) / 1000 + 1
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert (
            t["ca_flow.sweep_id"] == parent.data.tags["ca_flow.sweep_id"]
            and len(t["ca_flow.trial_key"]) == 16
        )
        assert t["ca_flow.random_weights"] == "true" and t["ca_flow.attempt"] == "1"
        epochs = int(p["epochs"])
        assert epochs == (50 if p["shots"] == "1" else 100)  # CoOp's schedule by shots
        history = swept["client"].get_metric_history(run.info.run_id, "train_loss")
        assert [h.step for h in history] == list(range(epochs))
        (inp,) = run.inputs.dataset_inputs  # the UI's Dataset column
        assert inp.dataset.name == p["dataset"] and len(inp.dataset.digest) == 12
        files = {a.path for a in swept["client"].list_artifacts(run.info.run_id, "adapter")}
        assert files == {"adapter/adapter.safetensors", "adapter/adapter.json"}
        points.add((p["dataset"], int(p["shots"]), int(p["seed"]), float(p["alpha"])))
    assert points == {
        (d, k, s, a) for d in ("textile", "colours") for k in SHOTS for s in SEEDS for a in ALPHAS
    }
    # The parent: plain-string grid params that no child param shares, a summary, a description, the spec.
    pp = parent.data.params
    assert (
        pp["grid.shots"] == "1,2"
        and pp["grid.alphas"] == "0.2,0.6"
        and pp["grid.datasets"] == "textile,colours"
    )
    assert not set(pp) & set(children[0].data.params)
    best = max(
        (
            r
            for r in children
            if r.data.params["dataset"] == "colours" and r.data.params["method"] == "clip-adapter"
        ),
        key=lambda r: r.data.metrics["val_acc"],
    )
    assert parent.data.metrics["best_val_acc.colours.clip-adapter"] == best.data.metrics["val_acc"]
    assert "ca-flow sweep" in parent.data.tags["mlflow.note.content"]
    assert "sweep.toml" in {a.path for a in swept["client"].list_artifacts(parent.info.run_id)}


def test_results_parquet_and_summary_match_mlflow(swept):
    (path,) = (swept["work"] / "ca-flow-results").glob("*.parquet")
    frame = pd.read_parquet(path)
    _, _, children = runs_of(swept)
    by_id = {r.info.run_id: r for r in children}
    assert len(frame) == TRIALS and (frame["status"] == "FINISHED").all()
    for row in frame.itertuples():
        assert by_id[row.run_id].data.metrics["test_acc"] == pytest.approx(row.test_acc)
    # The table picks alpha on validation, per seed, and prints the test mean +- std over seeds.
    out = " ".join(swept["result"].output.replace("│", " ").split())
    for dataset, cells in expected_cells(frame[frame["method"] == "clip-adapter"]).items():
        assert f"{dataset} {' '.join(cells)}" in out, out


def oracle(frame):
    """Per (dataset, shots): mean and std over seeds of test_acc at the best val_acc, ties to lower alpha."""
    picked = (
        frame.sort_values(["val_acc", "alpha"], ascending=[False, True])
        .groupby(["dataset", "shots", "seed"])
        .head(1)
    )
    return picked.groupby(["dataset", "shots"])["test_acc"].agg(["mean", "std"]) * 100


def expected_cells(frame):
    stats = oracle(frame)
    return {
        d: [f"{stats.loc[(d, k), 'mean']:.2f} +- {stats.loc[(d, k), 'std']:.2f}" for k in SHOTS]
        for d in sorted(set(frame["dataset"]))
    }


def test_report_csv_is_numbers_recomputed_from_mlflow_and_figure_is_logged(swept):
    out_dir = swept["work"] / "report"
    result = runner.invoke(app, ["report", "--tracking-uri", swept["uri"], "--out", str(out_dir), "--paper"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "not comparable" in result.output  # a random tiny backbone is not RN50 + OpenAI
    _, parents, children = runs_of(swept)
    from_mlflow = pd.DataFrame(
        [
            dict(
                dataset=r.data.params["dataset"],
                method=r.data.params["method"],
                shots=int(r.data.params["shots"]),
                seed=int(r.data.params["seed"]),
                alpha=float(r.data.params["alpha"]) if "alpha" in r.data.params else 0.0,
                val_acc=r.data.metrics["val_acc"],
                test_acc=r.data.metrics["test_acc"],
            )
            for r in children
        ]
    )
    (sweep_dir,) = out_dir.iterdir()
    table = pd.read_csv(sweep_dir / "table.csv")
    assert list(table.columns) == [
        "method",
        "dataset",
        "shots",
        "mean",
        "std",
        "n_seeds",
        "protocol",
        "test_selected",
    ]
    assert table["mean"].dtype.kind == "f" and table["n_seeds"].dtype.kind == "i"
    assert set(table["protocol"]) == {"few-shot"} and not table["test_selected"].any()
    rows = table.set_index(["method", "dataset", "shots"])
    for (dataset, shots), row in oracle(from_mlflow[from_mlflow["method"] == "clip-adapter"]).iterrows():
        got = rows.loc[("clip-adapter", dataset, shots)]
        assert got["mean"] == pytest.approx(row["mean"], abs=1e-3) and got["std"] == pytest.approx(
            row["std"], abs=1e-3
        )
        assert got["n_seeds"] == len(SEEDS)
    zs = (
        from_mlflow[from_mlflow["method"] == "zero-shot"].groupby("dataset")["test_acc"].agg(["mean", "std"])
        * 100
    )
    for dataset, row in zs.iterrows():  # zero-shot fits nothing: the same figure in every shots column
        assert rows.loc[("zero-shot", dataset)]["mean"].tolist() == pytest.approx(
            [row["mean"]] * len(SHOTS), abs=1e-3
        )
    assert (sweep_dir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in swept["client"].list_artifacts(parents[0].info.run_id, "report")}
    assert logged == {"report/table.md", "report/table.csv", "report/figure.png"}


def test_textile_images_went_through(swept):
    textile = load(resolve("textile", swept["data"])[0])
    _, _, children = runs_of(swept)
    run = next(r for r in children if r.data.params.get("dataset") == "textile")
    assert run.data.params["n_test"] == str(len(textile.test)) == "600"


@pytest.fixture(scope="module")
def promoted(swept):
    result = runner.invoke(app, ["promote", "--tracking-uri", swept["uri"]])
    assert result.exit_code == 0, result.output + result.stderr
    return swept


def best_by_rule(children, dataset):
    """The documented rule, written out here: best val_acc; ties more shots, lower seed, lower alpha."""
    mine = [
        r
        for r in children
        if r.data.params["dataset"] == dataset and r.data.params["method"] == "clip-adapter"
    ]
    return sorted(
        mine,
        key=lambda r: (
            -r.data.metrics["val_acc"],
            -int(r.data.params["shots"]),
            int(r.data.params["seed"]),
            float(r.data.params["alpha"]),
        ),
    )[0]


def test_promote_registers_the_val_best_with_evidence_once(promoted):
    client, uri = promoted["client"], promoted["uri"]
    _, _, children = runs_of(promoted)
    for dataset in ("textile", "colours"):
        version = client.get_model_version_by_alias(f"clip-adapter-{dataset}", "champion")
        best = best_by_rule(children, dataset)
        assert version.run_id == best.info.run_id
        assert float(version.tags["val_acc"]) == best.data.metrics["val_acc"]
        assert {"sweep_id", "test_acc", "shots", "seed", "alpha", "weights_id"} <= set(version.tags)
    again = runner.invoke(app, ["promote", "--tracking-uri", uri, "--datasets", "colours"])
    assert again.exit_code == 0 and "already v1" in again.output
    assert len(client.search_model_versions("name = 'clip-adapter-colours'")) == 1
    dry = runner.invoke(app, ["promote", "--tracking-uri", uri, "--dry-run", "--alias", "staging"])
    assert dry.exit_code == 0 and "would register" in dry.output
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="staging"):
        client.get_model_version_by_alias("clip-adapter-colours", "staging")


def _independent_top(promoted, image, k=2):
    """The champion's adapter files through CLIP-Adapter's formula, written out (tests/oracles.py)."""
    from oracles import clip_adapter_top

    version = promoted["client"].get_model_version_by_alias("clip-adapter-colours", "champion")
    folder = promoted["client"].download_artifacts(
        version.run_id, "adapter", str(promoted["work"] / "oracle")
    )
    return clip_adapter_top(folder, image, k)


def test_predict_equals_the_adapter_files_read_directly(promoted):
    image = str(next((promoted["data"] / "colours" / "green").glob("*_01*.png")))
    result = runner.invoke(
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
    assert result.exit_code == 0, result.output + result.stderr
    (got,) = json.loads(result.stdout)["predictions"]
    want = _independent_top(promoted, image)
    assert [t["label"] for t in got["top"]] == [c for c, _ in want]
    assert [t["score"] for t in got["top"]] == pytest.approx([s for _, s in want], abs=1e-5)


@pytest.mark.slow
def test_served_model_takes_base64_and_top_k_and_refuses_paths(promoted, tmp_path):
    images = [
        str(next((promoted["data"] / "colours" / c).glob("*_01*.png"))) for c in ("red", "green", "blue")
    ]
    env = dict(os.environ, MLFLOW_TRACKING_URI=promoted["uri"])
    with model_server("models:/clip-adapter-colours@champion", tmp_path, env, tmp_path) as server:
        url = f"{server}/invocations"
        records = [{"image": base64.b64encode(open(i, "rb").read()).decode()} for i in images]
        served = _post(url, {"dataframe_records": records, "params": {"top_k": 2}})["predictions"]
        assert all(len(p["top_labels"]) == 2 for p in served)
        for image, p in zip(images, served):
            want = _independent_top(promoted, image)
            assert p["top_labels"] == [c for c, _ in want]
        # A path is not opened (no allow-listed root when served); the cause is the message's last
        # line, after what MLflow's scoring server puts before it ("Failed to predict data ...").
        code, body = _post(url, {"dataframe_records": [{"image": "/etc/passwd"}]}, expect_error=True)
        assert code == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert (
            body["message"]
            .splitlines()[-1]
            .startswith("Error: row 0: 'image' is not base64-encoded image bytes")
        )
        code, body = _post(
            url,
            {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]},
            expect_error=True,
        )
        assert code == 400 and body["message"].splitlines()[-1].startswith(
            "Error: row 0: cannot decode image"
        )
        code, body = _post(url, {"dataframe_records": records[:1], "params": {"top_k": 0}}, expect_error=True)
        assert (
            code == 400 and body["message"].splitlines()[-1] == "Error: top_k must be an integer >= 1, got 0"
        )


def _post(url, document, expect_error=False):
    req = urllib.request.Request(url, json.dumps(document).encode(), {"Content-Type": "application/json"})
    try:
        body = json.loads(urllib.request.urlopen(req, timeout=60).read())
    except urllib.error.HTTPError as exc:
        if not expect_error:
            raise
        return exc.code, json.loads(exc.read())
    assert not expect_error, body
    return body
