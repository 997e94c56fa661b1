"""Every method through the real CLI on miniatures of CoOp layouts: sweep, report, promote, predict."""
import zlib

import numpy as np
import pytest
import test_coop_datasets as layouts
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from workflows.cli import app

runner = CliRunner()
METHODS = ["clip-adapter", "zero-shot", "linear-probe", "tip-adapter", "tip-adapter-f"]
CHOSEN = {"linear-probe": {"chosen_C"}, "tip-adapter": {"chosen_alpha", "chosen_beta"},
          "tip-adapter-f": {"chosen_alpha", "chosen_beta", "chosen_epoch"}}


def noise_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("paper")
    patch = pytest.MonkeyPatch()
    patch.setattr(layouts, "_image", noise_image)  # distinct images, so every one is encoded
    (work / "data").mkdir()
    for name in ("imagenet", "fgvc_aircraft"):
        layouts.make(work / "data", name)
    patch.undo()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    result = runner.invoke(app, [
        "sweep", "--datasets", "imagenet,fgvc_aircraft", "--data-root", str(work / "data"), "--methods",
        ",".join(METHODS), "--backbone", TINY, "--pretrained", "random", "--shots", "1,2", "--seeds", "1",
        "--alphas", "0.2", "--augment-views", "2", "--epochs", "3", "--tracking-uri", uri,
        "--cache-dir", str(work / "cache"), "--results-dir", str(work / "results")])
    assert result.exit_code == 0, result.output + result.stderr
    return dict(work=work, uri=uri, result=result, client=MlflowClient(uri))


def test_every_method_ran_and_chose_on_val(swept):
    client = swept["client"]
    exp = client.get_experiment_by_name("ca-flow")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=500) if "mlflow.parentRunId" in r.data.tags]
    by_method = {m: [r for r in runs if r.data.params["method"] == m] for m in METHODS}
    # per dataset: 2 shots x 1 seed for trained methods, one zero-shot trial per seed
    assert {m: len(rs) for m, rs in by_method.items()} == {
        "clip-adapter": 4, "zero-shot": 2, "linear-probe": 4, "tip-adapter": 4, "tip-adapter-f": 4}
    for method, rs in by_method.items():
        for r in rs:
            assert r.info.status == "FINISHED" and CHOSEN.get(method, set()) <= set(r.data.params)
    imagenet = [r for r in by_method["tip-adapter"] if r.data.params["dataset"] == "imagenet"]
    for r in imagenet:  # val shots drawn from train: min(K, 4) per class of the 3 classes
        assert r.data.metrics["n_val"] == 3 * min(int(r.data.params["shots"]), 4)
        assert r.data.metrics["n_test"] == 9


def test_report_paper_promote_predict(swept):
    work, uri = swept["work"], swept["uri"]
    out = " ".join(swept["result"].output.split())
    for method in METHODS:
        assert method in out  # the sweep prints one table block per method
    report = runner.invoke(app, ["report", "--paper", "--tracking-uri", uri, "--out", str(work / "report")])
    assert report.exit_code == 0, report.output + report.stderr
    assert "not comparable" in report.output and len(list((work / "report").glob("*/figure.png"))) == 1
    promote = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert promote.exit_code == 0, promote.output + promote.stderr
    image = next((work / "data" / "imagenet" / "images" / "val").rglob("*.JPEG"))
    predicted = runner.invoke(app, ["predict", "--dataset", "imagenet", "--tracking-uri", uri, str(image)])
    assert predicted.exit_code == 0, predicted.output + predicted.stderr
    assert any(name in predicted.output for name in ("tench", "goldfish", "Chihuahua dog"))
