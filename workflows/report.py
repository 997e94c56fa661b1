"""Results of a sweep: the per-trial frame, selection on validation, the paper's table and figure."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd
from rich.table import Table

from clip_adapter.methods import METHODS

RESULT_COLUMNS = ["sweep_id", "key", "run_id", "dataset", "method", "shots", "seed", "adapter", "alpha", "beta",
                  "val_acc", "test_acc", "zs_test_acc", "train_loss_final", "trial_seconds", "mlflow_seconds",
                  "status", "error"]
PICK = ["dataset", "method", "shots", "seed"]

# Published RN50 / OpenAI numbers (Tip-Adapter's log, one seed), from the method reference.
PAPER_AVERAGE = {
    "clip-adapter": {1: 62.67, 2: 65.55, 4: 68.61, 8: 71.40, 16: 74.44},
    "tip-adapter": {1: 62.33, 2: 64.62, 4: 66.54, 8: 68.50, 16: 70.32},
    "tip-adapter-f": {1: 64.60, 2: 66.65, 4: 69.67, 8: 72.45, 16: 75.83},
    "zero-shot": {k: 58.89 for k in (1, 2, 4, 8, 16)},
}
PAPER_16_SHOT = {"clip-adapter": {
    "imagenet": 63.59, "sun397": 69.55, "oxford_pets": 87.84, "eurosat": 84.43, "caltech101": 92.49, "dtd": 65.96,
    "fgvc_aircraft": 32.10, "food101": 78.25, "oxford_flowers": 93.90, "ucf101": 76.76, "stanford_cars": 74.01}}
PAPER_ZERO_SHOT = {
    "imagenet": 60.32, "sun397": 58.52, "oxford_pets": 85.83, "eurosat": 37.52, "caltech101": 85.92, "dtd": 42.20,
    "fgvc_aircraft": 17.10, "food101": 77.32, "oxford_flowers": 66.02, "ucf101": 61.35, "stanford_cars": 55.74}


def results_frame(rows: list[dict], sweep_id: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.insert(0, "sweep_id", sweep_id)
    for col in RESULT_COLUMNS:
        if col not in frame:
            frame[col] = float("nan")
    return frame[RESULT_COLUMNS].sort_values(PICK + ["adapter", "alpha", "beta"], ignore_index=True)


def select_on_val(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, shots, seed), the finished trial with the best val_acc.

    It is handed no test column, so it cannot read one. Ties go to the smaller alpha, then beta
    (the run closer to zero-shot CLIP).
    """
    done = frame.loc[frame["status"] == "FINISHED", PICK + ["adapter", "alpha", "beta", "val_acc", "run_id"]]
    ranked = done.assign(_val=done["val_acc"].fillna(-1.0)).sort_values(
        PICK[:-1] + ["seed", "_val", "alpha", "beta"], ascending=[True] * 4 + [False, True, True], na_position="last")
    return ranked.groupby(PICK, as_index=False).head(1).drop(columns="_val")


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the test accuracy at each val-chosen point, in percent."""
    chosen = select_on_val(frame.drop(columns=["test_acc", "zs_test_acc"]))
    picked = chosen.merge(frame[["run_id", "test_acc"]], on="run_id")  # test joined after the choice
    shots = sorted(frame.loc[frame["method"].map(lambda m: METHODS[m].trains), "shots"].unique()) \
        or sorted(frame["shots"].unique())
    untrained = picked["method"].map(lambda m: not METHODS[m].trains)
    # A method that fits nothing has one trial per seed: the same figure stands in every shots column.
    picked = pd.concat([picked[~untrained]] + [picked[untrained].assign(shots=k) for k in shots])
    out = picked.groupby(["dataset", "method", "shots"], as_index=False).agg(
        seeds=("seed", "nunique"), mean=("test_acc", "mean"), std=("test_acc", "std"),
        alphas=("alpha", lambda a: ",".join(f"{x:g}" for x in a if not math.isnan(x))))
    out[["mean", "std"]] = 100 * out[["mean", "std"]].fillna({"std": 0.0})
    return out


def paper_table(frame: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per method: (mean, std) frames, rows the datasets plus the average, columns the shots."""
    s = summary(frame)
    blocks = {}
    for method in [m for m in METHODS if m in set(s["method"])]:
        part = s[s["method"] == method]
        mean = part.pivot(index="dataset", columns="shots", values="mean")
        std = part.pivot(index="dataset", columns="shots", values="std")
        mean.loc["average"], std.loc["average"] = mean.mean(), std.mean()
        blocks[method] = (mean, std)
    return blocks


