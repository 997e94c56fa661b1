"""The sweep's grid: its spec (flags, a sweep.toml, or both), checked before anything heavy loads, and
one trial per grid point with a key that stays the same for the same point.

Nothing here imports torch, Ray or MLflow (nor numpy, until a spec is checked): every argument error
answers at once, and the command line reads its help's defaults from SweepSpec.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from clip_adapter.methods import check as check_methods
from clip_adapter.methods import trains
from clip_adapter.protocol import IMAGENET_EPOCHS, PROTOCOLS, epochs_for_shots, selection
from clip_adapter.protocol import hparams as released_hparams
from clip_adapter.settings import data_root as default_data_root

from . import settings
from .errors import SweepError
from .point import FEW_SHOT, Pack, TrialPoint


@dataclass
class SweepSpec:
    """Every `ca-flow sweep` flag, named as the flag with underscores (the keys of sweep.toml)."""

    datasets: str = "all"
    data_root: str = field(default_factory=default_data_root)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    methods: list[str] = field(default_factory=lambda: ["clip-adapter", "zero-shot"])
    alphas: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    betas: list[float] = field(default_factory=lambda: [0.2])
    adapter: list[str] = field(default_factory=lambda: ["visual"])
    backbone: str = "RN50-quickgelu"
    pretrained: str = "openai"
    epochs: int | None = None  # None: CoOp's 50/100/200 by shots
    augment_views: int = 10
    lr: float = 0.002
    batch_size: int = 32
    allow_fewer_shots: bool = False
    experiment: str = "ca-flow"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_retries: int = 2
    cache_dir: str = field(default_factory=lambda: str(settings.FEATURES.expanduser()))
    results_dir: str = "ca-flow-results"
    storage_path: str = "~/ray_results"  # Tune's own state; MLflow is the record of what is done
    protocol: list[str] = field(default_factory=lambda: ["few-shot"])  # few-shot, released (README: Protocol)
    pack: bool = False  # CLIP-Adapter points that differ only in alpha/beta: one Tune trial

    def validate(self) -> SweepSpec:
        for name, values in (("alpha", self.alphas), ("beta", self.betas)):
            bad = [v for v in values if not 0.0 <= v <= 1.0]
            if bad:
                raise SweepError(
                    f"{name} {bad[0]:g} is outside [0, 1]; residual ratios are fractions, "
                    f"e.g. --{name}s 0.2,0.6"
                )
        for flag in ("shots", "seeds", "alphas", "methods", "adapter", "protocol"):
            if not getattr(self, flag):
                raise SweepError(f"--{flag} needs at least one value")
        if min(self.shots) < 1:
            raise SweepError(f"shots must be >= 1, got {min(self.shots)}; e.g. --shots 1,2,4,8,16")
        if any(not 0 <= s < 2**32 for s in self.seeds):
            raise SweepError(
                f"seeds must be in 0..4294967295, got {[s for s in self.seeds if not 0 <= s < 2**32][0]}"
            )
        for flag, value, low in (
            ("epochs", self.epochs, 1),
            ("augment-views", self.augment_views, 1),
            ("batch-size", self.batch_size, 1),
            ("max-retries", self.max_retries, 0),
        ):
            if value is not None and value < low:
                raise SweepError(f"--{flag} must be >= {low}, got {value}")
        if not self.lr > 0:
            raise SweepError(f"--lr must be > 0, got {self.lr:g}")
        if not self.cpus_per_trial > 0 or self.gpus_per_trial < 0:
            raise SweepError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        from clip_adapter.backbone import TINY, model_names

        if self.backbone not in model_names():
            raise SweepError(
                f"unknown backbone {self.backbone!r}; see open_clip.list_models(), e.g. "
                f"RN50-quickgelu, ViT-B-32-quickgelu, or {TINY} for tests"
            )
        try:
            check_methods(self.methods)
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        bad = [p for p in self.protocol if p not in PROTOCOLS]
        if bad:
            raise SweepError(f"unknown protocol {bad[0]!r}; use few-shot, released or few-shot,released")
        bad = [a for a in self.adapter if a not in ("visual", "text", "both")]
        if bad:
            raise SweepError(f"unknown adapter variant {bad[0]!r}; use visual, text or both")
        if not self.experiment.strip():
            raise SweepError("--experiment must not be empty")
        for flag in ("cache_dir", "results_dir", "storage_path"):  # found out only after the trials
            folder = getattr(self, flag)
            if (
                "://" not in folder
                and Path(folder).expanduser().exists()
                and not Path(folder).expanduser().is_dir()
            ):
                raise SweepError(
                    f"--{flag.replace('_', '-')} {folder} is a file, not a folder; pass a folder "
                    f"(it is created if missing)"
                )
        weights = Path(self.pretrained).expanduser()
        if (
            any(sep in self.pretrained for sep in "/\\")
            or self.pretrained.endswith((".pt", ".bin", ".safetensors"))
        ) and not weights.is_file():  # as load_backbone tells a file from a tag
            raise SweepError(
                f"weights file {self.pretrained} does not exist; pass an existing file, a pretrained "
                f"tag (e.g. openai) or 'random'"
            )
        return self

    # -- files ---------------------------------------------------------------------------------
    def record(self) -> dict:
        """The spec as plain data: what the parent run keeps, and what `resume` rebuilds from."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> SweepSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    def to_toml(self) -> str:
        lines = ["# ca-flow sweep --config <this file> runs this grid again (flags given with it win)."]
        for key, value in self.record().items():
            if value is None:
                lines.append(f"# {key} = (default)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


LIST_TYPES = {
    "shots": int,
    "seeds": int,
    "alphas": float,
    "betas": float,
    "methods": str,
    "adapter": str,
    "protocol": str,
}


def parse_list(value, kind, key: str) -> list:
    """A comma-separated string (a flag) or a list (TOML) as a deduplicated list of `kind`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [kind(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        example = "1,2,4" if kind is int else "0.2,0.6" if kind is float else "a,b"
        raise SweepError(
            f"--{key.replace('_', '-')} expects comma-separated {kind.__name__}s, e.g. "
            f"--{key.replace('_', '-')} {example}; got {value!r}"
        ) from None
    if kind is int and isinstance(value, list) and any(isinstance(v, float) for v in value):
        raise SweepError(f"{key} in the config expects integers, got {value!r}")
    return list(dict.fromkeys(out))


def read_config(path: str | Path) -> dict:
    """A sweep.toml as flag values; unknown keys are an error (a typo must not run the default)."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(
            f"config file {path} does not exist; pass an existing sweep.toml (see examples/demo.toml)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SweepError(
            f"config file {path}: unknown key {unknown[0]!r}; keys are the sweep flags "
            f"with underscores: {', '.join(sorted(known))}"
        )
    return raw


