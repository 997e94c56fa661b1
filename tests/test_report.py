"""The report: selection on validation, the table and its published numbers, the CSV and the figure.

Frames are built by hand here (the columns `runs_table.frame` gives), oracles written out in the test."""

import csv
import math

import pandas as pd
import pytest

from workflows.report import (
    ALL_11,
    PAPER_16_SHOT,
    PAPER_AVERAGE,
    PAPER_ZERO_SHOT,
    cells,
    comparable_to_paper,
    numbers,
    paper_average,
    paper_table,
    select_on_val,
    summary,
    write_report,
)
from workflows.report_figure import draw


def frame(rows):
    base = dict(status="FINISHED", adapter="visual", beta=0.2, zs_test_acc=0.5)
    return pd.DataFrame([{**base, **r, "run_id": f"r{i}"} for i, r in enumerate(rows)])


def trial(dataset, method, shots, seed, alpha, val, test):
    return dict(
        dataset=dataset, method=method, shots=shots, seed=seed, alpha=alpha, val_acc=val, test_acc=test
    )


def adapter_sweep(datasets, shots, test=0.80):
    """CLIP-Adapter on `datasets` x `shots`, seeds 1 and 2, test accuracy `test` everywhere."""
    return frame(
        [trial(d, "clip-adapter", k, s, 0.2, 0.5, test) for d in datasets for k in shots for s in (1, 2)]
    )


def test_selection_reads_val_only_and_ties_go_to_the_smaller_alpha():
    f = frame(
        [
            trial("d", "clip-adapter", 1, 1, 0.2, 0.5, 0.10),
            trial("d", "clip-adapter", 1, 1, 0.6, 0.5, 0.90),
            trial("d", "clip-adapter", 1, 2, 0.2, 0.4, 0.90),
            trial("d", "clip-adapter", 1, 2, 0.6, 0.7, 0.20),
        ]
    )
    chosen = select_on_val(f.drop(columns=["test_acc", "zs_test_acc"]))  # works without any test column
    assert chosen.set_index("seed")["alpha"].to_dict() == {1: 0.2, 2: 0.6}
    s = summary(f).iloc[0]
    assert s["mean"] == pytest.approx(15.0) and s["std"] == pytest.approx(pd.Series([10.0, 20.0]).std())
    assert s["n_seeds"] == 2


def test_summary_is_the_mean_and_sample_std_over_three_seeds():
    # 50, 52, 60 %: mean 54 (the median is 52), sample std sqrt((16 + 4 + 36) / 2) = sqrt(28)
    # (the population std would be sqrt(56 / 3)); each seed's val-chosen alpha is the one tested.
    f = frame(
        [
            trial("d", "clip-adapter", 4, s, a, v, t)
            for s, a, v, t in (
                (1, 0.2, 0.6, 0.50),
                (1, 0.6, 0.5, 0.99),
                (2, 0.2, 0.6, 0.52),
                (3, 0.6, 0.7, 0.60),
                (3, 0.2, 0.4, 0.01),
            )
        ]
    )
    s = summary(f).iloc[0]
    assert s["mean"] == pytest.approx(54.0) and s["std"] == pytest.approx(math.sqrt(28))
    assert s["n_seeds"] == 3
    mean, std = paper_table(f)["clip-adapter"]
    assert (mean.loc["d", 4], std.loc["d", 4]) == pytest.approx((54.0, math.sqrt(28)))
    assert cells(paper_table(f))["clip-adapter"].loc["d", 4] == f"54.00 +- {math.sqrt(28):.2f}"


def test_table_has_average_row_and_untrained_methods_fill_every_shots_column():
    f = frame(
        [
            trial(d, "clip-adapter", k, s, 0.2, 0.5, acc)
            for d, acc in (("a", 0.6), ("b", 0.8))
            for k in (1, 2)
            for s in (1, 2)
        ]
        + [trial(d, "zero-shot", 2, s, float("nan"), 0.3, 0.4) for d in ("a", "b") for s in (1, 2)]
    )
    blocks = paper_table(f)
    mean, _ = blocks["clip-adapter"]
    assert mean.loc["average", 1] == pytest.approx(70.0)
    assert list(blocks["zero-shot"][0].columns) == [1, 2]
    assert cells(blocks)["zero-shot"].loc["a"].tolist() == ["40.00 +- 0.00"] * 2


