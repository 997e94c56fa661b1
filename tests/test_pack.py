"""Packed trials (--pack): the CLIP-Adapter points that differ only in alpha/beta train as one stacked
model in one Tune trial, and each point ends as it would have alone: its own run, params, metrics,
loss history and adapter, equal to the unpacked run's within 1e-5."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clip_adapter import evaluate
from clip_adapter.backbone import TINY
from clip_adapter.methods import FewShot, make
from clip_adapter.methods.clip_adapter import fit_packed
from mlflow import MlflowClient
from workflows.cli import app
from workflows.grid import SweepSpec, grid, packs
from workflows.point import TrialPoint

runner = CliRunner()


# -- the library: K stacked adapters train as K separate ones -----------------------------------------


def planted(seed=0, classes=5, dim=64, n=40, views=3):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(classes, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = rng.integers(classes, size=n)
    train = (text[labels][:, None] + 0.5 * rng.normal(size=(n, views, dim))).astype(np.float32)
    test_labels = rng.integers(classes, size=60)
    test = (text[test_labels] + 0.5 * rng.normal(size=(60, dim))).astype(np.float32)
    return FewShot(train, labels, train[:, 0], labels, text, 20.0), test, test_labels


@pytest.mark.parametrize(
    "variant,ratios",
    [
        ("visual", [(0.2, 0.2), (0.4, 0.2), (0.6, 0.2), (0.8, 0.2)]),
        ("text", [(0.2, 0.1), (0.2, 0.9)]),
        ("both", [(0.2, 0.1), (0.7, 0.1), (0.7, 0.5)]),
    ],
)
def test_packed_fit_equals_separate_fits(variant, ratios):
    """Loss per epoch, adapter weights, val and test accuracy of each member: as its own fit, within 1e-5."""
    data, test, test_labels = planted()
    hp = dict(variant=variant, epochs=8, lr=0.01, batch_size=8)
    torch.set_num_threads(1)
    alone = []
    for alpha, beta in ratios:
        torch.manual_seed(123)  # whatever a reused worker left behind: the seed decides, not this
        m = make("clip-adapter", data.text, data.logit_scale, alpha=alpha, beta=beta, **hp)
        alone.append((m, m.fit(data, 3).losses))
    packed = [make("clip-adapter", data.text, data.logit_scale, alpha=a, beta=b, **hp) for a, b in ratios]
    torch.manual_seed(7)
    fits = fit_packed(packed, data, 3)
    for (one, losses), member, fitted in zip(alone, packed, fits):
        assert len(fitted.losses) == 8 and all(isinstance(x, float) for x in fitted.losses)
        np.testing.assert_allclose(fitted.losses, losses, atol=1e-5, rtol=0)
        want, got = one.state_dict(), member.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=1e-5, rtol=0, err_msg=k)
        member.eval()
        assert evaluate(member, data.val, data.val_labels) == evaluate(one, data.val, data.val_labels)
        assert evaluate(member, test, test_labels) == evaluate(one, test, test_labels)
    # and the members did learn something different from each other (alpha reached each one)
    assert fits[0].losses != fits[1].losses


def test_packed_fit_refuses_members_that_train_differently():
    data, _, _ = planted()
    methods = [
        make("clip-adapter", data.text, data.logit_scale, alpha=0.2, epochs=2),
        make("clip-adapter", data.text, data.logit_scale, alpha=0.4, epochs=3),
    ]
    with pytest.raises(ValueError, match="must share variant, reduction and training config"):
        fit_packed(methods, data, 1)


# -- the grid: which points pack together ---------------------------------------------------------------

SPEC = dict(
    backbone=TINY,
    pretrained="random",
    shots=[1, 2],
    seeds=[1, 2],
    alphas=[0.2, 0.6, 0.8],
    betas=[0.1, 0.5],
    adapter=["visual", "both"],
    methods=["clip-adapter", "zero-shot", "tip-adapter"],
)


def test_pack_groups_the_points_that_differ_only_in_alpha_and_beta():
    trials = grid(SweepSpec(**SPEC, pack=True), ["d1", "d2"])
    assert (
        grid(SweepSpec(**SPEC), ["d1", "d2"]) == trials
    )  # keys do not change with --pack: resume finds runs
    groups = packs(trials, True)
    assert sorted(t.key for g in groups for t in g) == sorted(t.key for t in trials)  # each point once
    ca = [g for g in groups if g[0].method == "clip-adapter"]
    # per (dataset, shots, seed, variant): visual packs its 3 alphas, both its 3 alphas x 2 betas
    assert Counter((g[0].hparams["variant"], len(g)) for g in ca) == {
        ("visual", 3): 2 * 2 * 2,
        ("both", 6): 2 * 2 * 2,
    }
    for g in ca:
        same = {
            (
                t.dataset,
                t.shots,
                t.seed,
                t.hparams["variant"],
                t.hparams["epochs"],
                t.hparams["lr"],
                t.hparams["batch_size"],
            )
            for t in g
        }
        assert len(same) == 1, g
        assert len({(t.hparams["alpha"], t.hparams["beta"]) for t in g}) == len(g)
    others = [g for g in groups if g[0].method != "clip-adapter"]
    assert all(len(g) == 1 for g in others)  # other methods search inside their own trial
    assert len(others) == 2 * (2 + 2 * 2)  # zero-shot: per seed; tip-adapter: per shots and seed


def test_without_pack_every_point_is_its_own_trial():
    trials = grid(SweepSpec(**SPEC), ["d1"])
    assert [g for g in packs(trials, False)] == [[t] for t in trials]


def test_pack_keeps_apart_what_trains_differently():
    """Points of other epochs or views do not share a batch stream: they never pack together."""
    a = grid(SweepSpec(**dict(SPEC, epochs=5)), ["d"])
    b = grid(SweepSpec(**dict(SPEC, epochs=6)), ["d"])
    c = grid(SweepSpec(**dict(SPEC, epochs=5, augment_views=3)), ["d"])
    groups = packs(a + b + c, True)
    for g in groups:
        assert len({(t.hparams.get("epochs"), t.views) for t in g}) == 1


def test_dry_run_says_points_and_tune_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "sweep",
        "--backbone",
        TINY,
        "--pretrained",
        "random",
        "--datasets",
        "textile",
        "--shots",
        "1,2",
        "--seeds",
        "1,2,3",
        "--alphas",
        "0.2,0.4,0.6,0.8",
        "--methods",
        "clip-adapter,zero-shot",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--dry-run",
    ]
    points = 2 * 3 * 4 + 3
    for flags, tune_trials in (([], points), (["--pack"], 2 * 3 + 3)):
        doc = runner.invoke(app, [*args, *flags, "--json"])
        assert doc.exit_code == 0, doc.output + doc.stderr
        plan = json.loads(doc.stdout)
        assert (plan["trials"], plan["tune_trials"]) == (points, tune_trials)
        text = runner.invoke(app, [*args, *flags])
        assert (
            text.stdout.strip()
            .splitlines()[-1]
            .startswith(f"dry run: {points} trials (grid points) in {tune_trials} Tune trials")
        ), text.stdout


def test_pack_in_a_sweep_file(tmp_path):
    from workflows.grid import SweepError, build_spec

    (tmp_path / "p.toml").write_text("pack = true\n")
    assert build_spec(tmp_path / "p.toml", {"backbone": TINY, "pretrained": "random"}).pack is True
    assert (
        build_spec(tmp_path / "p.toml", {"backbone": TINY, "pretrained": "random", "pack": False}).pack
        is False
    )
    (tmp_path / "bad.toml").write_text('pack = "yes"\n')
    with pytest.raises(SweepError, match="pack expects true or false"):
        build_spec(tmp_path / "bad.toml", {"backbone": TINY, "pretrained": "random"})
    paper = build_spec(Path(__file__).resolve().parents[1] / "examples" / "paper.toml", {})
    assert paper.pack is True


# -- end to end: a packed sweep against an unpacked one of the same grid ---------------------------------

GRID = [
    "--methods",
    "clip-adapter,zero-shot",
    "--alphas",
    "0.2,0.5,0.8",
    "--shots",
    "2",
    "--seeds",
    "1,2",
    "--epochs",
    "4",
    "--lr",
    "0.01",
    "--batch-size",
    "4",
    "--augment-views",
    "2",
    "--max-retries",
    "0",
]
POINTS = 3 * 2 + 2


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, colour_root, ray_local):
    work = tmp_path_factory.mktemp("pack")
    data = work / "data"
    shutil.copytree(colour_root / "colours", data / "colours")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    common = [
        "--datasets",
        "colours",
        "--data-root",
        str(data),
        "--backbone",
        TINY,
        "--pretrained",
        "random",
        "--tracking-uri",
        uri,
        "--cache-dir",
        str(work / "cache"),
        "--results-dir",
        str(work / "results"),
        "--storage-path",
        str(work / "ray_results"),
        *GRID,
    ]
    out = {}
    for name, flags in (("alone", []), ("packed", ["--pack"])):
        result = runner.invoke(app, ["sweep", *common, "--experiment", name, *flags])
        assert result.exit_code == 0, result.output + result.stderr
        out[name] = result
    return dict(work=work, uri=uri, client=MlflowClient(uri), common=common, **out)


def runs_by_key(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return (
        {r.data.tags["ca_flow.trial_key"]: r for r in runs if "mlflow.parentRunId" in r.data.tags},
        next(r for r in runs if "mlflow.parentRunId" not in r.data.tags),
    )


def adapter_weights(client, run, dest):
    folder = Path(client.download_artifacts(run.info.run_id, "adapter", str(dest / run.info.run_id)))
    return load_file(str(next(folder.glob("*.safetensors"))))


def losses(client, run, epochs=4):
    """The last attempt's loss per epoch (a rerun logs its history again, later)."""
    history = sorted(
        client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: (m.timestamp, m.step)
    )
    return [m.value for m in history[-epochs:]]


