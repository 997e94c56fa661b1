"""What MLflow, Ray and Typer users expect of ca-flow: a sweep file, scriptable output, Typer's own
conventions, no heavy import before an argument is checked, and runs MLflow's UI can compare.

One small real sweep (the real CLI, in its own process, on the real textile images) is shared by the
module; everything else reads or drives that store through CliRunner and the real CLI. Oracles come
from what MLflow holds, read with MLflow's own client or its REST API.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import copy_features
from procs import CA_FLOW, clean_env, forked_cli, mlflow_server, run_cli
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from workflows.cli import app
from workflows.grid import build_spec, grid

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SHOTS, SEEDS, ALPHAS = [1, 2], [1, 2], [0.2, 0.6]
TRIALS = len(SHOTS) * len(SEEDS) * len(ALPHAS) + len(SEEDS)  # CLIP-Adapter grid + zero-shot once per seed
SWEEP = [
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
    "1,2",
    "--alphas",
    "0.2,0.6",
    "--augment-views",
    "2",
    "--epochs",
    "3",
    "--experiment",
    "demo",
]
HEAVY = ("torch", "ray", "mlflow")


@pytest.fixture(scope="module")
def store(tmp_path_factory, textile_features):
    """The README demo's shape, small: one sweep into experiment `demo`, by the real CLI."""
    work = tmp_path_factory.mktemp("ux")
    env = clean_env(work / "home")
    args = SWEEP + ["--cache-dir", str(copy_features(textile_features, work / "cache"))]
    done = run_cli(args, env, work, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import mlflow

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return dict(
        work=work,
        env=env,
        uri=uri,
        client=client,
        exp=exp,
        parent=parent,
        children=children,
        args=args,
        sweep_id=parent.data.tags["ca_flow.sweep_id"],
        stdout=done.stdout,
    )


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """In-process commands run in an empty folder: no ./mlflow.db to fall back on, nothing left behind,
    and none of the variables the CLI reads (mlflow.set_tracking_uri, called in-process by an earlier
    command, exports MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "CA_FLOW_DATA_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def invoke(args, env=None):
    return runner.invoke(app, args, env=env, prog_name="ca-flow")


def one_document(stdout: str):
    """stdout is one JSON document and nothing else (json.loads refuses anything before or after it)."""
    assert stdout.strip()[:1] in ("{", "["), stdout[:500]
    return json.loads(stdout)


# -- --config: a sweep file ---------------------------------------------------------------------------


def test_config_lists_as_arrays_and_flags_override(elsewhere):
    config = elsewhere / "sweep.toml"
    config.write_text(
        f'datasets = ["textile"]\nbackbone = "{TINY}"\npretrained = "random"\nshots = [1, 2]\n'
        'seeds = [1, 2, 3]\nalphas = [0.2, 0.6]\nmethods = ["clip-adapter", "zero-shot"]\n'
        'augment_views = 2\nexperiment = "from-file"\n'
    )
    result = invoke(
        [
            "sweep",
            "--config",
            str(config),
            "--seeds",
            "7",
            "--dry-run",
            "--json",
            "--cache-dir",
            str(elsewhere / "cache"),
        ]
    )
    assert result.exit_code == 0, result.output + result.stderr
    plan = one_document(result.stdout)
    spec = plan["spec"]
    assert spec["shots"] == [1, 2] and spec["alphas"] == [0.2, 0.6] and spec["augment_views"] == 2  # the file
    assert spec["seeds"] == [7] and spec["experiment"] == "from-file"  # the flag wins over the file
    assert plan["trials"] == 2 * 2 * 1 + 1 and plan["per_dataset"] == {
        "textile": {"clip-adapter": 4, "zero-shot": 1}
    }


def test_config_unknown_key_is_an_error_naming_it(elsewhere):
    config = elsewhere / "sweep.toml"
    config.write_text('datasets = "textile"\naugment-views = 2\n')
    result = invoke(["sweep", "--config", str(config), "--dry-run"])
    assert result.exit_code != 0
    (line,) = result.stderr.strip().splitlines()
    assert (
        line.startswith(f"error: config file {config}: unknown key 'augment-views'")
        and "augment_views" in line
    )
    assert not (elsewhere / "mlflow.db").exists()


@pytest.mark.slow
def test_logged_sweep_toml_reproduces_the_grid(store, elsewhere):
    client, parent = store["client"], store["parent"]
    assert "sweep.toml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    logged = Path(client.download_artifacts(parent.info.run_id, "sweep.toml", str(elsewhere)))
    again = invoke(["sweep", "--config", str(logged), "--dry-run", "--json"])
    first = invoke(store["args"] + ["--dry-run", "--json"])
    assert again.exit_code == 0 and first.exit_code == 0, again.stderr + first.stderr
    a, b = one_document(again.stdout), one_document(first.stdout)
    assert a["trials"] == b["trials"] == TRIALS and a["per_dataset"] == b["per_dataset"]
    assert a["spec"] == json.loads(parent.data.tags["ca_flow.spec"])  # the spec the sweep ran, resolved
    # the flags again here differ only where the default comes from this process (its HOME)
    assert {k: v for k, v in a["spec"].items() if k != "data_root"} == {
        k: v for k, v in b["spec"].items() if k != "data_root"
    }
    assert a["images"]["textile"]["to_encode"] == 0  # the same feature store: nothing to encode again
    # The same trial keys as the runs the sweep made: `ca-flow sweep --config` of the file finds them.
    keys = {t.key for t in grid(build_spec(logged, {}), ["textile"])}
    assert keys == {r.data.tags["ca_flow.trial_key"] for r in store["children"]}


def test_shipped_examples_parse_and_validate():
    demo = build_spec(ROOT / "examples" / "demo.toml", {})
    assert (demo.datasets, demo.backbone, demo.pretrained, demo.experiment) == (
        "textile",
        TINY,
        "random",
        "demo",
    )
    assert (
        demo.shots == [1, 2, 4, 8] and demo.seeds == [1, 2] and demo.alphas == [0.2, 0.6]
    )  # scripts/demo.sh's
    paper = build_spec(ROOT / "examples" / "paper.toml", {})
    from clip_adapter.datasets import REGISTRY
    from clip_adapter.methods import NAMES
    from workflows.report import ALL_11, comparable_to_paper

    names = paper.datasets.split(",")
    assert len(names) == 11 and set(names) == set(ALL_11) and set(names) <= set(REGISTRY)
    assert (
        paper.shots == [1, 2, 4, 8, 16]
        and paper.seeds == [1, 2, 3]
        and sorted(paper.methods) == sorted(NAMES)
    )
    assert comparable_to_paper(paper.backbone, paper.pretrained) is None  # `report --paper` compares it
    assert paper.epochs is None  # CoOp's schedule by shots


def test_demo_toml_dry_runs(elsewhere):
    result = invoke(
        [
            "sweep",
            "--config",
            str(ROOT / "examples" / "demo.toml"),
            "--dry-run",
            "--json",
            "--cache-dir",
            str(elsewhere / "cache"),
        ]
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert one_document(result.stdout)["per_dataset"] == {"textile": {"clip-adapter": 16, "zero-shot": 2}}


# -- --json: one document on stdout, nothing else there ------------------------------------------------


@pytest.fixture(scope="module")
def promoted(store):
    result = runner.invoke(app, ["promote", "--tracking-uri", store["uri"], "--json"], prog_name="ca-flow")
    assert result.exit_code == 0, result.output + result.stderr
    return dict(store, promote=result.stdout)


def textile_image() -> str:
    import conformal_clip_data

    return str(conformal_clip_data.local_dir() / "textile_0001.jpg")


def json_args(verb, s, out: Path, colour_root: Path) -> list[str]:
    uri = ["--tracking-uri", s["uri"]]
    return {
        "datasets": ["datasets", "--data-root", str(colour_root)],
        "sweeps": ["sweeps", *uri],
        "status": ["status", *uri],
        "promote": ["promote", "--dry-run", *uri],
        "predict": ["predict", "--dataset", "textile", *uri, textile_image()],
        "report": ["report", *uri, "--out", str(out)],
        "sweep --dry-run": s["args"] + ["--dry-run"],
    }[verb] + ["--json"]


def check_document(verb, doc, s, colour_root):
    """What each verb's document says, against the store (a few facts each)."""
    if verb == "datasets":
        assert doc["data_root"] == str(colour_root)
        assert {"colours", "textile"} <= {d["name"] for d in doc["datasets"]}
    elif verb == "sweeps":
        (row,) = doc
        assert (row["sweep_id"], row["experiment"], row["status"]) == (s["sweep_id"], "demo", "finished")
        assert row["finished"] == row["total"] == TRIALS and row["parent_run_id"] == s["parent"].info.run_id
    elif verb == "status":
        assert doc["sweep_id"] == s["sweep_id"] and doc["datasets"]["textile"]["finished"] == TRIALS
    elif verb == "promote":
        assert doc["experiment"] == "demo"  # no --experiment: the latest sweep's
        (p,) = doc["promotions"]
        assert p["dataset"] == "textile" and 0 <= p["val_acc"] <= 1 and 0 <= p["test_acc"] <= 1  # fractions
    elif verb == "predict":
        (p,) = doc["predictions"]
        assert doc["model"] == "clip-adapter-textile@champion" and len(p["top"]) == 3
        assert all(0 <= t["score"] <= 1 for t in p["top"])
    elif verb == "report":
        assert doc["sweep_id"] == s["sweep_id"] and doc["unit"] == "test accuracy, %"
        assert {(r["method"], r["shots"]) for r in doc["rows"]} == {
            (m, k) for m in ("clip-adapter", "zero-shot") for k in SHOTS
        }
        assert all(isinstance(r["mean"], float) and r["n_seeds"] == len(SEEDS) for r in doc["rows"])
    elif verb == "sweep --dry-run":
        assert doc["trials"] == TRIALS and doc["spec"]["experiment"] == "demo"


VERBS = ["datasets", "sweeps", "status", "promote", "predict", "report", "sweep --dry-run"]


@pytest.mark.slow
@pytest.mark.parametrize("verb", VERBS)
def test_json_through_clirunner(verb, promoted, colour_root, elsewhere):
    result = invoke(json_args(verb, promoted, elsewhere / "report", colour_root))
    assert result.exit_code == 0, result.output + result.stderr
    check_document(verb, one_document(result.stdout), promoted, colour_root)


@pytest.mark.slow
@pytest.mark.parametrize("verb", VERBS)
def test_json_through_the_real_cli(verb, promoted, colour_root, elsewhere):
    """The real process: nothing that writes to the file descriptor directly (a library, a progress bar)
    may land on stdout either."""
    done = run_cli(json_args(verb, promoted, elsewhere / "report", colour_root), promoted["env"], elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    check_document(verb, one_document(done.stdout), promoted, colour_root)


@pytest.mark.slow
def test_promote_json_is_one_document(promoted):
    doc = one_document(promoted["promote"])
    assert doc["dry_run"] is False and doc["promotions"][0]["action"].startswith("new")


# -- Typer's conventions -----------------------------------------------------------------------------


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.stdout == f"ca-flow {version('ca-flow')}\n"
    done = subprocess.run([CA_FLOW, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"ca-flow {version('ca-flow')}\n"


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["sweep", "-h"], ["report", "-h"], ["predict", "-h"]])
def test_short_help_on_the_app_and_its_commands(args):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "Usage: ca-flow" in result.stdout and "-h" in result.stdout


def flat(text: str) -> str:
    """Rich's help boxes and wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_completion_is_on():
    text = flat(invoke(["-h"]).stdout)
    assert "--install-completion" in text and "--show-completion" in text
    # Typer finds the shell by walking up the process tree (shellingham), as it will for a user typing
    # this in bash; "&& true" keeps bash from exec-ing the command in its own place.
    done = subprocess.run(
        ["bash", "-c", f"{CA_FLOW} --show-completion && true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "_CA_FLOW_COMPLETE" in done.stdout


def test_environment_variables_are_typer_envvars():
    from typer.main import get_command

    commands = get_command(app).commands
    envvars = {(name, p.name): p.envvar for name, c in commands.items() for p in c.params if p.envvar}
    assert envvars[("sweep", "data_root")] == "CA_FLOW_DATA_ROOT"
    assert envvars[("datasets", "data_root")] == "CA_FLOW_DATA_ROOT"
    assert envvars[("sweep", "address")] == envvars[("resume", "address")] == "RAY_ADDRESS"
    for name in ("sweep", "resume", "sweeps", "status", "report", "promote", "predict"):
        assert envvars[(name, "tracking_uri")] == "MLFLOW_TRACKING_URI", name
    for name in ("sweep", "resume", "sweeps", "report", "promote"):
        assert envvars[(name, "experiment")] == "MLFLOW_EXPERIMENT_NAME", name
    text = flat(invoke(["sweep", "-h"], env={"COLUMNS": "200"}).stdout)  # wide: no name folded in two
    for var in ("CA_FLOW_DATA_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS"):
        assert f"[env var: {var}]" in text, var


def test_sweep_help_shows_the_defaults():
    # Help strings carry the defaults the spec fills in; rich markup must not eat "[default: ...]".
    text = flat(invoke(["sweep", "-h"], env={"COLUMNS": "200"}).stdout)
    for default in (
        "[default: all]",
        "[default: 1,2,4,8,16]",
        "[default: 1,2,3]",
        "[default: clip-adapter,zero-shot]",
        "[default: 0.2,0.4,0.6,0.8]",
        "[default: RN50-quickgelu]",
        "[default: openai]",
        "[default: 10]",
        "[default: ca-flow]",
    ):
        assert default in text, default


@pytest.mark.slow
def test_mlflow_tracking_uri_and_experiment_name_are_honoured(store):
    env = {"MLFLOW_TRACKING_URI": store["uri"]}
    rows = one_document(invoke(["sweeps", "--json"], env=env).stdout)  # no ./mlflow.db here: the env's store
    assert [r["sweep_id"] for r in rows] == [store["sweep_id"]]
    rows = one_document(invoke(["sweeps", "--json"], env=dict(env, MLFLOW_EXPERIMENT_NAME="demo")).stdout)
    assert len(rows) == 1
    result = invoke(["sweeps", "--json"], env=dict(env, MLFLOW_EXPERIMENT_NAME="nope"))
    assert result.exit_code == 1 and "no experiment 'nope'" in result.stderr and not result.stdout
    result = invoke(
        ["promote", "--dry-run"], env=dict(env, MLFLOW_EXPERIMENT_NAME="nope")
    )  # over the latest sweep
    assert result.exit_code == 1 and "no experiment 'nope'" in result.stderr
    result = invoke([*store["args"], "--dry-run", "--json"], env=dict(env, MLFLOW_EXPERIMENT_NAME="from-env"))
    assert one_document(result.stdout)["spec"]["experiment"] == "demo"  # the flag wins over the variable
    args = [a for a in store["args"] if a not in ("--experiment", "demo")]
    result = invoke([*args, "--dry-run", "--json"], env=dict(env, MLFLOW_EXPERIMENT_NAME="from-env"))
    assert one_document(result.stdout)["spec"]["experiment"] == "from-env"


def test_ca_flow_data_root_is_honoured(colour_root, elsewhere):
    env = {"CA_FLOW_DATA_ROOT": str(colour_root)}
    doc = one_document(invoke(["datasets", "--json"], env=env).stdout)
    assert doc["data_root"] == str(colour_root) and "colours" in {d["name"] for d in doc["datasets"]}
    result = invoke(
        [
            "sweep",
            "--datasets",
            "colours",
            "--backbone",
            TINY,
            "--pretrained",
            "random",
            "--shots",
            "1",
            "--seeds",
            "1",
            "--alphas",
            "0.2",
            "--cache-dir",
            str(elsewhere / "cache"),
            "--dry-run",
            "--json",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.stderr
    plan = one_document(result.stdout)
    assert plan["spec"]["data_root"] == str(colour_root) and plan["per_dataset"] == {
        "colours": {"clip-adapter": 1, "zero-shot": 1}
    }


def test_ray_address_is_honoured(elsewhere):
    result = invoke(
        [
            "sweep",
            "--datasets",
            "textile",
            "--backbone",
            TINY,
            "--pretrained",
            "random",
            "--shots",
            "1",
            "--seeds",
            "1",
            "--alphas",
            "0.2",
            "--cache-dir",
            str(elsewhere / "cache"),
        ],
        env={"RAY_ADDRESS": "ray://127.0.0.1:10001"},
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "error: --address ray://127.0.0.1:10001: Ray Client (ray://) cannot run Tune"
    )
    assert not (elsewhere / "mlflow.db").exists()


@pytest.mark.slow
def test_report_and_promote_without_experiment_use_the_latest_sweeps(store, elsewhere):
    # The sweep went to `--experiment demo`; the default experiment `ca-flow` does not exist in this store.
    assert store["client"].get_experiment_by_name("ca-flow") is None
    result = invoke(["report", "--tracking-uri", store["uri"], "--out", str(elsewhere / "r")])
    assert result.exit_code == 0, result.stderr
    assert f"sweep {store['sweep_id']}" in flat(result.stdout)
    result = invoke(["promote", "--tracking-uri", store["uri"], "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "in demo" in flat(result.stdout)
    # and the real CLI in the store's own folder, as after the README demo
    for args in (["report", "--out", str(elsewhere / "r2")], ["promote", "--dry-run"]):
        done = run_cli(args, store["env"], store["work"])
        assert done.returncode == 0, done.stderr[-2000:]


# -- no heavy import before the arguments are checked -------------------------------------------------


def probe(args, cwd, env=None):
    """(exit code, heavy modules loaded, stderr) of the real CLI in a fresh process: one of the
    module's batch (`probed`), all answered by forks of one process that imported only the CLI."""
    return PROBED[json.dumps([args, env or {}])]


PROBED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def probed(tmp_path_factory, colour_root):
    cwd = tmp_path_factory.mktemp("probes")
    (cwd / "typo.toml").write_text("augment-views = 2\n")
    cases = [[args, {}] for args, _ in ARGUMENT_ERRORS] + [
        [args, {"CA_FLOW_DATA_ROOT": str(colour_root)}] for args in LIGHT
    ]
    PROBED.update(zip(map(json.dumps, cases), forked_cli([(args, env) for args, env in cases], cwd, HEAVY)))


ARGUMENT_ERRORS = [
    (["sweep", "--shots", "0"], "shots must be >= 1"),
    (["sweep", "--alphas", "0.2,1.5"], "alpha 1.5 is outside [0, 1]"),
    (["sweep", "--backbone", "no-such-model"], "unknown backbone 'no-such-model'"),
    (["sweep", "--epochs", "many"], "Invalid value for '--epochs'"),
    (["sweep", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["sweep", "--config", "typo.toml"], "unknown key 'augment-views'"),
    (["sweep", "--tracking-uri", "ftp://nowhere"], "is not one ca-flow can use"),
    (["report", "--bogus"], "No such option: --bogus"),
    (["report", "--sweep", "last-week"], "'last-week' is not a sweep id"),
    (["status", "last-week"], "'last-week' is not a sweep id"),
    (["resume", "--max-retries", "-1"], "--max-retries must be >= 0"),
    (["promote", "--alias", "latest"], "is not a registry alias"),
    (["promote", "--methods", "cocoop"], "unknown method 'cocoop'"),
    (["predict", "--dataset", "textile", "missing.jpg"], "cannot read image missing.jpg"),
    (["sweeps"], "no MLflow store at"),
]
LIGHT = [["datasets"], ["datasets", "--json"], ["--version"], ["-h"], ["sweep", "-h"]]


@pytest.mark.parametrize("args,message", ARGUMENT_ERRORS)
def test_argument_errors_answer_before_torch_ray_or_mlflow_load(args, message):
    code, loaded, stderr = probe(args, None)
    assert code not in (0, None), stderr
    assert message in stderr and stderr.startswith("error: "), stderr
    assert loaded == [], f"{args} loaded {loaded} before answering"


@pytest.mark.parametrize("args", LIGHT)
def test_datasets_version_and_help_load_no_torch_ray_or_mlflow(args, colour_root):
    code, loaded, stderr = probe(args, None, {"CA_FLOW_DATA_ROOT": str(colour_root)})
    assert code in (0, None), stderr
    assert loaded == [], f"{args} loaded {loaded}"


# -- what MLflow holds --------------------------------------------------------------------------------


@pytest.mark.slow
def test_experiment_is_set_up_for_model_training(store):
    assert store["exp"].tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_every_trial_run_has_its_dataset_input(store):
    import conformal_clip_data

    digests = set()
    for run in store["children"]:
        (inp,) = run.inputs.dataset_inputs
        d = inp.dataset
        assert d.name == run.data.params["dataset"] == "textile"
        assert re.fullmatch(r"[0-9a-f]{12}", d.digest), d.digest
        assert Path(conformal_clip_data.local_dir()).resolve().is_relative_to(Path(d.source).resolve())
        assert d.source_type == "local"
        digests.add(d.digest)
    assert len(digests) == 1  # the digest of the split, the same for every trial of the dataset


@pytest.mark.slow
def test_counts_are_params_and_trial_seconds_is_a_metric_within_the_run(store):
    for run in store["children"]:
        p, m = run.data.params, run.data.metrics
        assert {"n_train", "n_val", "n_test"} <= set(p) and not {"n_train", "n_val", "n_test"} & set(m)
        assert (
            int(p["n_train"]) == int(p["shots"]) * 3 and int(p["n_val"]) == min(int(p["shots"]), 4) * 3
        )  # 3 classes
        assert int(p["n_test"]) == 600
        duration = (run.info.end_time - run.info.start_time) / 1000
        assert 0 < m["trial_seconds"] <= duration, (m["trial_seconds"], duration)  # one clock: no slack


@pytest.mark.slow
def test_trial_runs_start_when_their_trial_starts(store):
    parent, children = store["parent"], store["children"]
    starts = sorted(r.info.start_time for r in children)
    assert all(s >= parent.info.start_time for s in starts)
    # Were every run made when the sweep started, all would start before any ended; with 2 trial slots
    # and 10 trials, later trials' runs start after earlier ones have finished.
    first_end = min(r.info.end_time for r in children)
    assert starts[-1] >= first_end, (starts, first_end)
    assert len(set(starts)) > len(starts) // 2


@pytest.mark.slow
def test_parent_params_are_plain_grid_strings_that_no_child_shares(store):
    pp = store["parent"].data.params
    assert pp and all(k.startswith("grid.") for k in pp), sorted(pp)
    assert not any("[" in v or v == "None" or "'" in v for v in pp.values()), pp
    assert pp["grid.shots"] == "1,2" and pp["grid.seeds"] == "1,2" and pp["grid.alphas"] == "0.2,0.6"
    assert pp["grid.datasets"] == "textile" and pp["grid.trials"] == str(TRIALS) and pp["grid.epochs"] == "3"
    child_params = set().union(*(r.data.params for r in store["children"]))
    assert not set(pp) & child_params


@pytest.mark.slow
def test_parent_summary_metrics_are_the_best_val_and_its_test(store):
    metrics = store["parent"].data.metrics
    for method in ("clip-adapter", "zero-shot"):
        mine = [r for r in store["children"] if r.data.params["method"] == method]
        best_val = max(r.data.metrics["val_acc"] for r in mine)
        assert metrics[f"best_val_acc.textile.{method}"] == best_val
        tests = {r.data.metrics["test_acc"] for r in mine if r.data.metrics["val_acc"] == best_val}
        assert metrics[f"best_test_acc.textile.{method}"] in tests  # the test_acc of a val-best run
    assert metrics["trials_finished"] == TRIALS


@pytest.mark.slow
def test_parent_description_has_the_command_and_the_table(store):
    note = store["parent"].data.tags["mlflow.note.content"]
    assert "ca-flow sweep" in note and "--alphas 0.2,0.6" in note and "--experiment demo" in note
    assert "| dataset | clip-adapter | zero-shot |" in note and "| textile | 8 | 2 |" in note
    assert "sweep.toml" in note


@pytest.mark.slow
def test_accuracies_are_fractions_in_mlflow(store):
    for run in [store["parent"], *store["children"]]:
        for key, value in run.data.metrics.items():
            if "acc" in key:
                assert 0.0 <= value <= 1.0, (run.info.run_name, key, value)
    assert any(r.data.metrics["val_acc"] > 0 for r in store["children"])


# -- the MLflow server and its UI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server")
    work = store["work"]
    with mlflow_server(work / "mlflow.db", work / "mlartifacts", logs, store["env"], logs) as (url, _):
        yield url


def rest(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + path,
        json.dumps(body).encode() if body is not None else None,
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_rest_api_shows_the_kind_the_tree_and_the_columns(store, server):
    exp = rest(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = rest(
        server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
    )
    runs = runs["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
    assert [p["info"]["run_name"] for p in parents] == [f"sweep-{store['sweep_id']}"]
    parent_id = parents[0]["info"]["run_id"]
    children = [r for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id]
    assert len(children) == len(runs) - 1 == TRIALS
    for r in children:
        params = {p["key"] for p in r["data"]["params"]}
        metrics = {m["key"] for m in r["data"]["metrics"]}
        assert {"dataset", "method", "shots", "seed", "n_train"} <= params
        assert {"val_acc", "test_acc", "trial_seconds"} <= metrics
        (inp,) = r["inputs"]["dataset_inputs"]
        assert inp["dataset"]["name"] == "textile" and len(inp["dataset"]["digest"]) == 12
    p = parents[0]["data"]
    assert {"grid.shots", "grid.alphas"} <= {x["key"] for x in p["params"]}
    summary = {"best_val_acc.textile.clip-adapter", "best_test_acc.textile.clip-adapter"}
    assert summary <= {x["key"] for x in p["metrics"]}