# -- the published numbers: per dataset, and an average only over what both have ---------------------


def test_one_dataset_compares_per_dataset_and_its_average_only_with_that_dataset():
    # Was: the average row of a one-dataset sweep set against the 11-dataset average (74.44, "+9.99").
    f = frame(
        [trial("eurosat", "clip-adapter", 16, s, 0.2, 0.5, 0.8443 + d) for s, d in ((1, 0.01), (2, -0.01))]
    )
    text = cells(paper_table(f), paper=True)["clip-adapter"]
    assert text.loc["eurosat", 16] == "84.43 +- 1.41 (paper 84.43, +0.00)"
    assert text.loc["average", 16] == "84.43 +- 1.41 (paper 84.43 over eurosat, +0.00)"
    assert "74.44" not in text.loc["average", 16] and "11 datasets" not in text.loc["average", 16]
    assert paper_average("clip-adapter", 16, ["eurosat"]) == (84.43, ["eurosat"])


def test_two_datasets_average_over_those_two_and_names_them():
    text = cells(paper_table(adapter_sweep(["eurosat", "dtd"], [16])), paper=True)["clip-adapter"]
    paper = (PAPER_16_SHOT["clip-adapter"]["dtd"] + PAPER_16_SHOT["clip-adapter"]["eurosat"]) / 2  # 75.195
    assert text.loc["dtd", 16] == f"80.00 +- 0.00 (paper 65.96, {80 - 65.96:+.2f})"
    assert text.loc["eurosat", 16] == f"80.00 +- 0.00 (paper 84.43, {80 - 84.43:+.2f})"
    assert (
        text.loc["average", 16] == f"80.00 +- 0.00 (paper {paper:.2f} over dtd, eurosat, {80 - paper:+.2f})"
    )
    ref, over = paper_average("clip-adapter", 16, ["dtd", "eurosat"])
    assert ref == pytest.approx(paper) and over == ["dtd", "eurosat"]


def test_a_dataset_the_papers_lack_is_left_out_of_the_average_and_the_row_says_over_which():
    f = frame(
        [
            trial(d, "clip-adapter", 16, s, 0.2, 0.5, acc)
            for d, acc in (("eurosat", 0.80), ("colours", 0.40))
            for s in (1, 2)
        ]
    )
    text = cells(paper_table(f), paper=True)["clip-adapter"]
    assert text.loc["colours", 16] == "40.00 +- 0.00"  # no published figure for a user's own folder
    # ca-flow's own average (60) stays first; the comparison uses eurosat alone, on both sides.
    assert text.loc["average", 16] == "60.00 +- 0.00 (over eurosat: 80.00, paper 84.43, -4.43)"


def test_all_11_datasets_compare_with_the_published_11_dataset_average():
    f = adapter_sweep(sorted(ALL_11), [4, 16])
    text = cells(paper_table(f), paper=True)["clip-adapter"]
    for shots in (4, 16):
        ref = PAPER_AVERAGE["clip-adapter"][shots]
        assert (
            text.loc["average", shots] == f"80.00 +- 0.00 (paper {ref:.2f} over 11 datasets, {80 - ref:+.2f})"
        )
        assert paper_average("clip-adapter", shots, sorted(ALL_11)) == (ref, sorted(ALL_11))
    assert text.loc["average", 16].startswith("80.00 +- 0.00 (paper 74.44 over 11 datasets")


