import pandas as pd
import pytest

from workflows.report import cells, comparable_to_paper, paper_table, select_on_val, summary


def frame(rows):
    base = dict(status="FINISHED", adapter="visual", beta=0.2, zs_test_acc=0.5)
    return pd.DataFrame([{**base, **r, "run_id": f"r{i}"} for i, r in enumerate(rows)])


def trial(dataset, method, shots, seed, alpha, val, test):
    return dict(dataset=dataset, method=method, shots=shots, seed=seed, alpha=alpha, val_acc=val, test_acc=test)


def test_selection_reads_val_only_and_ties_go_to_the_smaller_alpha():
    f = frame([trial("d", "clip-adapter", 1, 1, 0.2, 0.5, 0.10), trial("d", "clip-adapter", 1, 1, 0.6, 0.5, 0.90),
               trial("d", "clip-adapter", 1, 2, 0.2, 0.4, 0.90), trial("d", "clip-adapter", 1, 2, 0.6, 0.7, 0.20)])
    chosen = select_on_val(f.drop(columns=["test_acc", "zs_test_acc"]))  # works without any test column
    assert chosen.set_index("seed")["alpha"].to_dict() == {1: 0.2, 2: 0.6}
    s = summary(f).iloc[0]
    assert s["mean"] == pytest.approx(15.0) and s["std"] == pytest.approx(pd.Series([10.0, 20.0]).std())


def test_table_has_average_row_and_untrained_methods_fill_every_shots_column():
    f = frame([trial(d, "clip-adapter", k, s, 0.2, 0.5, acc) for d, acc in (("a", 0.6), ("b", 0.8))
               for k in (1, 2) for s in (1, 2)]
              + [trial(d, "zero-shot", 2, s, float("nan"), 0.3, 0.4) for d in ("a", "b") for s in (1, 2)])
    blocks = paper_table(f)
    mean, _ = blocks["clip-adapter"]
    assert mean.loc["average", 1] == pytest.approx(70.0)
    assert list(blocks["zero-shot"][0].columns) == [1, 2]
    assert cells(blocks)["zero-shot"].loc["a"].tolist() == ["40.00 +- 0.00"] * 2


def test_paper_numbers_and_the_difference():
    f = frame([trial("eurosat", "clip-adapter", 16, s, 0.2, 0.5, 0.8443 + d) for s, d in ((1, 0.01), (2, -0.01))])
    text = cells(paper_table(f), paper=True)["clip-adapter"]
    assert text.loc["eurosat", 16] == "84.43 +- 1.41 (paper 84.43, +0.00)"
    assert text.loc["average", 16].startswith("84.43 +- 1.41 (paper 74.44, +9.99)")
    assert comparable_to_paper("RN50-quickgelu", "openai") is None
    assert "not comparable" in comparable_to_paper("ViT-B-32-quickgelu", "openai")
