"""The sweep's grid: its spec (defaults <- sweep.toml <- flags), the lists, the file it writes, and
one trial per grid point with a key that stays the same for the same point."""

import json
import subprocess
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest

from workflows.grid import SweepError, SweepSpec, build_spec, counts, grid, parse_list, read_config

TINY = dict(backbone="ca-flow-tiny", pretrained="random")
ROOT = Path(__file__).resolve().parents[1]


def toml(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_axes_per_method_and_variant():
    spec = SweepSpec(
        shots=[1, 16],
        seeds=[1, 2],
        alphas=[0.2, 0.6],
        betas=[0.1, 0.5],
        adapter=["visual", "text", "both"],
        methods=["clip-adapter", "zero-shot", "tip-adapter"],
        **TINY,
    )
    trials = grid(spec, ["d"])
    by = Counter((t.method, t.hparams.get("variant")) for t in trials)
    # visual: alphas only; text: betas only; both: alphas x betas; each x shots x seeds
    assert by == {
        ("clip-adapter", "visual"): 2 * 2 * 2,
        ("clip-adapter", "text"): 2 * 2 * 2,
        ("clip-adapter", "both"): 4 * 2 * 2,
        ("zero-shot", None): 2,
        ("tip-adapter", None): 2 * 2,
    }
    assert len({t.key for t in trials}) == len(trials)  # every trial has its own identity
    assert {t.hparams["epochs"] for t in trials if t.method == "clip-adapter" and t.shots == 1} == {50}
    assert {t.hparams["epochs"] for t in trials if t.method == "clip-adapter" and t.shots == 16} == {200}
    assert grid(spec, ["d"]) == trials  # keys are stable: a resumed sweep finds its runs


def test_unknown_method_is_refused():
    with pytest.raises(SweepError, match="unknown method 'cocoop'"):
        SweepSpec(methods=["cocoop"], backbone="ca-flow-tiny").validate()


# -- the spec: defaults <- file <- flags ----------------------------------------------------------------


def test_defaults_then_file_then_flags(tmp_path):
    path = toml(
        tmp_path,
        'backbone = "ca-flow-tiny"\npretrained = "random"\nshots = [1, 2]\nseeds = [5]\n'
        'experiment = "from-file"\nlr = 0.01\nallow_fewer_shots = true\n',
    )
    flags = dict(shots="4,8", lr=None, experiment=None, epochs=3)  # None: a flag not given
    spec = build_spec(path, flags)
    assert spec.shots == [4, 8]  # the flag wins over the file
    assert spec.seeds == [5] and spec.lr == 0.01  # the file, where no flag is given
    assert spec.experiment == "from-file" and spec.allow_fewer_shots is True
    assert spec.epochs == 3  # a flag the file does not set
    default = SweepSpec()
    assert spec.alphas == default.alphas and spec.methods == default.methods and spec.augment_views == 10
    assert build_spec(None, dict(flags, **TINY)).seeds == default.seeds  # no file: defaults <- flags


def test_every_flag_of_ca_flow_sweep_is_a_key_of_the_file():
    from typer.main import get_command

    from workflows.cli import app

    sweep = get_command(app).commands["sweep"]
    options = {p.name for p in sweep.params} - {
        "config",
        "tracking_uri",
        "address",
        "dry_run",
        "submit",
        "sweep_id",
        "as_json",
    }
    assert options == {f.name for f in fields(SweepSpec)}
    for p in sweep.params:  # the key is the flag with underscores
        if p.name in options:
            assert f"--{p.name.replace('_', '-')}" in p.opts


def test_lists_parse_dedupe_and_keep_their_types(tmp_path):
    assert parse_list("1, 2,2,4,", int, "shots") == [1, 2, 4]
    assert parse_list("0.2,0.20,0.6", float, "alphas") == [0.2, 0.6]
    assert parse_list([1, 0], float, "alphas") == [1.0, 0.0] and all(
        type(a) is float for a in parse_list([1, 0], float, "alphas")
    )
    assert parse_list("clip-adapter, zero-shot,clip-adapter", str, "methods") == ["clip-adapter", "zero-shot"]
    with pytest.raises(SweepError, match="--shots expects comma-separated ints, e.g. --shots 1,2,4"):
        parse_list("one", int, "shots")
    with pytest.raises(SweepError, match="seeds in the config expects integers"):
        build_spec(toml(tmp_path, "seeds = [1.5]\n"), TINY)
    spec = build_spec(
        toml(
            tmp_path,
            'shots = [2, 1, 2]\nalphas = [0, 1]\nmethods = ["zero-shot", "zero-shot"]\n'
            'datasets = ["eurosat", "dtd", "eurosat"]\n',
        ),
        TINY,
    )
    assert spec.shots == [2, 1] and spec.alphas == [0.0, 1.0] and spec.methods == ["zero-shot"]
    assert spec.datasets == "eurosat,dtd"  # an array, like every list key; the flag's comma form inside


def test_unknown_key_and_wrong_types_are_named(tmp_path):
    with pytest.raises(SweepError, match="unknown key 'augment-views'.*augment_views"):
        read_config(toml(tmp_path, "augment-views = 2\n"))
    with pytest.raises(SweepError, match="epochs expects an integer"):
        build_spec(toml(tmp_path, 'epochs = "ten"\n'), TINY)
    with pytest.raises(SweepError, match="lr expects a number"):
        build_spec(toml(tmp_path, 'lr = "fast"\n'), TINY)
    with pytest.raises(SweepError, match="not valid TOML"):
        read_config(toml(tmp_path, "shots = [1, 2\n"))
    with pytest.raises(SweepError, match="does not exist"):
        read_config(tmp_path / "missing.toml")
    with pytest.raises(SweepError, match="alpha 1.5 is outside"):  # the file is validated as flags are
        build_spec(toml(tmp_path, "alphas = [0.2, 1.5]\n"), TINY)


def resolved(tmp_path, **flags):
    return build_spec(None, dict(TINY, **flags))


@pytest.mark.parametrize(
    "flags",
    [
        {},
        dict(
            datasets="textile,colours",
            shots="1,2",
            seeds="3",
            alphas="0.2,0.6",
            epochs=3,
            augment_views=2,
            methods="clip-adapter,zero-shot,tip-adapter-f",
            adapter="visual,both",
            betas="0.1,0.3",
            lr=0.01,
            allow_fewer_shots=True,
            experiment='it\'s "quoted"',
            cpus_per_trial=0.5,
            data_root="s3://bucket/data",
            cache_dir="~/features",
        ),
    ],
)
def test_to_toml_round_trip(tmp_path, flags):
    spec = resolved(tmp_path, **flags)
    path = toml(tmp_path, spec.to_toml())
    again = build_spec(path, {})
    assert again == spec
    assert grid(again, ["d"]) == grid(spec, ["d"])
    assert again.to_toml() == spec.to_toml()
    text = path.read_text()
    assert "shots = [" in text and "alphas = [" in text  # lists as TOML arrays
    if spec.epochs is None:
        assert "# epochs = (default)" in text
    assert "~" not in spec.cache_dir  # the written spec is resolved: no path left to the reader's HOME


def test_keys_are_stable_across_processes_and_ignore_what_does_not_change_a_result(tmp_path):
    spec = resolved(
        tmp_path, shots="1,2", seeds="1,2", alphas="0.2,0.6", methods="clip-adapter,zero-shot,linear-probe"
    )
    keys = [t.key for t in grid(spec, ["textile"])]
    code = (
        "import json, sys; from workflows.grid import SweepSpec, grid; "
        "spec = SweepSpec.from_record(json.loads(sys.argv[1])); "
        "print(json.dumps([t.key for t in grid(spec, ['textile'])]))"
    )
    for seed in ("0", "123"):  # another interpreter, another str hash seed: the same keys
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec.record())],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            cwd=ROOT,
            check=True,
        )
        assert json.loads(out.stdout) == keys
    # where things run, and under which experiment, is not part of a trial's identity
    moved = resolved(
        tmp_path,
        shots="1,2",
        seeds="1,2",
        alphas="0.2,0.6",
        methods="clip-adapter,zero-shot,linear-probe",
        experiment="elsewhere",
        cache_dir=str(tmp_path / "c"),
        cpus_per_trial=2.0,
        max_retries=0,
    )
    assert [t.key for t in grid(moved, ["textile"])] == keys
    # what changes a result changes the key
    for change in (dict(augment_views=3), dict(epochs=7), dict(lr=0.01), dict(backbone="RN50-quickgelu")):
        other = resolved(
            tmp_path,
            shots="1,2",
            seeds="1,2",
            alphas="0.2,0.6",
            methods="clip-adapter,zero-shot,linear-probe",
            **change,
        )
        assert not set(t.key for t in grid(other, ["textile"]) if t.method == "clip-adapter") & set(keys), (
            change
        )