@pytest.mark.parametrize("datasets", [["eurosat"], ["dtd", "eurosat"], sorted(ALL_11 - {"imagenet"})])
def test_shots_without_per_dataset_numbers_and_fewer_than_11_datasets_show_no_paper_average(datasets):
    # CLIP-Adapter publishes per-dataset numbers at 16 shots only; 4 shots has just the 11-dataset average.
    text = cells(paper_table(adapter_sweep(datasets, [4, 16])), paper=True)["clip-adapter"]
    assert text.loc["average", 4] == "80.00 +- 0.00"
    assert all(text.loc[d, 4] == "80.00 +- 0.00" for d in datasets)
    assert paper_average("clip-adapter", 4, datasets) is None
    assert "paper" in text.loc["average", 16] and "11 datasets" not in text.loc["average", 16]


def test_zero_shot_publishes_every_dataset_so_a_subset_compares_at_every_shots():
    f = frame(
        [trial(d, "zero-shot", 4, s, float("nan"), 0.3, 0.5) for d in ("dtd", "eurosat") for s in (1, 2)]
        + [
            trial(d, "clip-adapter", k, s, 0.2, 0.5, 0.8)
            for d in ("dtd", "eurosat")
            for k in (1, 4)
            for s in (1, 2)
        ]
    )
    text = cells(paper_table(f), paper=True)["zero-shot"]
    paper = (PAPER_ZERO_SHOT["dtd"] + PAPER_ZERO_SHOT["eurosat"]) / 2
    for shots in (1, 4):
        assert (
            text.loc["average", shots]
            == f"50.00 +- 0.00 (paper {paper:.2f} over dtd, eurosat, {50 - paper:+.2f})"
        )


def test_without_paper_no_published_figure_is_shown():
    text = cells(paper_table(adapter_sweep(["eurosat"], [16])))["clip-adapter"]
    assert text.loc["eurosat", 16] == text.loc["average", 16] == "80.00 +- 0.00"


def test_comparable_only_for_rn50_with_openai_weights():
    assert comparable_to_paper("RN50-quickgelu", "openai") is None
    assert comparable_to_paper("RN50", "openai") is None
    assert "not comparable" in comparable_to_paper("ViT-B-32-quickgelu", "openai")
    assert "not comparable" in comparable_to_paper("RN50-quickgelu", "random")


# -- the files: CSV of numbers, the figure ------------------------------------------------------------

SEED_OFFSET = {1: 0.00, 2: 0.01, 3: 0.05}
MEAN_OFFSET, SEED_STD = 2.0, math.sqrt(7)  # in points, over the three offsets above


def two_methods():
    """Two datasets, CLIP-Adapter at 1, 2, 4 shots (a spread over the papers' 3 seeds), zero-shot once per seed.

    The seeds' offsets 0, 1 and 5 points are uneven: their mean (2) is not their median (1), and their
    sample std is sqrt(((0-2)^2 + (1-2)^2 + (5-2)^2) / (3-1)) = sqrt(7), not the population std sqrt(14/3).
    """
    rows = [
        trial(d, "clip-adapter", k, s, 0.2, 0.5, base + 0.02 * k + SEED_OFFSET[s])
        for d, base in (("a", 0.5), ("b", 0.6))
        for k in (1, 2, 4)
        for s in (1, 2, 3)
    ]
    rows += [
        trial(d, "zero-shot", 4, s, float("nan"), 0.3, acc)
        for d, acc in (("a", 0.40), ("b", 0.46))
        for s in (1, 2, 3)
    ]
    return frame(rows)


