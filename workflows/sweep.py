"""The sweep: grid -> features (Ray tasks, cached) -> one Ray Tune trial per grid point -> MLflow."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-trial JSON/CSV/TensorBoard files cost seconds per trial; ca-flow logs to MLflow instead.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402

from clip_adapter import datasets as ds  # noqa: E402
from clip_adapter.backbone import RANDOM, TINY, available_models, weights_identity  # noqa: E402
from clip_adapter.features import FeatureCache, LocalEncoder  # noqa: E402
from clip_adapter.methods import METHODS  # noqa: E402
from clip_adapter.train import epochs_for_shots, zero_shot_accuracy  # noqa: E402

from . import tracking  # noqa: E402
from .progress import TrialProgress  # noqa: E402
from .report import results_frame  # noqa: E402


class SweepError(RuntimeError):
    """The sweep cannot start as asked; the message names the fix."""


@dataclass
class SweepSpec:
    datasets: str = "all"
    data_root: Path = field(default_factory=ds.default_data_root)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    alphas: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    betas: list[float] = field(default_factory=lambda: [0.2])
    adapters: list[str] = field(default_factory=lambda: ["visual"])
    methods: list[str] = field(default_factory=lambda: ["clip-adapter", "zero-shot"])
    backbone: str = "RN50-quickgelu"
    pretrained: str = "openai"
    experiment: str = "ca-flow"
    tracking_uri: str | None = None
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    epochs: int | None = None       # None: CoOp's epochs by shots
    augment_views: int = 10
    lr: float = 0.002
    batch_size: int = 32
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/ca-flow/features").expanduser())
    storage_path: str = "~/ray_results"  # Tune's experiment state; shared storage (NFS, s3://) on a cluster
    results_dir: Path = field(default_factory=lambda: Path("ca-flow-results"))

    def validate(self) -> None:
        for name, values in (("alpha", self.alphas), ("beta", self.betas)):
            bad = [v for v in values if not 0.0 <= v <= 1.0]
            if bad:
                raise SweepError(f"{name} {bad[0]} is outside [0, 1]; residual ratios are fractions")
        if any(k < 1 for k in self.shots):
            raise SweepError(f"shots must be >= 1, got {min(self.shots)}")
        if not self.shots or not self.seeds or not self.alphas:
            raise SweepError("--shots, --seeds and --alphas each need at least one value")
        if self.epochs is not None and self.epochs < 1:
            raise SweepError(f"--epochs must be >= 1, got {self.epochs}")
        if self.augment_views < 1:
            raise SweepError(f"--augment-views must be >= 1, got {self.augment_views}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if self.backbone not in available_models():
            raise SweepError(f"unknown backbone {self.backbone!r}; see open_clip.list_models(), e.g. "
                             f"RN50-quickgelu, ViT-B-32-quickgelu, or {TINY} for tests")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise SweepError(f"unknown method {(unknown or [''])[0]!r}; choose from {', '.join(sorted(METHODS))}")
        bad = [a for a in self.adapters if a not in ("visual", "text", "both")]
        if bad:
            raise SweepError(f"unknown adapter variant {bad[0]!r}; use visual, text or both")


# -- grid --------------------------------------------------------------------------------------

def _points(spec: SweepSpec, method: str, shots: list[int]):
    """(shots, hparams) per trial of one method on one dataset and seed."""
    if method == "clip-adapter":
        for k, variant, alpha, beta in itertools.product(shots, spec.adapters, spec.alphas, spec.betas):
            if (variant == "visual" and beta != spec.betas[0]) or (variant == "text" and alpha != spec.alphas[0]):
                continue  # a ratio the variant does not use: one trial is enough
            yield k, dict(variant=variant, alpha=alpha, beta=beta, epochs=spec.epochs or epochs_for_shots(k),
                          lr=spec.lr, batch_size=spec.batch_size)
    elif not METHODS[method].trains:
        # Nothing is fitted: one trial per (dataset, seed) is enough; it validates on the largest K.
        yield max(shots), {}
    else:
        for k in shots:
            yield k, ({"epochs": spec.epochs} if spec.epochs and method == "tip-adapter-f" else {})


def grid(spec: SweepSpec, names: list[str]) -> list[dict]:
    """One dict per trial; its key hashes everything that changes the trial's result."""
    weights_id = weights_identity(spec.pretrained)
    trials = []
    for dataset, method, seed in itertools.product(names, spec.methods, spec.seeds):
        for shots, hparams in _points(spec, method, spec.shots):
            point = dict(dataset=dataset, method=method, shots=shots, seed=seed, hparams=hparams,
                         backbone=spec.backbone, weights=spec.pretrained, weights_id=weights_id,
                         views=spec.augment_views)
            key = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]
            name = "-".join([dataset, method, f"{shots}shot", f"seed{seed}"]
                            + [f"{k}{v:g}" if isinstance(v, float) else str(v)
                               for k, v in hparams.items() if k in ("variant", "alpha", "beta")])
            trials.append(dict(point, key=key, name=name))
    return trials


