"""Results of a sweep: selection on validation, the paper's table, the published numbers (the figure:
report_figure.py).

Accuracies are fractions in MLflow and percentages here, in tables made for people (labelled %).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from clip_adapter.methods import NAMES, trains
from clip_adapter.protocol import CLIP_ADAPTER_ALPHA

from .report_figure import figure
from .runs_table import rank_runs

SELECTION_GROUP = ["dataset", "method", "shots", "seed", "protocol"]  # one run is chosen on val per group
TEST_MARK = "*"  # beside a figure whose choices were made on test (the released protocol, where it does)

# Published RN50 / OpenAI numbers (Tip-Adapter's log, one seed), from the method reference.
PAPER_AVERAGE = {
    "clip-adapter": {1: 62.67, 2: 65.55, 4: 68.61, 8: 71.40, 16: 74.44},
    "tip-adapter": {1: 62.33, 2: 64.62, 4: 66.54, 8: 68.50, 16: 70.32},
    "tip-adapter-f": {1: 64.60, 2: 66.65, 4: 69.67, 8: 72.45, 16: 75.83},
    "zero-shot": {k: 58.89 for k in (1, 2, 4, 8, 16)},
}
# GDA's own log (mrflogs/ICLR24 560fe21, exp.log, row "ours"; RN50, mean of seeds 1-3): the 16-shot
# average over the 11 datasets is 76.05, per dataset and shots below.
GDA_LOG = {
    "oxford_pets": (85.49, 86.69, 87.19, 89.12, 88.81),
    "oxford_flowers": (72.11, 82.91, 89.73, 93.23, 95.72),
    "fgvc_aircraft": (17.29, 22.45, 28.24, 34.07, 40.61),
    "dtd": (46.26, 51.26, 57.47, 62.77, 66.51),
    "eurosat": (58.30, 67.88, 75.40, 81.70, 86.12),
    "stanford_cars": (56.77, 59.30, 62.75, 68.93, 75.12),
    "food101": (77.42, 77.87, 77.83, 78.43, 79.05),
    "sun397": (59.95, 63.64, 65.27, 68.58, 70.70),
    "caltech101": (87.28, 88.63, 90.62, 91.35, 92.55),
    "ucf101": (62.61, 66.28, 71.31, 75.74, 77.53),
    "imagenet": (60.64, 61.23, 61.71, 62.46, 63.82),
}
PAPER_AVERAGE["gda"] = {1: 62.19, 2: 66.19, 4: 69.77, 8: 73.31, 16: 76.05}  # the mean of GDA_LOG's rows
PAPER_16_SHOT = {
    "clip-adapter": {
        "imagenet": 63.59,
        "sun397": 69.55,
        "oxford_pets": 87.84,
        "eurosat": 84.43,
        "caltech101": 92.49,
        "dtd": 65.96,
        "fgvc_aircraft": 32.10,
        "food101": 78.25,
        "oxford_flowers": 93.90,
        "ucf101": 76.76,
        "stanford_cars": 74.01,
    }
}
PAPER_ZERO_SHOT = {
    "imagenet": 60.32,
    "sun397": 58.52,
    "oxford_pets": 85.83,
    "eurosat": 37.52,
    "caltech101": 85.92,
    "dtd": 42.20,
    "fgvc_aircraft": 17.10,
    "food101": 77.32,
    "oxford_flowers": 66.02,
    "ucf101": 61.35,
    "stanford_cars": 55.74,
}
ALL_11 = frozenset(PAPER_ZERO_SHOT)


def with_protocol(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with `protocol` and `selection_split` columns (results from before protocols: few-shot, val)."""
    defaults = {"protocol": "few-shot", "selection_split": "val"}
    return frame.assign(**{k: frame[k].fillna(v) if k in frame else v for k, v in defaults.items()})


def in_order(order, column: pd.Series) -> list:
    """The values of `order` that `column` holds, in `order`'s order (methods as NAMES lists them)."""
    held = set(column)
    return [value for value in order if value in held]