def test_csv_holds_numbers_method_dataset_shots_mean_std_n_seeds(tmp_path):
    paths = write_report(two_methods(), tmp_path / "out", "title", paper=False)
    assert [p.name for p in paths] == ["table.md", "table.csv", "figure.png"]
    csv_path = tmp_path / "out" / "table.csv"
    with open(csv_path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["method", "dataset", "shots", "mean", "std", "n_seeds", "protocol", "test_selected"]
    for method, dataset, shots, mean, std, n, protocol, on_test in rows[1:]:  # every figure a number: no "+-"
        assert method in ("clip-adapter", "zero-shot") and dataset in ("a", "b")
        assert (protocol, on_test) == ("few-shot", "False")
        int(shots), float(mean), float(std), int(n)
    table = pd.read_csv(csv_path)
    assert table["shots"].dtype.kind == "i" and table["n_seeds"].dtype.kind == "i"
    assert table["mean"].dtype.kind == "f" and table["std"].dtype.kind == "f"
    got = table.set_index(["method", "dataset", "shots"])
    # test accuracy in %, mean and sample std over the 3 seeds: 50 + 4 + 2 = 56, sqrt(7)
    assert got.loc[("clip-adapter", "a", 2), "mean"] == pytest.approx(56.0, abs=1e-4)
    assert got.loc[("clip-adapter", "a", 2), "std"] == pytest.approx(SEED_STD, abs=1e-4)
    assert got.loc[("clip-adapter", "a", 2), "n_seeds"] == 3
    # zero-shot fits nothing: the same number in every shots column, and its std over seeds is 0
    assert got.loc[("zero-shot", "b")]["mean"].tolist() == pytest.approx([46.0] * 3)
    assert table.equals(numbers(two_methods()))
    assert (tmp_path / "out" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "+-" in (tmp_path / "out" / "table.md").read_text()  # the Markdown is the human table


def test_figure_has_error_bars_and_zero_shot_as_a_horizontal_line():
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D

    fig = draw(
        summary(two_methods()), ["clip-adapter", "zero-shot"], "test accuracy (%), mean +- std over seeds"
    )
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"a", "b", "average"}
    # Written out from two_methods: base + 2 points per shot + the seeds' mean offset; the average
    # panel is the mean of a (base 50) and b (base 60); zero-shot is a's 40 and b's 46.
    base = {"a": 50.0, "b": 60.0, "average": 55.0}
    zero_shot = {"a": 40.0, "b": 46.0, "average": 43.0}
    for name, ax in panels.items():
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert bars.get_label() == "clip-adapter" and bars.has_yerr
        line, _, (vertical,) = bars.lines
        assert list(line.get_xdata()) == [1, 2, 4]
        assert list(line.get_ydata()) == pytest.approx([base[name] + 2 * k + MEAN_OFFSET for k in (1, 2, 4)])
        half = [(seg[1][1] - seg[0][1]) / 2 for seg in vertical.get_segments()]
        assert half == pytest.approx([SEED_STD] * 3)
        # zero-shot: one dashed Line2D, constant y at its mean, across the whole panel (axes coordinates)
        (zs,) = [ln for ln in ax.get_lines() if isinstance(ln, Line2D) and ln.get_label() == "zero-shot"]
        y = set(zs.get_ydata())
        assert len(y) == 1 and y.pop() == pytest.approx(zero_shot[name])
        assert list(zs.get_xdata()) == [0, 1] and zs.get_linestyle() == "--"
        assert not [c for c in ax.containers if c.get_label() == "zero-shot"]  # not drawn against shots
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert math.isclose(fig.get_figwidth(), 4 * 3)


def test_gda_published_numbers_are_its_logs():
    # mrflogs/ICLR24 560fe21 exp.log, row "ours" (RN50, mean of seeds 1-3): DTD and EuroSAT, 1..16 shots.
    f = frame(
        [
            trial(d, "gda", k, s, float("nan"), 0.5, 0.80)
            for d in ("dtd", "eurosat")
            for k in (1, 16)
            for s in (1, 2)
        ]
    )
    text = cells(paper_table(f), paper=True)["gda"]
    assert text.loc["dtd", 1] == "80.00 +- 0.00 (paper 46.26, +33.74)"
    assert text.loc["eurosat", 16] == "80.00 +- 0.00 (paper 86.12, -6.12)"
    # 11 datasets at 16 shots: the 76.05 the log's rows average to.
    text = cells(
        paper_table(frame([trial(d, "gda", 16, 1, float("nan"), 0.5, 0.80) for d in sorted(ALL_11)])),
        paper=True,
    )["gda"]
    assert text.loc["average", 16] == "80.00 +- 0.00 (paper 76.05 over 11 datasets, +3.95)"