# -- features ----------------------------------------------------------------------------------

_ENCODERS: dict[tuple[str, str, str], LocalEncoder] = {}


def _encoder(backbone: str, weights: str, device: str) -> LocalEncoder:
    # Ray reuses worker processes: keep one loaded backbone per worker.
    key = (backbone, weights, device)
    if key not in _ENCODERS:
        _ENCODERS[key] = LocalEncoder(backbone, weights, device)
    return _ENCODERS[key]


@ray.remote
def _encode_images(backbone, weights, device, blobs, views, augment):
    return _encoder(backbone, weights, device).images(blobs, views, augment)


@ray.remote
def _encode_text(backbone, weights, device, classnames, template):
    return _encoder(backbone, weights, device).text(classnames, template)


@dataclass
class RayEncoder:
    """Encodes chunks of image bytes as Ray tasks: no worker needs the driver's data root."""
    backbone: str
    weights: str
    num_gpus: float
    slots: int

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"  # explicit: a GPU task without CUDA must fail

    def _opts(self):
        return dict(num_cpus=1, num_gpus=self.num_gpus)

    def images(self, blobs, views, augment):
        size = max(16, math.ceil(len(blobs) / (2 * self.slots)))
        starts = list(range(0, len(blobs), size))
        refs = [_encode_images.options(**self._opts()).remote(
            self.backbone, self.weights, self.device, blobs[s:s + size], views, augment) for s in starts]
        parts = ray.get(refs)
        feats = np.concatenate([f for f, _ in parts])
        bad = {s + i: reason for s, (_, b) in zip(starts, parts) for i, reason in b.items()}
        return feats, bad

    def text(self, classnames, template):
        weights, scale = ray.get(_encode_text.options(**self._opts()).remote(
            self.backbone, self.weights, self.device, classnames, template))
        return np.array(weights), scale  # the object store hands back read-only arrays


@dataclass
class DatasetFeatures:
    """A dataset's cached features plus, per (shots, seed), which rows form its few-shot split."""
    name: str
    classnames: list[str]
    template: str
    text: np.ndarray
    logit_scale: float
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    zs_test_acc: float        # the same for every trial of the dataset: computed once, here
    rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # (shots, seed) -> (train, val) rows


def dataset_features(split: ds.Split, spec: SweepSpec, cache: FeatureCache, encoder,
                     on_bad) -> DatasetFeatures:
    subsets = {(k, s): ds.few_shot(split, k, s) for k in spec.shots for s in spec.seeds}
    train_items = list(dict.fromkeys(i for tr, _ in subsets.values() for i in tr))
    val_items = list(dict.fromkeys(i for _, va in subsets.values() for i in va))
    train = cache.images(train_items, spec.augment_views, True, encoder, on_bad)
    held = cache.images(val_items + split.test, 1, False, encoder, on_bad)
    text, scale = cache.text(split.classnames, split.template, encoder)

    train_row = {item: r for r, item in enumerate(train_items) if train.ok[r]}
    val_row = {item: r for r, item in enumerate(val_items) if held.ok[r]}
    rows = {key: (np.array([train_row[i] for i in tr if i in train_row], dtype=np.int64),
                  np.array([val_row[i] for i in va if i in val_row], dtype=np.int64))
            for key, (tr, va) in subsets.items()}
    n_val, test_ok = len(val_items), held.ok[len(val_items):]
    test, test_labels = held.features[n_val:, 0][test_ok], held.labels[n_val:][test_ok]
    return DatasetFeatures(
        split.name, split.classnames, split.template, text, scale,
        train.features, train.labels, held.features[:n_val, 0], held.labels[:n_val],
        test, test_labels, zero_shot_accuracy(test, test_labels, text, scale), rows)