def select_on_val(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, shots, seed, protocol), the finished trial with the best val_acc.

    It is handed no test column, so it cannot read one. Ties go as `rank_runs` says (the smaller alpha,
    then beta: the run closer to zero-shot CLIP). Under the released protocol CLIP-Adapter is the alpha
    0.2 trial where the sweep has one: its released trainer fixes alpha 0.2 and chooses nothing.
    """
    frame = with_protocol(frame)
    done = frame.loc[
        frame["status"] == "FINISHED",
        SELECTION_GROUP + ["adapter", "alpha", "beta", "val_acc", "run_id", "selection_split"],
    ]
    fixed = (done["protocol"] == "released") & (done["method"] == "clip-adapter")
    at_fixed = fixed & (done["alpha"] == CLIP_ADAPTER_ALPHA)
    group = done[SELECTION_GROUP].apply(tuple, axis=1) if len(done) else pd.Series(dtype=object)
    done = done[~fixed | at_fixed | ~group.isin(set(group[at_fixed]))]
    best = rank_runs(done).groupby(SELECTION_GROUP, as_index=False).head(1)
    return best.sort_values(SELECTION_GROUP, ignore_index=True)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the test accuracy at each val-chosen point, in percent.

    `test_selected` is true where any seed's figure was chosen on test (the released protocol)."""
    frame = with_protocol(frame)
    chosen = select_on_val(frame.drop(columns=["test_acc", "zs_test_acc"]))
    picked = chosen.merge(frame[["run_id", "test_acc"]], on="run_id")  # test joined after the choice
    trained = picked["method"].map(trains)
    shots = sorted(picked.loc[trained, "shots"].unique()) or sorted(picked["shots"].unique())
    # A method that fits nothing has one trial per seed: the same figure stands in every shots column.
    picked = pd.concat([picked[trained]] + [picked[~trained].assign(shots=k) for k in shots])
    out = picked.groupby(["dataset", "method", "shots", "protocol"], as_index=False).agg(
        n_seeds=("seed", "nunique"),
        mean=("test_acc", "mean"),
        std=("test_acc", "std"),
        alphas=("alpha", lambda a: ",".join(f"{x:g}" for x in a if not math.isnan(x))),
        test_selected=("selection_split", lambda x: bool((x == "test").any())),
    )
    out[["mean", "std"]] = 100 * out[["mean", "std"]].fillna({"std": 0.0})
    return out


def published(method: str, dataset: str, shots: int) -> float | None:
    if method == "zero-shot":
        return PAPER_ZERO_SHOT.get(dataset)
    if method == "gda" and dataset in GDA_LOG and shots in (1, 2, 4, 8, 16):
        return GDA_LOG[dataset][(1, 2, 4, 8, 16).index(shots)]
    return PAPER_16_SHOT.get(method, {}).get(dataset) if shots == 16 else None


def paper_average(method: str, shots: int, datasets: list[str]) -> tuple[float, list[str]] | None:
    """The published average comparable with ca-flow's over `datasets`, and the datasets it covers.

    With all 11 datasets it is the published 11-dataset average. With fewer, it is the mean of the
    published per-dataset numbers over the datasets both have (16-shot CLIP-Adapter, zero-shot and
    GDA at every shots publish those); the average of a subset is never set against the average of all 11.
    """
    if set(datasets) >= ALL_11 and shots in PAPER_AVERAGE.get(method, {}):
        return PAPER_AVERAGE[method][shots], sorted(ALL_11)
    both = [d for d in datasets if published(method, d, shots) is not None]
    if not both:
        return None
    return sum(published(method, d, shots) for d in both) / len(both), both


def block_name(method: str, protocol: str) -> str:
    return method if protocol == "few-shot" else f"{method} ({protocol})"


def block_method(name: str) -> str:
    return name.split(" (")[0]


