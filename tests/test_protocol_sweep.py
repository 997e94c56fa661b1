"""Both protocols in one sweep through the real CLI on CoOp miniatures: what each run logs, the
side-by-side report, and a champion never chosen on test."""

import json

import pytest
import test_coop_datasets as layouts
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from mlflow import MlflowClient
from workflows.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
METHODS = ["clip-adapter", "zero-shot", "tip-adapter", "tip-adapter-f", "gda"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("protocols")
    # a whole val larger than min(K, 4)
    layouts.make_distinct(work / "data", ("imagenet", "dtd"), {"train": 5, "val": 6, "test": 3})
    uri = f"sqlite:///{work / 'mlflow.db'}"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--datasets",
            "imagenet,dtd",
            "--data-root",
            str(work / "data"),
            "--methods",
            ",".join(METHODS),
            "--backbone",
            TINY,
            "--pretrained",
            "random",
            "--shots",
            "1,2",
            "--seeds",
            "1",
            "--alphas",
            "0.2,0.6",
            "--augment-views",
            "2",
            "--epochs",
            "2",
            "--protocol",
            "few-shot,released",
            "--tracking-uri",
            uri,
            "--cache-dir",
            str(work / "cache"),
            "--results-dir",
            str(work / "results"),
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ca-flow")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=500)
        if "mlflow.parentRunId" in r.data.tags
    ]
    return dict(work=work, uri=uri, client=client, runs=runs)


def test_every_run_logs_its_protocol_and_where_it_chose(swept):
    got = {}
    for r in swept["runs"]:
        p = r.data.params
        assert r.info.status == "FINISHED"
        got.setdefault((p["dataset"], p["method"], p["protocol"]), set()).add(
            (p["selection_split"], int(p["n_select"]), int(p["shots"]))
        )
    # dtd: 2 classes; whole val 6 per class = 12; few-shot val min(K, 4) per class; test 3 per class = 6.
    # imagenet: 3 classes, test 3 per class = 9, few-shot val from train min(K, 4) per class.
    assert got[("dtd", "tip-adapter", "few-shot")] == {("val", 2, 1), ("val", 4, 2)}
    assert got[("dtd", "tip-adapter", "released")] == {("val", 12, 1), ("val", 12, 2)}
    assert got[("dtd", "gda", "released")] == {("val", 12, 1), ("val", 12, 2)}
    assert got[("dtd", "tip-adapter-f", "released")] == {("test", 18, 1), ("test", 18, 2)}  # val 12 + test 6
    assert got[("imagenet", "tip-adapter", "released")] == {("test", 9, 1), ("test", 9, 2)}
    assert got[("imagenet", "gda", "released")] == {("test", 9, 1), ("test", 9, 2)}
    assert got[("imagenet", "clip-adapter", "released")] == {("val", 3, 1), ("val", 6, 2)}
    assert got[("imagenet", "gda", "few-shot")] == {("val", 3, 1), ("val", 6, 2)}
    released_tip = [
        r
        for r in swept["runs"]
        if r.data.params["method"] == "tip-adapter"
        and r.data.params["protocol"] == "released"
        and r.data.params["dataset"] == "dtd"
    ]
    # Tip-Adapter d0e2d6f configs/dtd.yaml:17 search_scale [13, 13]
    assert {r.data.params["search_scale"] for r in released_tip} == {"[13, 13]"}
    # Tip-Adapter, Tip-Adapter-F and GDA train on views cropped from 0.5 under released: a kind of their own
    kinds = {p.parent.name for p in (swept["work"] / "cache").rglob("part-*.parquet")}
    assert {"augment", "augment-0.5", "center"} <= kinds


def test_report_paper_lays_the_protocols_side_by_side(swept):
    work, uri = swept["work"], swept["uri"]
    report = runner.invoke(
        app, ["report", "--paper", "--tracking-uri", uri, "--out", str(work / "report"), "--json"]
    )
    assert report.exit_code == 0, report.output + report.stderr
    rows = json.loads(report.stdout)["side_by_side"]
    by = {(r["method"], r["dataset"], r["shots"]): r for r in rows}
    assert (
        by[("tip-adapter-f", "dtd", 1)]["test_selected"]
        and not by[("tip-adapter", "dtd", 1)]["test_selected"]
    )
    assert by[("tip-adapter", "imagenet", 2)]["test_selected"]
    assert all(r["paper"] is None or r["paper"] != r["paper"] for r in rows)  # random weights: not comparable
    table = next((work / "report").glob("*/table.md")).read_text()
    assert "## published vs released protocol vs few-shot protocol" in table
    assert "## tip-adapter-f (released)" in table
    text = runner.invoke(app, ["report", "--paper", "--tracking-uri", uri, "--out", str(work / "report2")])
    print(text.output)  # the excerpt the README's Protocol section shows
    assert "| tip-adapter-f | dtd | 1 |" in text.output and "not comparable" in text.output


def test_a_champion_is_never_a_test_selected_run(swept):
    uri, runs = swept["uri"], swept["runs"]
    promote = runner.invoke(app, ["promote", "--tracking-uri", uri, "--methods", ",".join(METHODS), "--json"])
    assert promote.exit_code == 0, promote.output + promote.stderr
    for p in json.loads(promote.stdout)["promotions"]:
        run = next(r for r in runs if r.info.run_id == p["run_id"])
        assert run.data.params["selection_split"] == "val"
        # the rule written out: the best val_acc among runs chosen on val (ties: more shots, lower seed, alpha)
        eligible = [
            r
            for r in runs
            if r.data.params["dataset"] == p["dataset"] and r.data.params["selection_split"] == "val"
        ]
        best = max(r.data.metrics["val_acc"] for r in eligible)
        assert run.data.metrics["val_acc"] == best