def test_grid_counts_of_the_papers_grid():
    spec = build_spec(ROOT / "examples" / "paper.toml", {})
    names = spec.datasets.split(",")
    trials = grid(spec, names, weights_id="openai")
    per = counts(trials)
    # per dataset: CLIP-Adapter 5 shots x 4 alphas x 3 seeds; zero-shot once per seed; the rest shots x seeds
    # ... under each of the two protocols
    assert per == {
        d: {
            "clip-adapter": 120,
            "zero-shot": 6,
            "linear-probe": 30,
            "tip-adapter": 30,
            "tip-adapter-f": 30,
            "gda": 30,
        }
        for d in names
    }
    assert len(trials) == 11 * 246 == len({t.key for t in trials})
    assert {t.shots for t in trials if t.method == "zero-shot"} == {16}  # validates on the largest K
    assert Counter(t.hparams["epochs"] for t in trials if t.method == "clip-adapter") == {
        50: 11 * 12 * 2 + 48,
        100: (11 * 24 - 24) + 11 * 24,
        200: (11 * 24 - 24) + 11 * 24,
    }
    # CoOp's 50/100/200 by shots; released ImageNet 50 at every shots (its 48 trials at 2-16 shots)


def test_grid_counts_of_the_demo_grid():
    spec = build_spec(ROOT / "examples" / "demo.toml", {})
    assert counts(grid(spec, ["textile"])) == {"textile": {"clip-adapter": 4 * 2 * 2, "zero-shot": 2}}