def paper_table(frame: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per method and protocol: (mean, std) frames, rows the datasets plus the average, columns the shots.

    A released-protocol block is named 'method (released)'; mean.attrs["test_selected"] says which
    cells were chosen on test."""
    summarised = summary(frame)
    blocks = {}
    for protocol in in_order(("few-shot", "released"), summarised["protocol"]):
        in_protocol = summarised[summarised["protocol"] == protocol]
        for method in in_order(NAMES, in_protocol["method"]):
            part = in_protocol[in_protocol["method"] == method]
            mean = part.pivot(index="dataset", columns="shots", values="mean")
            std = part.pivot(index="dataset", columns="shots", values="std")
            marks = (
                part.pivot(index="dataset", columns="shots", values="test_selected")
                .fillna(False)
                .astype(bool)
            )
            mean.loc["average"], std.loc["average"] = mean.mean(), std.mean()
            marks.loc["average"] = marks.any()
            mean.attrs["test_selected"] = marks
            blocks[block_name(method, protocol)] = (mean, std)
    return blocks


def cells(blocks, paper: bool = False) -> dict[str, pd.DataFrame]:
    """'mean +- std' per cell (TEST_MARK where chosen on test); with `paper`, the published figure and
    the difference beside it."""
    out = {}
    for name, (mean, std) in blocks.items():
        method = block_method(name)
        text = mean.round(2).map("{:.2f}".format) + " +- " + std.round(2).map("{:.2f}".format)
        marks = mean.attrs.get("test_selected")
        if marks is not None:
            text = text.where(~marks.reindex_like(text).fillna(False).astype(bool), text + TEST_MARK)
        datasets = [d for d in mean.index if d != "average"]
        for shots in text.columns if paper else []:
            for dataset in datasets:
                ref = published(method, dataset, shots)
                if ref is not None:
                    text.loc[dataset, shots] += f" (paper {ref:.2f}, {mean.loc[dataset, shots] - ref:+.2f})"
            avg = paper_average(method, shots, datasets)
            if avg is not None:
                ref, over = avg
                ours = mean.loc[over, shots].mean()
                if len(over) == len(datasets):
                    where = "11 datasets" if len(over) == len(ALL_11) else ", ".join(over)
                    text.loc["average", shots] += f" (paper {ref:.2f} over {where}, {ours - ref:+.2f})"
                else:
                    text.loc["average", shots] += (
                        f" (over {', '.join(over)}: {ours:.2f}, paper {ref:.2f}, {ours - ref:+.2f})"
                    )
        out[name] = text
    return out


def side_by_side(frame: pd.DataFrame, comparable: bool) -> pd.DataFrame:
    """Per method, dataset (and the average over the datasets both protocols have) and shots: the
    published figure (where comparable and published), the released protocol's, the few-shot
    protocol's, released - paper and few-shot - released; `test_selected` marks a released figure
    chosen on test. Figures in %."""
    summarised = summary(frame)
    rows = []
    for method in in_order(NAMES, summarised["method"]):
        part = summarised[summarised["method"] == method]
        by_protocol = {
            protocol: part[part["protocol"] == protocol].set_index(["dataset", "shots"])
            for protocol in ("released", "few-shot")
        }
        for shots in sorted(part["shots"].unique()):
            datasets = sorted(set(part.loc[part["shots"] == shots, "dataset"]))
            both = [d for d in datasets if all((d, shots) in table.index for table in by_protocol.values())]
            for dataset in datasets + (["average"] if both else []):
                over = both if dataset == "average" else [dataset]
                released, few = (
                    _mean_over(by_protocol[protocol], over, shots) for protocol in ("released", "few-shot")
                )
                marked = any(
                    bool(by_protocol["released"].loc[(d, shots), "test_selected"])
                    for d in over
                    if (d, shots) in by_protocol["released"].index
                )
                ref = None
                if comparable:
                    avg = paper_average(method, shots, both) if dataset == "average" else None
                    ref = (
                        (avg[0] if avg and avg[1] == both else None)
                        if dataset == "average"
                        else published(method, dataset, shots)
                    )
                rows.append(
                    dict(
                        method=method,
                        dataset=dataset,
                        shots=int(shots),
                        paper=float("nan") if ref is None else ref,
                        released=released,
                        few_shot=few,
                        released_gap=released - ref if ref is not None else float("nan"),
                        protocol_gap=few - released,
                        test_selected=marked,
                    )
                )
    return pd.DataFrame(
        rows,
        columns=[
            "method",
            "dataset",
            "shots",
            "paper",
            "released",
            "few_shot",
            "released_gap",
            "protocol_gap",
            "test_selected",
        ],
    )


def _mean_over(by_dataset: pd.DataFrame, datasets: list[str], shots: int) -> float:
    """The mean figure of `datasets` at `shots` (those of them the frame has); nan if none."""
    have = [d for d in datasets if (d, shots) in by_dataset.index]
    return by_dataset.loc[[(d, shots) for d in have], "mean"].mean() if have else float("nan")


def side_by_side_markdown(table: pd.DataFrame) -> str:
    def num(x, sign=False):
        return "-" if x != x else (f"{x:+.2f}" if sign else f"{x:.2f}")

    lines = [
        "## published vs released protocol vs few-shot protocol",
        "",
        f"Test accuracy (%), mean over seeds. {TEST_MARK} = chosen on test, as the released code does "
        f"(an oracle; never a champion).",
        "",
        "| method | dataset | shots | paper | released | few-shot | released - paper | few-shot - released |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        mark = TEST_MARK if row.test_selected else ""
        lines.append(
            f"| {row.method} | {row.dataset} | {row.shots} | {num(row.paper)} | {num(row.released)}{mark} | "
            f"{num(row.few_shot)} | {num(row.released_gap, True)} | {num(row.protocol_gap, True)} |"
        )
    return "\n".join(lines) + "\n"


def comparable_to_paper(backbone: str, weights: str) -> str | None:
    """None if ca-flow's numbers can stand beside the published RN50 ones, else why not."""
    if backbone not in ("RN50", "RN50-quickgelu") or weights != "openai":
        return (
            f"published numbers are RN50 with OpenAI weights; this sweep used {backbone} with "
            f"{weights} weights, so they are not comparable"
        )
    return None


def rich_tables(blocks: dict[str, pd.DataFrame], title: str) -> list:
    from rich.table import Table

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
        lines += [
            f"## {method}",
            "",
            "| dataset | " + " | ".join(f"{k} shots" for k in block.columns) + " |",
            "|---|" + "---|" * len(block.columns),
        ]
        lines += [f"| {d} | " + " | ".join(row) + " |" for d, row in block.iterrows()] + [""]
    return "\n".join(lines)


def numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as numbers: method, dataset, shots, mean, std (test accuracy, %), n_seeds, protocol and
    test_selected (chosen on test)."""
    order = {m: i for i, m in enumerate(NAMES)}
    summarised = summary(frame).sort_values(
        ["protocol", "method", "dataset", "shots"], key=lambda c: c.map(order) if c.name == "method" else c
    )
    return (
        summarised[["method", "dataset", "shots", "mean", "std", "n_seeds", "protocol", "test_selected"]]
        .round(4)
        .reset_index(drop=True)
    )


def write_report(
    frame: pd.DataFrame, out_dir: Path, title: str, paper: bool, compare: bool = False
) -> list[Path]:
    """The table as Markdown (cells as printed) and CSV (numbers), the figure as PNG; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "table.md"
    text = markdown(cells(paper_table(frame), paper), title)
    if compare:  # `report --paper`: the protocols side by side, published figures where comparable
        text += "\n" + side_by_side_markdown(side_by_side(frame, comparable=paper))
    md.write_text(text)
    csv = out_dir / "table.csv"
    numbers(frame).to_csv(csv, index=False)
    summarised = summary(frame)
    methods = in_order(NAMES, summarised["method"])
    return [md, csv, figure(summarised, methods, out_dir / "figure.png", title)]