def build_spec(config: str | Path | None, flags: dict) -> SweepSpec:
    """Defaults, then the config file, then the flags given (None = not given), checked."""
    values = read_config(config) if config else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(values.get("datasets"), list):  # a TOML array, like every other list key
        values["datasets"] = ",".join(parse_list(values["datasets"], str, "datasets"))
    for key, kind in LIST_TYPES.items():
        if key in values:
            values[key] = parse_list(values[key], kind, key)
    scalar = {f.name: f.type for f in fields(SweepSpec)}
    for key in ("epochs", "augment_views", "batch_size", "max_retries"):
        if key in values and values[key] is not None and not isinstance(values[key], int):
            raise SweepError(f"{key} expects an integer, got {values[key]!r}")
    if "pack" in values and not isinstance(values["pack"], bool):
        raise SweepError(f"pack expects true or false, got {values['pack']!r}")
    for key in ("lr", "cpus_per_trial", "gpus_per_trial"):
        if key in values and not isinstance(values[key], (int, float)):
            raise SweepError(f"{key} expects a number, got {values[key]!r}")
    for key in (
        "datasets",
        "data_root",
        "backbone",
        "pretrained",
        "experiment",
        "cache_dir",
        "results_dir",
        "storage_path",
    ):
        if key in values and not isinstance(values[key], str):
            raise SweepError(f"{key} expects a string, got {values[key]!r} ({scalar[key]})")
        if key in values and key.endswith(("_dir", "_root")) and "://" not in values[key]:
            values[key] = str(Path(values[key]).expanduser())
    return SweepSpec(**values).validate()


# -- the trials ------------------------------------------------------------------------------------


