"""The report's figure: accuracy against shots per dataset, from the summary `report.summary` makes."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from clip_adapter.methods import trains


def figure(summarised: pd.DataFrame, methods: list[str], path: Path, title: str) -> Path:
    """The figure (see `draw`) as a PNG at `path`."""
    fig = draw(summarised, methods, title)  # selects the Agg backend before pyplot loads
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(summarised: pd.DataFrame, methods: list[str], title: str):
    """Accuracy against shots, a panel per dataset and one for the average: a line per trained method
    in `methods` (colours follow its order) with +-1 std error bars over seeds; zero-shot, which does
    not depend on shots, a dashed line. `summarised` is `report.summary`'s frame. Returns the
    matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(summarised["dataset"].unique()) + ["average"]
    shots = sorted(summarised["shots"].unique())
    cols = min(4, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        for i, method in enumerate(methods):
            part = summarised[(summarised["method"] == method) & (summarised["protocol"] == "few-shot")]
            if part.empty:  # a released-only sweep draws its released figures
                part = summarised[summarised["method"] == method]
            part = (
                part.groupby("shots", as_index=False)[["mean", "std"]].mean()
                if dataset == "average"
                else part[part["dataset"] == dataset]
            )
            if part.empty:
                continue
            if trains(method):
                ax.errorbar(
                    part["shots"],
                    part["mean"],
                    yerr=part["std"],
                    marker="o",
                    capsize=3,
                    label=method,
                    color=f"C{i}",
                )
            else:
                ax.axhline(part["mean"].iloc[0], linestyle="--", color=f"C{i}", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(dataset)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 40 * cols), fontsize=10)
    fig.tight_layout()
    return fig
