"""Bad input: one clear line on stderr, a non-zero exit, and nothing written."""
import pytest
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from workflows.cli import app

runner = CliRunner()
SMALL = ["--backbone", TINY, "--pretrained", "random", "--shots", "1", "--seeds", "1", "--alphas", "0.2"]


def fails(args, match, cwd):
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlartifacts").exists()
    return lines[0]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.mark.parametrize("args,match", [
    (["--datasets", "nope"], "unknown dataset 'nope'"),
    (["--alphas", "0.2,1.5"], "alpha 1.5 is outside [0, 1]"),
    (["--alphas", "-0.1"], "alpha -0.1 is outside [0, 1]"),
    (["--shots", "0,1"], "shots must be >= 1"),
    (["--shots", "one"], "--shots expects comma-separated ints"),
    (["--augment-views", "0"], "--augment-views must be >= 1"),
    (["--backbone", "no-such-model"], "unknown backbone 'no-such-model'"),
])
def test_sweep_refuses_bad_arguments(args, match, colour_root, in_tmp):
    base = ["sweep", "--datasets", "colours", "--data-root", str(colour_root), *SMALL]
    # later flags win in Click, so each case overrides one default above
    fails(base + args, match, in_tmp)


def test_missing_data_root(in_tmp):
    fails(["sweep", "--datasets", "all", "--data-root", str(in_tmp / "nowhere"), *SMALL], "does not exist", in_tmp)
    fails(["datasets", "--data-root", str(in_tmp / "nowhere")], "does not exist", in_tmp)


def test_missing_registered_dataset_says_where_and_what(in_tmp):
    line = fails(["sweep", "--datasets", "eurosat", "--data-root", str(in_tmp), *SMALL], "not found at", in_tmp)
    assert "split_zhou_EuroSAT.json" in line and str(in_tmp / "eurosat") in line


def test_unreachable_tracking_server(colour_root, in_tmp):
    fails(["sweep", "--datasets", "colours", "--data-root", str(colour_root), *SMALL,
           "--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9 is unreachable", in_tmp)


def test_request_the_cluster_cannot_meet_is_refused_up_front(colour_root, ray_local, tmp_path):
    result = runner.invoke(app, ["sweep", "--datasets", "colours", "--data-root", str(colour_root), *SMALL,
                                 "--gpus-per-trial", "1", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: no Ray node can give a trial 1 CPU and 1 GPU")
    assert not (tmp_path / "mlflow.db").exists()


def test_promote_with_no_finished_runs(in_tmp):
    uri = f"sqlite:///{in_tmp / 'store' / 'mlflow.db'}"
    (in_tmp / "store").mkdir()
    result = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert result.exit_code != 0 and result.stderr.startswith("error: no MLflow store at")
    assert not (in_tmp / "store" / "mlflow.db").exists()
    from mlflow import MlflowClient
    MlflowClient(uri).search_experiments()
    result = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert result.exit_code != 0 and result.stderr.startswith("error: no experiment 'ca-flow'")
    MlflowClient(uri).create_experiment("ca-flow")
    result = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert result.exit_code != 0
    assert result.stderr.strip() == "error: experiment 'ca-flow' has no finished trial runs; run `ca-flow sweep` first"


def test_predict_unreadable_image_is_named(in_tmp):
    bad = in_tmp / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    fails(["predict", "--dataset", "colours", str(bad)], f"cannot read image {bad}", in_tmp)
