"""Every method through the real CLI on miniatures of CoOp layouts: sweep, report, promote, predict."""

import json
import re

import pytest
import test_coop_datasets as layouts
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from mlflow import MlflowClient
from workflows.cli import app

runner = CliRunner()
METHODS = ["clip-adapter", "zero-shot", "linear-probe", "tip-adapter", "tip-adapter-f", "gda"]
CHOSEN = {
    "linear-probe": {"chosen_C"},
    "tip-adapter": {"chosen_alpha", "chosen_beta"},
    "tip-adapter-f": {"chosen_alpha", "chosen_beta", "chosen_epoch"},
    "gda": {"chosen_alpha"},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("paper")
    layouts.make_distinct(work / "data", ("imagenet", "fgvc_aircraft"))  # every image encoded
    uri = f"sqlite:///{work / 'mlflow.db'}"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--datasets",
            "imagenet,fgvc_aircraft",
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
            "0.2",
            "--augment-views",
            "2",
            "--epochs",
            "3",
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
    return dict(work=work, uri=uri, result=result, client=client, runs=runs)


def test_every_method_ran_and_chose_on_val(swept):
    by_method = {m: [r for r in swept["runs"] if r.data.params["method"] == m] for m in METHODS}
    # per dataset: 2 shots x 1 seed for trained methods, one zero-shot trial per seed
    assert {m: len(rs) for m, rs in by_method.items()} == {
        "clip-adapter": 4,
        "zero-shot": 2,
        "linear-probe": 4,
        "tip-adapter": 4,
        "tip-adapter-f": 4,
        "gda": 4,
    }
    for method, rs in by_method.items():
        for r in rs:
            assert r.info.status == "FINISHED" and CHOSEN.get(method, set()) <= set(r.data.params)
    imagenet = [r for r in by_method["tip-adapter"] if r.data.params["dataset"] == "imagenet"]
    for r in imagenet:  # val shots drawn from train: min(K, 4) per class of the 3 classes
        assert r.data.params["n_val"] == str(3 * min(int(r.data.params["shots"]), 4))
        assert r.data.params["n_test"] == "9"


def test_the_sweep_prints_one_table_per_method(swept):
    titles = re.findall(r"^\s*([a-z-]+)\s*$", swept["result"].output, flags=re.M)
    assert [t for t in titles if t in METHODS] == METHODS  # each block titled by its method, in order


def best(runs, dataset, methods):
    """The documented rule, written out: best val_acc; ties more shots, lower seed, then the smaller
    alpha and beta the run used (chosen on val, else its grid value; none counts as 0), then run id."""

    def used(p, name):
        return float(p.get(f"chosen_{name}", p.get(name, 0.0)))

    mine = [r for r in runs if r.data.params["dataset"] == dataset and r.data.params["method"] in methods]
    return sorted(
        mine,
        key=lambda r: (
            -r.data.metrics["val_acc"],
            -int(r.data.params["shots"]),
            int(r.data.params["seed"]),
            used(r.data.params, "alpha"),
            used(r.data.params, "beta"),
            r.info.run_id,
        ),
    )[0]


def test_report_paper_promote_predict(swept):
    work, uri, client = swept["work"], swept["uri"], swept["client"]
    report = runner.invoke(app, ["report", "--paper", "--tracking-uri", uri, "--out", str(work / "report")])
    assert report.exit_code == 0, report.output + report.stderr
    assert "not comparable" in report.output and len(list((work / "report").glob("*/figure.png"))) == 1
    # Default: only clip-adapter runs may become champion.
    promote = runner.invoke(app, ["promote", "--tracking-uri", uri, "--json"])
    assert promote.exit_code == 0, promote.output + promote.stderr
    chosen = {p["dataset"]: p for p in json.loads(promote.stdout)["promotions"]}
    for dataset in ("imagenet", "fgvc_aircraft"):
        want = best(swept["runs"], dataset, {"clip-adapter"})
        version = client.get_model_version_by_alias(f"clip-adapter-{dataset}", "champion")
        assert version.run_id == want.info.run_id == chosen[dataset]["run_id"]
        assert chosen[dataset]["method"] == "clip-adapter" and chosen[dataset]["action"] == "new v1"
    # predict's top class and score are CLIP-Adapter's formula on the champion's files (tests/oracles.py),
    # while the champion is a CLIP-Adapter run (the oracle writes out that method only).
    from oracles import clip_adapter_top

    image = next((work / "data" / "imagenet" / "images" / "val").rglob("*.JPEG"))
    predicted = runner.invoke(
        app, ["predict", "--dataset", "imagenet", "--tracking-uri", uri, "--json", str(image)]
    )
    assert predicted.exit_code == 0, predicted.output + predicted.stderr
    (got,) = json.loads(predicted.stdout)["predictions"]
    version = client.get_model_version_by_alias("clip-adapter-imagenet", "champion")
    folder = client.download_artifacts(version.run_id, "adapter", str(work / "oracle"))
    want = clip_adapter_top(folder, image, 3)
    assert [t["label"] for t in got["top"]] == [c for c, _ in want]
    assert [t["score"] for t in got["top"]] == pytest.approx(
        [s for _, s in want], abs=1e-5
    )  # JSON has 6 places
    # Naming every method lets the best of all of them in, if it beats the champion on val_acc.
    promote = runner.invoke(app, ["promote", "--tracking-uri", uri, "--methods", ",".join(METHODS), "--json"])
    assert promote.exit_code == 0, promote.output + promote.stderr
    for p in json.loads(promote.stdout)["promotions"]:
        champion = best(swept["runs"], p["dataset"], {"clip-adapter"})
        overall = best(swept["runs"], p["dataset"], set(METHODS))
        moved = overall.data.metrics["val_acc"] > champion.data.metrics["val_acc"]
        assert p["run_id"] == overall.info.run_id
        assert p["action"].startswith(
            "moved v1 -> v2" if moved else ("already" if overall is champion else "kept v1")
        )
    # Consistency, whatever method is champion now: predict equals the library's classifier on its files.
    from clip_adapter import AdapterClassifier

    predicted = runner.invoke(
        app, ["predict", "--dataset", "imagenet", "--tracking-uri", uri, "--json", str(image)]
    )
    (got,) = json.loads(predicted.stdout)["predictions"]
    version = client.get_model_version_by_alias("clip-adapter-imagenet", "champion")
    folder = client.download_artifacts(version.run_id, "adapter", str(work / "oracle-any"))
    want = AdapterClassifier(folder, device="cpu").predict([str(image)], 3)[0]
    assert [t["label"] for t in got["top"]] == [c for c, _ in want]