@pytest.mark.slow
def test_packed_sweep_records_each_point_as_the_unpacked_sweep_does(sweeps):
    client = sweeps["client"]
    alone, _ = runs_by_key(client, "alone")
    packed, parent = runs_by_key(client, "packed")
    assert len(packed) == POINTS and packed.keys() == alone.keys()  # one run per grid point, same keys
    assert parent.info.status == "FINISHED" and parent.data.params["grid.pack"] == "True"
    for key, run in packed.items():
        want = alone[key]
        assert run.info.status == "FINISHED" and run.data.tags["ca_flow.attempt"] == "1", run.info.run_name
        assert run.info.run_name == want.info.run_name
        assert run.data.params == want.data.params  # its own alpha, seed, shots, counts
        for metric in ("val_acc", "test_acc", "zs_test_acc"):
            assert run.data.metrics[metric] == pytest.approx(want.data.metrics[metric], abs=1e-5), metric
        if run.data.tags["ca_flow.method"] == "clip-adapter":
            got, expected = losses(client, run), losses(client, want)
            assert len(got) == 4
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
            w = adapter_weights(client, run, sweeps["work"] / "a")
            v = adapter_weights(client, want, sweeps["work"] / "b")
            assert w.keys() == v.keys()
            for k in w:
                np.testing.assert_allclose(w[k].numpy(), v[k].numpy(), atol=1e-5, rtol=0, err_msg=k)
    # the alphas of one (shots, seed) differ from each other: each point got its own member
    ca = [r for r in packed.values() if r.data.tags["ca_flow.method"] == "clip-adapter"]
    assert len({round(r.data.metrics["train_loss_final"], 6) for r in ca}) == len(ca)


