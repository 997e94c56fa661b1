"""Bad input through the real CLI: one line on stderr that names the fix, exit 1 (2 for usage errors,
as Click does), no traceback, and nothing written: no store, no artifacts, no Ray, no log file.

Errors that come from a real sweep (inside Ray tasks and trials) are in test_hardening.py.
"""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from procs import clean_env
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from workflows.cli import app

runner = CliRunner()
SMALL = ["--backbone", TINY, "--pretrained", "random", "--shots", "1", "--seeds", "1", "--alphas", "0.2"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: enough for a decoder to refuse it as a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad(tmp_path_factory, colour_root):
    """Things a user points ca-flow at by mistake, beside a valid data root."""
    base = tmp_path_factory.mktemp("bad")
    (base / "notes.txt").write_text("not a database\n")
    root = base / "data"
    root.mkdir()
    (root / "colours").symlink_to(colour_root / "colours")
    (root / "broken" / "only-class").mkdir(parents=True)  # one class folder: not a dataset
    images = colour_root / "colours"
    shutil.copy(images / "red" / "red_000.png", root / "broken" / "only-class" / "a.png")
    for name in ("red", "blue"):  # a class tree whose CoOp split file is not one
        (root / "badsplit" / name).mkdir(parents=True)
        shutil.copy(images / name / f"{name}_000.png", root / "badsplit" / name / "x.png")
    (root / "badsplit" / "split_mine.json").write_text("{not json")
    (base / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 megapixels
    (base / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return base


def sweep(bad, *extra):
    return ["sweep", "--datasets", "colours", "--data-root", str(bad / "data"), *SMALL, *extra]


# (id, args given `bad` (the fixture's folder), exit code, what the one line says)
CASES = [
    (
        "tracking-uri-scheme",
        lambda b: sweep(b, "--tracking-uri", "foo://bar"),
        1,
        "error: tracking URI 'foo://bar' is not one ca-flow can use; pass sqlite:///path/mlflow.db",
    ),
    (
        "tracking-uri-bare-word",
        lambda b: sweep(b, "--tracking-uri", "bare"),
        1,
        "error: tracking URI 'bare' is not one ca-flow can use",
    ),
    (
        "tracking-uri-text-file",
        lambda b: sweep(b, "--tracking-uri", f"sqlite:///{b / 'notes.txt'}"),
        1,
        "is not an SQLite database; move it away or pass another --tracking-uri",
    ),
    (
        "sweeps-on-text-file",
        lambda b: ["sweeps", "--tracking-uri", f"sqlite:///{b / 'notes.txt'}"],
        1,
        "is not an SQLite database",
    ),
    (
        "report-on-text-file",
        lambda b: ["report", "--tracking-uri", f"sqlite:///{b / 'notes.txt'}"],
        1,
        "is not an SQLite database",
    ),
    (
        "tracking-folder-missing",
        lambda b: sweep(b, "--tracking-uri", f"sqlite:///{b / 'nowhere' / 'm.db'}"),
        1,
        "for the SQLite tracking store does not exist",
    ),
    (
        "unreachable-server",
        lambda b: sweep(b, "--tracking-uri", "http://127.0.0.1:9"),
        1,
        "MLflow tracking server http://127.0.0.1:9 is unreachable",
    ),
    (
        "seeds-negative",
        lambda b: sweep(b, "--seeds", "-1"),
        1,
        "error: seeds must be in 0..4294967295, got -1",
    ),
    (
        "shots-above-class",
        lambda b: sweep(b, "--shots", "500"),
        1,
        "error: colours: class 'blue' has 10 train images, fewer than --shots 500; lower --shots, or pass "
        "--allow-fewer-shots",
    ),
    ("shots-zero", lambda b: sweep(b, "--shots", "0,1"), 1, "shots must be >= 1"),
    ("shots-not-int", lambda b: sweep(b, "--shots", "one"), 1, "--shots expects comma-separated ints"),
    ("alpha-above-1", lambda b: sweep(b, "--alphas", "0.2,1.5"), 1, "alpha 1.5 is outside [0, 1]"),
    ("alpha-negative", lambda b: sweep(b, "--alphas", "-0.1"), 1, "alpha -0.1 is outside [0, 1]"),
    ("augment-views-zero", lambda b: sweep(b, "--augment-views", "0"), 1, "--augment-views must be >= 1"),
    (
        "unknown-backbone",
        lambda b: sweep(b, "--backbone", "no-such-model"),
        1,
        "unknown backbone 'no-such-model'",
    ),
    ("unknown-method", lambda b: sweep(b, "--methods", "clip-adapter,nope"), 1, "unknown method 'nope'"),
    (
        "weights-file-missing",
        lambda b: sweep(b, "--pretrained", str(b / "no.pt")),
        1,
        "weights file {b}/no.pt does not exist; pass an existing file",
    ),
    (
        "results-dir-is-file",
        lambda b: sweep(b, "--results-dir", str(b / "notes.txt")),
        1,
        "--results-dir {b}/notes.txt is a file, not a folder",
    ),
    (
        "cache-dir-is-file",
        lambda b: sweep(b, "--cache-dir", str(b / "notes.txt")),
        1,
        "--cache-dir {b}/notes.txt is a file, not a folder",
    ),
    (
        "data-root-is-file",
        lambda b: sweep(b, "--data-root", str(b / "notes.txt")),
        1,
        "data root {b}/notes.txt is a file, not a folder; pass the folder",
    ),
    (
        "data-root-missing",
        lambda b: sweep(b, "--datasets", "all", "--data-root", str(b / "nowhere")),
        1,
        "data root {b}/nowhere does not exist; create it or pass --data-root DIR",
    ),
    (
        "datasets-data-root-is-file",
        lambda b: ["datasets", "--data-root", str(b / "notes.txt")],
        1,
        "is a file, not a folder",
    ),
    ("unknown-dataset", lambda b: sweep(b, "--datasets", "nope"), 1, "unknown dataset 'nope'"),
    (
        "named-broken-dataset",
        lambda b: sweep(b, "--datasets", "broken"),
        1,
        "error: dataset broken at {b}/data/broken is not usable: needs at least 2 class folders, found 1",
    ),
    (
        "named-dataset-bad-split",
        lambda b: sweep(b, "--datasets", "colours,badsplit"),
        1,
        "is not a CoOp split",
    ),
    (
        "registered-dataset-missing",
        lambda b: sweep(b, "--datasets", "eurosat"),
        1,
        "dataset eurosat not found at {b}/data/eurosat; expected eurosat/2750/... and eurosat/split_zhou_EuroSAT.json",
    ),
    (
        "config-missing",
        lambda b: sweep(b, "--config", str(b / "no.toml")),
        1,
        "config file {b}/no.toml does not exist",
    ),
    ("submit-without-address", lambda b: sweep(b, "--submit"), 1, "--submit needs --address"),
    ("epochs-not-int", lambda b: sweep(b, "--epochs", "many"), 2, "Invalid value for '--epochs'"),
    ("unknown-option", lambda b: ["sweep", "--shotz", "1"], 2, "No such option: --shotz"),
    ("unknown-command", lambda b: ["swep"], 2, "No such command 'swep'"),
    (
        "report-sweep-id-quote",
        lambda b: ["report", "--sweep", "x'y"],
        1,
        'error: "x\'y" is not a sweep id (they look like 20261127-101500-1a2b3c)',
    ),
    ("report-sweep-id-both-quotes", lambda b: ["report", "--sweep", "a\"b'c\\d"], 1, "is not a sweep id"),
    ("status-sweep-id", lambda b: ["status", "x'y"], 1, "is not a sweep id"),
    ("sweep-id-hidden-flag", lambda b: sweep(b, "--sweep-id", "o'brien\\ünï"), 1, "is not a sweep id"),
    ("resume-sweep-id", lambda b: ["resume", "ünï"], 1, "is not a sweep id"),
    ("resume-max-retries", lambda b: ["resume", "--max-retries", "-1"], 1, "--max-retries must be >= 0"),
    (
        "promote-no-store",
        lambda b: ["promote", "--tracking-uri", f"sqlite:///{b / 'none.db'}"],
        1,
        "error: no MLflow store at {b}/none.db; run `ca-flow sweep` here first",
    ),
    (
        "promote-unknown-method",
        lambda b: ["promote", "--methods", "bogus"],
        1,
        "unknown method 'bogus' in --methods",
    ),
    ("promote-alias-latest", lambda b: ["promote", "--alias", "latest"], 1, "is not a registry alias"),
    (
        "predict-top-k-zero",
        lambda b: ["predict", "--dataset", "colours", "--top-k", "0", str(b / "broken.jpg")],
        2,
        "Invalid value for '--top-k'",
    ),
    (
        "predict-top-k-negative",
        lambda b: ["predict", "--dataset", "colours", "--top-k", "-5", str(b / "broken.jpg")],
        2,
        "Invalid value for '--top-k'",
    ),
    (
        "predict-missing-image",
        lambda b: ["predict", "--dataset", "colours", str(b / "nope.png")],
        1,
        "cannot read image {b}/nope.png: No such file or directory",
    ),
    (
        "predict-undecodable",
        lambda b: ["predict", "--dataset", "colours", str(b / "broken.jpg")],
        1,
        "cannot read image {b}/broken.jpg: cannot decode image",
    ),
    (
        "predict-decompression-bomb",
        lambda b: ["predict", "--dataset", "colours", str(b / "bomb.png")],
        1,
        "cannot read image {b}/bomb.png: refused: Image size (400000000 pixels) exceeds limit",
    ),
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, home):
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_EXPERIMENT_NAME", "CA_FLOW_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for an argument error")

    monkeypatch.setattr("workflows.connect.connect_ray", no_ray)
    return tmp_path


def snapshot(*folders: Path) -> set:
    return {p for f in folders if f.exists() for p in f.rglob("*")}


def logs(home: Path) -> set:
    return set((home / ".cache" / "ca-flow" / "logs").glob("*"))


@pytest.mark.parametrize("case,args,code,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, args, code, says, bad, in_tmp, home):
    argv = args(bad)
    before, logs_before = snapshot(bad, in_tmp), logs(home)
    result = runner.invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    expected = says.format(b=bad)
    assert expected in lines[0], (expected, lines[0])
    assert snapshot(bad, in_tmp) == before, "an argument error wrote files"
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "mlartifacts").exists()
    assert logs(home) == logs_before, "an expected error left a log file"


DRIVER = """
import contextlib, io, json, sys
from workflows.cli import app
HEAVY = ("torch", "ray", "mlflow", "open_clip", "torchvision")
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            app(argv, prog_name="ca-flow")
        except SystemExit as exc:
            out.append([exc.code, err.getvalue(), sorted(m for m in HEAVY if m in sys.modules)])
print(json.dumps(out))
"""


def test_argument_errors_answer_before_torch_ray_or_mlflow_load(bad, tmp_path):
    """In a fresh process, as a user runs it: argument errors leave torch, Ray and MLflow unimported
    (so nothing of theirs started or wrote); the Ray address is checked before Ray starts."""
    argvs = [
        sweep(bad, "--alphas", "2"),
        sweep(bad, "--seeds", "-1"),
        sweep(bad, "--shots", "500"),
        sweep(bad, "--tracking-uri", "bare"),
        sweep(bad, "--tracking-uri", f"sqlite:///{bad / 'notes.txt'}"),
        sweep(bad, "--data-root", str(bad / "notes.txt")),
        sweep(bad, "--datasets", "broken"),
        sweep(bad, "--pretrained", str(bad / "no.pt")),
        ["report", "--sweep", "x'y"],
        ["status", "--tracking-uri", "foo://bar"],
        ["promote", "--methods", "bogus"],
        ["predict", "--dataset", "c", "--top-k", "0", str(bad / "bomb.png")],
        ["predict", "--dataset", "c", str(bad / "bomb.png")],
        sweep(bad, "--address", "ray://head:10001"),
    ]  # last: this one imports Ray (it starts nothing)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        env=clean_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) == len(argvs)
    for argv, (code, err, loaded) in zip(argvs, found):
        assert code in (1, 2) and err.count("\n") == 1 and err.startswith("error: "), (argv, code, err)
        assert "Traceback" not in err
        if argv is not argvs[-1]:
            assert loaded == [], f"{argv} imported {loaded}"
    assert "Ray Client (ray://) cannot run Tune" in found[-1][1] and "mlflow" not in found[-1][2]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_datasets_all_says_what_it_skips_and_why(bad, in_tmp):
    result = runner.invoke(
        app, ["sweep", "--datasets", "all", "--data-root", str(bad / "data"), *SMALL, "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["skipped"]["broken"] == "needs at least 2 class folders, found 1"
    assert "is not a CoOp split" in plan["skipped"]["badsplit"]
    assert "colours" in plan["per_dataset"] and "broken" not in plan["per_dataset"]
    text = runner.invoke(
        app, ["sweep", "--datasets", "all", "--data-root", str(bad / "data"), *SMALL, "--dry-run"]
    )
    assert text.exit_code == 0
    assert "skipping broken: needs at least 2 class folders, found 1" in text.output
    assert "skipping badsplit: " in text.output and "is not a CoOp split" in text.output
    listed = runner.invoke(app, ["datasets", "--data-root", str(bad / "data"), "--json"])
    reasons = {b["name"]: b["reason"] for b in json.loads(listed.stdout)["not_usable"]}
    assert set(reasons) >= {"broken", "badsplit"}


@pytest.fixture
def store(in_tmp):
    from mlflow import MlflowClient

    uri = f"sqlite:///{in_tmp / 'store.db'}"
    client = MlflowClient(uri)
    client.create_experiment("quotes 'n' \"things\"")
    return uri, client


def test_a_store_without_what_is_asked_for_is_one_line(store, colour_root):
    uri, client = store
    image = str(colour_root / "colours" / "red" / "red_000.png")
    cases = [
        (["promote", "--tracking-uri", uri], "error: no sweep in this tracking store"),
        (["promote", "--tracking-uri", uri, "--experiment", "x'y"], 'error: no experiment "x\'y"'),
        (
            ["promote", "--tracking-uri", uri, "--experiment", "quotes 'n' \"things\""],
            "error: experiment 'quotes \\'n\\' \"things\"' has no finished trial runs",
        ),
        (
            ["report", "--tracking-uri", uri, "--experiment", "quotes 'n' \"things\""],
            "error: no sweep in experiment",
        ),
        (["sweeps", "--tracking-uri", uri, "--experiment", 'n"o'], "error: no experiment 'n\"o'"),
        (["status", "--tracking-uri", uri], "error: no sweep in this tracking store"),
        (["resume", "--tracking-uri", uri], "error: no unfinished sweep"),
        (
            ["predict", "--tracking-uri", uri, "--dataset", "o'brien", image],
            "error: no model clip-adapter-o'brien@champion in ",
        ),
    ]
    for argv, says in cases:
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(says), (argv, result.stderr)


def test_an_unexpected_error_is_one_line_and_a_log_file_and_debug_prints_it(store, monkeypatch, home):
    uri, _ = store

    def broken(*_a, **_k):
        raise ZeroDivisionError("something nobody planned for\nsecond line of the cause")

    monkeypatch.setattr("workflows.runs_table.parents", broken)
    result = runner.invoke(app, ["sweeps", "--tracking-uri", uri])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ZeroDivisionError: second line of the cause; full traceback in ")
    assert line.endswith("(ca-flow --debug prints it)")
    log = Path(line.split("full traceback in ")[1].split(" (ca-flow")[0])
    assert log.is_file() and log.is_relative_to(home)
    assert "Traceback" in log.read_text() and "something nobody planned for" in log.read_text()
    debug = runner.invoke(app, ["--debug", "sweeps", "--tracking-uri", uri])
    assert debug.exit_code == 1
    assert debug.stderr.startswith("Traceback (most recent call last)")
    assert debug.stderr.strip().splitlines()[-1] == "error: ZeroDivisionError: second line of the cause"


def test_request_the_cluster_cannot_meet_is_refused_up_front(colour_root, ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "sweep",
            "--datasets",
            "colours",
            "--data-root",
            str(colour_root),
            *SMALL,
            "--gpus-per-trial",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no Ray node can give a trial 1 CPU and 1 GPU")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists()