def _points(spec: SweepSpec, method: str, protocol: str = "few-shot", dataset: str = ""):
    """(shots, hparams) per trial of one method on one dataset and seed, under `protocol`."""
    released = protocol == "released"
    if method == "clip-adapter":
        for k, variant, alpha, beta in itertools.product(spec.shots, spec.adapter, spec.alphas, spec.betas):
            if (variant == "visual" and beta != spec.betas[0]) or (
                variant == "text" and alpha != spec.alphas[0]
            ):
                continue  # a ratio the variant does not use: one trial is enough
            epochs = IMAGENET_EPOCHS if released and dataset == "imagenet" else epochs_for_shots(k)
            yield (
                k,
                dict(
                    variant=variant,
                    alpha=alpha,
                    beta=beta,
                    epochs=spec.epochs or epochs,
                    lr=spec.lr,
                    batch_size=spec.batch_size,
                ),
            )
    elif not trains(method):
        # Nothing is fitted: one trial per (dataset, seed) is enough; it validates on the largest K.
        yield max(spec.shots), {}
    else:
        for k in spec.shots:
            hparams = released_hparams(protocol, method, dataset)  # the released config of the dataset
            yield (
                k,
                (
                    {**hparams, "epochs": spec.epochs}
                    if spec.epochs and method == "tip-adapter-f"
                    else hparams
                ),
            )


def grid(spec: SweepSpec, names: list[str], weights_id: str | None = None) -> list[TrialPoint]:
    """One point per trial, keyed by everything that changes the trial's result."""
    from clip_adapter.backbone import weights_identity

    weights_id = weights_id or weights_identity(spec.pretrained)
    trials = []
    for dataset, method, seed, protocol in itertools.product(names, spec.methods, spec.seeds, spec.protocol):
        for shots, hparams in _points(spec, method, protocol, dataset):
            released = (
                {}
                if protocol == FEW_SHOT
                else dict(protocol=protocol, select=selection(protocol, method, dataset))
            )
            trials.append(
                TrialPoint.keyed(
                    dataset=dataset,
                    method=method,
                    shots=shots,
                    seed=seed,
                    hparams=hparams,
                    backbone=spec.backbone,
                    weights=spec.pretrained,
                    weights_id=weights_id,
                    views=spec.augment_views,
                    **released,
                )
            )
    return trials


def packs(trials: list[TrialPoint], pack: bool) -> list[Pack]:
    """The Tune trials: with `pack`, the CLIP-Adapter points that differ only in alpha and beta train as one
    stacked model (they see the same batches: views, order and initial weights come from the seed alone);
    every other point, and every point without `pack`, is a trial of its own. Grid order is kept."""
    out: dict = {}
    for point in trials:
        same = None
        if pack and point.method == "clip-adapter":
            rest = {k: v for k, v in point.hparams.items() if k not in ("alpha", "beta")}
            same = json.dumps(
                dict(point.params(), hparams=rest, protocol=point.protocol, select=point.select),
                sort_keys=True,
            )  # one FewShot for the pack
        out.setdefault(same or point.key, []).append(point)
    return list(out.values())


def counts(trials: list[TrialPoint]) -> dict[str, dict[str, int]]:
    """Trials per dataset and method: what `--dry-run` and `status` show."""
    out: dict[str, dict[str, int]] = {}
    for (dataset, method), n in Counter((p.dataset, p.method) for p in trials).items():
        out.setdefault(dataset, {})[method] = n
    return out


def check_shots(spec: SweepSpec, split) -> dict[str, int]:
    """Refuse shots a class cannot give, naming the class; with allow_fewer_shots, the real counts.

    Returns {class name: train images} for the classes that have fewer than the largest shots.
    """
    per_class = Counter(item.label for item in split.train)
    short = {split.classnames[c]: n for c, n in sorted(per_class.items()) if n < max(spec.shots)}
    missing = [name for c, name in enumerate(split.classnames) if per_class.get(c, 0) == 0]
    if missing:
        raise SweepError(
            f"{split.name}: class {missing[0]!r} has no train images; fix the split or the folder"
        )
    if short and not spec.allow_fewer_shots:
        name, n = min(short.items(), key=lambda kv: kv[1])
        raise SweepError(
            f"{split.name}: class {name!r} has {n} train images, fewer than --shots "
            f"{max(spec.shots)}; lower --shots, or pass --allow-fewer-shots to train on what "
            f"there is (the real per-class counts are then logged)"
        )
    return short