@pytest.mark.slow
def test_resumed_packed_sweep_reruns_only_the_unfinished_points(sweeps):
    client = sweeps["client"]
    packed, parent = runs_by_key(client, "packed")
    ca = sorted(
        (
            r
            for r in packed.values()
            if r.data.tags["ca_flow.method"] == "clip-adapter" and r.data.params["seed"] == "1"
        ),
        key=lambda r: r.data.params["alpha"],
    )
    lost = ca[:2]  # two alphas of one pack, as if its worker died before their records were written
    for run in lost:
        client.set_terminated(run.info.run_id, "FAILED")
    client.set_terminated(parent.info.run_id, "FAILED")
    before = {k: r.info.end_time for k, r in packed.items()}
    import ray  # the first driver's recorder outlives its sweep in this process; a new driver starts afresh

    ray.kill(ray.get_actor(f"ca-flow-recorder-{parent.data.tags['ca_flow.sweep_id']}"))
    result = runner.invoke(
        app, ["resume", parent.data.tags["ca_flow.sweep_id"], "--tracking-uri", sweeps["uri"], "--force"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert f"{POINTS - 2} of {POINTS} trials already done, 2 to run" in " ".join(result.output.split())
    after, parent = runs_by_key(client, "packed")
    alone, _ = runs_by_key(client, "alone")
    assert parent.info.status == "FINISHED" and len(after) == POINTS
    rerun = {r.data.tags["ca_flow.trial_key"] for r in lost}
    for key, run in after.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["ca_flow.attempt"] == ("2" if key in rerun else "1"), run.info.run_name
        if key not in rerun:
            assert run.info.end_time == before[key]  # untouched
        else:  # trained again as a pack of the two left, equal to the point trained alone
            np.testing.assert_allclose(losses(client, run), losses(client, alone[key]), atol=1e-5, rtol=0)
            assert run.data.metrics["val_acc"] == pytest.approx(alone[key].data.metrics["val_acc"], abs=1e-5)


def test_recorder_says_which_points_of_a_pack_are_written(tmp_path):
    """A retried pack asks the recorder which of its points are done, and trains only the others."""
    import mlflow
    from workflows.recorder import Recorder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("x")
    parent = client.create_run(exp_id).info.run_id
    rec = Recorder(uri, exp_id, parent, "s")
    source = dict(name="d", digest="0" * 8, source_type="local", source="file:///d")
    for key in ("a", "b", "c"):
        rec.start(
            TrialPoint(
                key=key, name=key, dataset="d", method="clip-adapter", shots=1, seed=1, weights="random"
            ),
            0,
        )
    rec.finish("a", {"alpha": 0.2}, {"val_acc": 0.5, "test_acc": 0.5}, [1.0], {}, source, 1)
    rec.fail("c", "worker died")
    assert rec.finished(["a", "b", "c"]) == ["a"]
    assert rec.drain() == {}  # written by the recorder's writer thread
    # a resumed sweep's recorder reads the same from the store
    assert Recorder(uri, exp_id, parent, "s").finished(["c", "b", "a"]) == ["a"]