# -- the trial ---------------------------------------------------------------------------------

def train_trial(t: dict, data: DatasetFeatures, device: str = "cpu"):
    """Fit and evaluate one grid point on in-memory features: no Ray, no MLflow."""
    import torch

    from clip_adapter import evaluate
    from clip_adapter.methods import FewShot, make

    train_rows, val_rows = data.rows[(t["shots"], t["seed"])]
    if len(train_rows) == 0:
        raise RuntimeError(f"{t['dataset']}: no readable train image for {t['shots']} shots, seed {t['seed']}")
    few_shot = FewShot(data.train[train_rows], data.train_labels[train_rows], data.val[val_rows],
                       data.val_labels[val_rows], data.text, data.logit_scale)
    method = make(t["method"], torch.from_numpy(data.text), data.logit_scale, **t["hparams"]).to(device)
    fitted = method.fit(few_shot, t["seed"])  # sees train and val only: every choice is made on val
    method.eval()
    metrics = dict(
        val_acc=evaluate(method, few_shot.val, few_shot.val_labels),
        test_acc=evaluate(method, data.test, data.test_labels),
        zs_test_acc=data.zs_test_acc,
        n_train=len(train_rows), n_val=len(val_rows), n_test=len(data.test))
    if fitted.losses:
        metrics["train_loss_final"] = fitted.losses[-1]
    params = {k: t[k] for k in ("dataset", "method", "shots", "seed", "backbone", "weights", "weights_id", "views")}
    config = method.config()
    params.update({("adapter" if k == "variant" else k): v for k, v in config.items()})
    params.update({f"chosen_{k}": v for k, v in fitted.chosen.items()})
    return method.cpu(), fitted.losses, metrics, params


def run_trial(config: dict, features: dict, uri: str, threads: int, gpu: bool) -> None:
    """The Tune trainable: train one grid point, log it to its MLflow run, report to Tune."""
    import torch

    from clip_adapter import save_adapter
    from clip_adapter.artifact import AdapterMeta

    torch.set_num_threads(threads)  # small matmuls: more threads than CPUs granted is much slower
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("the trial was given a GPU but torch sees no CUDA device; fix the node's CUDA setup")
    t, started = config["trial"], time.perf_counter()
    data: DatasetFeatures = features[t["dataset"]]
    method, losses, metrics, params = train_trial(t, data, "cuda" if gpu else "cpu")
    trained = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"  # a fixed name inside the logged model, not a random one
        save_adapter(folder, method, torch.from_numpy(data.text), AdapterMeta(
            method=t["method"], config=method.config(), backbone=t["backbone"], weights=t["weights"],
            weights_id=t["weights_id"], classnames=data.classnames, template=data.template,
            logit_scale=data.logit_scale, dataset=t["dataset"]))
        tracking.log_trial(uri, t["run_id"], params, metrics, losses, str(folder))
    done = time.perf_counter()
    tune.report({**metrics, "trial_seconds": done - started, "mlflow_seconds": done - trained})


# -- Ray -----------------------------------------------------------------------------------------

def connect_ray(address: str | None) -> None:
    # Tune's own chatter (result files it no longer writes, experiment-state saves) would bury
    # the progress bar; errors still surface through ResultGrid.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SweepError(f"cannot connect to Ray at {address or 'a new local cluster'}: {first}; "
                         f"check --address / RAY_ADDRESS") from None