def cells(blocks, paper: bool = False) -> dict[str, pd.DataFrame]:
    """'mean +- std' per cell; with `paper`, the published figure and the difference beside it."""
    out = {}
    for method, (mean, std) in blocks.items():
        text = mean.round(2).map("{:.2f}".format) + " +- " + std.round(2).map("{:.2f}".format)
        if paper:
            for dataset in text.index:
                for shots in text.columns:
                    published = _published(method, dataset, shots)
                    if published is not None:
                        text.loc[dataset, shots] += f" (paper {published:.2f}, {mean.loc[dataset, shots] - published:+.2f})"
        out[method] = text
    return out


def _published(method: str, dataset: str, shots: int) -> float | None:
    if dataset == "average":
        return PAPER_AVERAGE.get(method, {}).get(shots)
    if method == "zero-shot":
        return PAPER_ZERO_SHOT.get(dataset)
    return PAPER_16_SHOT.get(method, {}).get(dataset) if shots == 16 else None


def comparable_to_paper(backbone: str, weights: str) -> str | None:
    """None if ca-flow's numbers can stand beside the published RN50 ones, else why not."""
    if backbone not in ("RN50", "RN50-quickgelu") or weights != "openai":
        return (f"published numbers are RN50 with OpenAI weights; this sweep used {backbone} with "
                f"{weights} weights, so they are not comparable")
    return None


def rich_tables(blocks: dict[str, pd.DataFrame], title: str) -> list[Table]:
    tables = []
    for method, block in blocks.items():
        table = Table(title=method, caption=title)
        table.add_column("dataset")
        for shots in block.columns:
            table.add_column(f"{shots} shot{'s' if shots != 1 else ''}", justify="right")
        for dataset, row in block.iterrows():
            table.add_row(str(dataset), *row.tolist())
        tables.append(table)
    return tables


def markdown(blocks: dict[str, pd.DataFrame], title: str) -> str:
    lines = [f"# {title}", ""]
    for method, block in blocks.items():
        lines += [f"## {method}", "", "| dataset | " + " | ".join(f"{k} shots" for k in block.columns) + " |",
                  "|---|" + "---|" * len(block.columns)]
        lines += [f"| {d} | " + " | ".join(row) + " |" for d, row in block.iterrows()] + [""]
    return "\n".join(lines)


def figure(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Accuracy against shots: one panel per dataset and one for the average, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(frame)
    datasets = sorted(s["dataset"].unique()) + ["average"]
    cols = min(4, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        for method in [m for m in METHODS if m in set(s["method"])]:
            part = s[s["method"] == method]
            if dataset == "average":
                part = part.groupby("shots", as_index=False)["mean"].mean()
            else:
                part = part[part["dataset"] == dataset]
            ax.plot(part["shots"], part["mean"], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(s["shots"].unique()), [str(k) for k in sorted(s["shots"].unique())])
        ax.set_title(dataset)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 40 * cols), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(frame: pd.DataFrame, out_dir: Path, title: str, paper: bool) -> list[Path]:
    """The table as Markdown and CSV and the figure as PNG, in out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = cells(paper_table(frame), paper)
    md = out_dir / "table.md"
    md.write_text(markdown(text, title))
    csv = out_dir / "table.csv"
    pd.concat({m: t for m, t in text.items()}, names=["method", "dataset"]).to_csv(csv)
    return [md, csv, figure(frame, out_dir / "figure.png", title)]
