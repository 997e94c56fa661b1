"""End to end through the real CLI: real textile images, a real local Ray, a real MLflow store,
then `mlflow models serve` answering like `ca-flow predict`."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from clip_adapter.datasets import load, resolve
from workflows.cli import app

runner = CliRunner()
SHOTS, SEEDS, ALPHAS = [1, 2], [1, 2], [0.2, 0.6]
PARAMS = {"dataset", "method", "shots", "seed", "alpha", "beta", "adapter", "backbone", "weights", "epochs", "lr",
          "batch_size", "views"}
TRIALS = 2 * len(SHOTS) * len(SEEDS) * len(ALPHAS) + 2 * len(SEEDS)  # CLIP-Adapter grid + zero-shot per seed


@pytest.fixture(scope="module")
def swept(tmp_path_factory, colour_root, ray_local):
    work = tmp_path_factory.mktemp("work")
    data = work / "data"
    shutil.copytree(colour_root / "colours", data / "colours")
    corrupt = data / "colours" / "red" / "red_000.png"  # sampled or not, it must be reported
    corrupt.write_bytes(b"\x89PNG truncated")
    old, env_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(work)
    try:
        result = runner.invoke(app, [
            "sweep", "--datasets", "textile,colours", "--data-root", str(data), "--backbone", TINY,
            "--pretrained", "random", "--shots", ",".join(map(str, SHOTS)), "--seeds", ",".join(map(str, SEEDS)),
            "--alphas", ",".join(map(str, ALPHAS)), "--augment-views", "2", "--cache-dir", str(work / "cache")])
    finally:
        os.chdir(old)
        if env_uri:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert result.exit_code == 0, result.output + result.stderr
    uri = f"sqlite:///{work / 'mlflow.db'}"
    return dict(work=work, data=data, result=result, uri=uri, client=MlflowClient(uri), corrupt=corrupt)


def runs_of(swept):
    client = swept["client"]
    exp = client.get_experiment_by_name("ca-flow")
    return exp, client.search_runs([exp.experiment_id], max_results=1000)


def test_sweep_reports_the_unreadable_image_and_goes_on(swept):
    assert f"skipping unreadable image {swept['corrupt']}" in " ".join(swept["result"].output.split())
    assert f"{TRIALS} trials, 0 failed" in swept["result"].output


def test_mlflow_has_parent_and_one_child_per_grid_point(swept):
    exp, runs = runs_of(swept)
    assert exp.artifact_location == str(swept["work"] / "mlartifacts")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == TRIALS
    assert sum(r.data.params["method"] == "zero-shot" for r in children) == 2 * len(SEEDS)
    points = set()
    for run in [r for r in children if r.data.params["method"] == "clip-adapter"]:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        assert PARAMS <= set(p) and p["weights"] == "random" and p["backbone"] == TINY
        assert {"val_acc", "test_acc", "zs_test_acc", "train_loss"} <= set(m)
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["ca_flow.sweep_id"] == parent.data.tags["ca_flow.sweep_id"] and len(t["ca_flow.trial_key"]) == 16
        assert t["ca_flow.random_weights"] == "true" and t["ca_flow.model_uri"].startswith("models:/m-")
        epochs = int(p["epochs"])
        assert epochs == (50 if p["shots"] == "1" else 100)  # CoOp's schedule by shots
        history = swept["client"].get_metric_history(run.info.run_id, "train_loss")
        assert [h.step for h in history] == list(range(epochs))
        points.add((p["dataset"], int(p["shots"]), int(p["seed"]), float(p["alpha"])))
    assert points == {(d, k, s, a) for d in ("textile", "colours") for k in SHOTS for s in SEEDS for a in ALPHAS}


def test_results_parquet_and_summary_match_mlflow(swept):
    (path,) = (swept["work"] / "ca-flow-results").glob("*.parquet")
    frame = pd.read_parquet(path)
    _, runs = runs_of(swept)
    by_id = {r.info.run_id: r for r in runs}
    assert len(frame) == TRIALS and (frame["status"] == "FINISHED").all()
    for row in frame.itertuples():
        assert by_id[row.run_id].data.metrics["test_acc"] == pytest.approx(row.test_acc)
    # The table picks alpha on validation, per seed, and prints the test mean +- std over seeds.
    out = " ".join(swept["result"].output.replace("│", " ").split())
    for dataset, cells in expected_cells(frame[frame["method"] == "clip-adapter"]).items():
        assert f"{dataset} {' '.join(cells)}" in out, out


def expected_cells(frame):
    """Per dataset, 'mean +- std' per shots, recomputed by hand: best val_acc per seed, ties to lower alpha."""
    picked = frame.sort_values(["val_acc", "alpha"], ascending=[False, True]).groupby(["dataset", "shots", "seed"]).head(1)
    stats = picked.groupby(["dataset", "shots"])["test_acc"].agg(["mean", "std"]) * 100
    return {d: [f"{stats.loc[(d, k), 'mean']:.2f} +- {stats.loc[(d, k), 'std']:.2f}" for k in SHOTS]
            for d in sorted(set(picked["dataset"]))}


def test_report_table_equals_the_mlflow_runs_and_figure_is_logged(swept):
    out_dir = swept["work"] / "report"
    result = runner.invoke(app, ["report", "--tracking-uri", swept["uri"], "--out", str(out_dir), "--paper"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "not comparable" in result.output  # a random tiny backbone is not RN50 + OpenAI
    exp, runs = runs_of(swept)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    from_mlflow = pd.DataFrame([dict(dataset=r.data.params["dataset"], method=r.data.params["method"],
                                     shots=int(r.data.params["shots"]), seed=int(r.data.params["seed"]),
                                     alpha=float(r.data.params["alpha"]) if "alpha" in r.data.params else 0.0,
                                     val_acc=r.data.metrics["val_acc"], test_acc=r.data.metrics["test_acc"])
                                for r in children])
    (sweep_dir,) = out_dir.iterdir()
    table = pd.read_csv(sweep_dir / "table.csv", index_col=[0, 1])
    for dataset, cells in expected_cells(from_mlflow[from_mlflow["method"] == "clip-adapter"]).items():
        assert table.loc[("clip-adapter", dataset)].tolist() == cells
    zs = from_mlflow[from_mlflow["method"] == "zero-shot"].groupby("dataset")["test_acc"].agg(["mean", "std"]) * 100
    for dataset, row in zs.iterrows():  # zero-shot fits nothing: the same figure in every shots column
        assert table.loc[("zero-shot", dataset)].tolist() == [f"{row['mean']:.2f} +- {row['std']:.2f}"] * len(SHOTS)
    assert (sweep_dir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in swept["client"].list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/table.md", "report/table.csv", "report/figure.png"}


def test_textile_images_went_through(swept):
    textile = load(resolve("textile", swept["data"])[0])
    _, runs = runs_of(swept)
    run = next(r for r in runs if r.data.params.get("dataset") == "textile")
    assert run.data.metrics["n_test"] == len(textile.test) == 600


@pytest.fixture(scope="module")
def promoted(swept):
    uri = swept["uri"]
    result = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output + result.stderr
    return swept


def best_by_rule(runs, dataset):
    mine = [r for r in runs if r.data.params.get("dataset") == dataset]
    return min(mine, key=lambda r: (-r.data.metrics["val_acc"], -int(r.data.params["shots"]),
                                    int(r.data.params["seed"]), float(r.data.params.get("alpha", 0.0))))


def test_promote_registers_the_val_best_with_evidence_once(promoted):
    client, uri = promoted["client"], promoted["uri"]
    _, runs = runs_of(promoted)
    for dataset in ("textile", "colours"):
        version = client.get_model_version_by_alias(f"clip-adapter-{dataset}", "champion")
        best = best_by_rule(runs, dataset)
        assert version.run_id == best.info.run_id
        assert float(version.tags["val_acc"]) == pytest.approx(best.data.metrics["val_acc"])
        assert {"sweep_id", "test_acc", "shots", "seed", "alpha"} <= set(version.tags)
    again = runner.invoke(app, ["promote", "--tracking-uri", uri, "--datasets", "colours"])
    assert again.exit_code == 0 and "(existing)" in again.output
    assert len(client.search_model_versions("name = 'clip-adapter-colours'")) == 1
    dry = runner.invoke(app, ["promote", "--tracking-uri", uri, "--dry-run", "--alias", "staging"])
    assert dry.exit_code == 0 and "would promote" in dry.output
    with pytest.raises(Exception):
        client.get_model_version_by_alias("clip-adapter-colours", "staging")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_predict_and_served_model_agree(promoted):
    images = [str(next((promoted["data"] / "colours" / c).glob("*_01*.png"))) for c in ("red", "green", "blue")]
    result = runner.invoke(app, ["predict", "--dataset", "colours", "--tracking-uri", promoted["uri"], *images])
    assert result.exit_code == 0, result.output + result.stderr
    text = " ".join(result.output.split())
    top = {image: text.split(f"{image}: ", 1)[1].split(" ")[0] for image in images}
    assert set(top.values()) <= {"red", "green", "blue"}

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=promoted["uri"])
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/clip-adapter-colours@champion",
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"dataframe_records": [{"image": i} for i in images]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert [p["label"] for p in served] == [top[i] for i in images]