def check_resources(cpus: float, gpus: float) -> int:
    """Refuse a per-trial request no node can meet (Tune would leave it PENDING forever).

    Returns how many trials can run at once.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus]
    if not fits:
        total = ray.cluster_resources()
        raise SweepError(f"no Ray node can give a trial {cpus:g} CPU and {gpus:g} GPU (cluster: "
                         f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU); lower "
                         f"--cpus-per-trial / --gpus-per-trial or add nodes")
    return max(1, sum(int(min(n.get("CPU", 0) / cpus, n.get("GPU", 0) / gpus if gpus else math.inf))
                      for n in fits))


# -- the whole sweep -------------------------------------------------------------------------------

@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    results: "pd.DataFrame"   # one row per trial
    results_path: Path
    seconds: float
    tune_seconds: float   # the trials alone, from Tuner start to its end
    failed: int


def run_sweep(spec: SweepSpec, console) -> SweepResult:
    started = time.perf_counter()
    spec.validate()
    found = ds.resolve(spec.datasets, Path(spec.data_root).expanduser())
    splits = [ds.load(f) for f in found]
    uri = tracking.resolve_uri(spec.tracking_uri)
    tracking.check(uri)
    trials = grid(spec, [s.name for s in splits])

    connect_ray(spec.address)
    slots = check_resources(spec.cpus_per_trial, spec.gpus_per_trial)
    client = tracking.connect(uri)  # only now: a refused sweep leaves no store behind
    exp_id = tracking.experiment_id(client, spec.experiment, uri)
    if spec.pretrained == RANDOM:
        console.print("[yellow]backbone weights: random (seeded) - results say nothing about CLIP; "
                      "for demos and tests only[/yellow]")

    cache = FeatureCache(spec.cache_dir, spec.backbone, spec.pretrained)
    encoder = RayEncoder(spec.backbone, spec.pretrained, 1.0 if spec.gpus_per_trial > 0 else 0.0,
                         max(1, int(ray.cluster_resources().get("GPU" if spec.gpus_per_trial > 0 else "CPU", 1))))
    features = {}
    for split in splits:
        t0, before = time.perf_counter(), cache.images_encoded
        features[split.name] = dataset_features(
            split, spec, cache, encoder,
            lambda path, reason: console.print(f"[red]skipping unreadable image {path}: {reason}[/red]"))
        console.print(f"features  {split.name}: {cache.images_encoded - before} images encoded, "
                      f"the rest from cache ({time.perf_counter() - t0:.1f} s)")

    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    grid_params = {k: v for k, v in asdict(spec).items() if k not in ("tracking_uri", "address")}
    grid_params.update(datasets=",".join(s.name for s in splits), trials=len(trials))
    parent = tracking.start_parent(client, exp_id, sweep_id, grid_params, spec.pretrained == RANDOM)
    runs = tracking.child_runs(client, exp_id, parent, sweep_id, trials)
    for t in trials:
        t["run_id"] = runs[t["key"]]

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, features=features, uri=uri, threads=max(1, int(spec.cpus_per_trial)),
                             gpu=spec.gpus_per_trial > 0),
        {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    progress = TrialProgress(len(trials), console)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots),
        run_config=tune.RunConfig(name=f"ca-flow-{sweep_id}", verbose=0, callbacks=[progress],
                                  storage_path=spec.storage_path if "://" in spec.storage_path
                                  else str(Path(spec.storage_path).expanduser().resolve())))
    tune_started = time.perf_counter()
    with progress:
        grid_result = tuner.fit()
    tune_seconds = time.perf_counter() - tune_started

    rows, failed_runs = [], []
    for result in grid_result:
        t = result.config["trial"]
        error = result.error
        if error is not None:
            failed_runs.append(t["run_id"])
        hp = t["hparams"]
        rows.append(dict({k: t[k] for k in ("key", "run_id", "dataset", "method", "shots", "seed")},
                         adapter=hp.get("variant", ""), alpha=hp.get("alpha", float("nan")),
                         beta=hp.get("beta", float("nan")),
                         **{k: (result.metrics or {}).get(k, float("nan"))
                            for k in ("val_acc", "test_acc", "zs_test_acc", "train_loss_final", "trial_seconds",
                                      "mlflow_seconds")},
                         status="FAILED" if error else "FINISHED",
                         error=(str(error).strip().splitlines() or [""])[-1] if error else ""))
    tracking.mark_failed(client, failed_runs)
    frame = results_frame(rows, sweep_id)
    out_dir = Path(spec.results_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sweep_id}.parquet"
    frame.to_parquet(path, index=False)
    client.log_artifact(parent, str(path))
    seconds = time.perf_counter() - started
    client.log_metric(parent, "wall_seconds", seconds)
    client.set_terminated(parent, status="FAILED" if len(failed_runs) == len(trials) else "FINISHED")
    return SweepResult(sweep_id, parent, frame, path, seconds, tune_seconds, len(failed_runs))
