"""Results of a sweep: the per-trial frame, selection on validation, the summary table."""
from __future__ import annotations

import pandas as pd
from rich.table import Table

RESULT_COLUMNS = ["sweep_id", "key", "run_id", "dataset", "shots", "seed", "adapter", "alpha", "beta",
                  "val_acc", "test_acc", "zs_test_acc", "train_loss_final", "trial_seconds", "status", "error"]


def results_frame(rows: list[dict], sweep_id: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.insert(0, "sweep_id", sweep_id)
    return frame[RESULT_COLUMNS].sort_values(["dataset", "shots", "seed", "adapter", "alpha", "beta"],
                                             ignore_index=True)


def select_on_val(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, shots, seed), the finished trial with the best val_acc; test is never read.

    Ties go to the smaller alpha, then beta (the run closer to zero-shot CLIP).
    """
    done = frame[frame["status"] == "FINISHED"][["dataset", "shots", "seed", "adapter", "alpha", "beta",
                                                 "val_acc", "run_id"]]
    ranked = done.assign(_val=done["val_acc"].fillna(-1.0)).sort_values(
        ["dataset", "shots", "seed", "_val", "alpha", "beta"], ascending=[True, True, True, False, True, True])
    return ranked.groupby(["dataset", "shots", "seed"], as_index=False).head(1).drop(columns="_val")


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the test accuracy at the val-chosen point, beside zero-shot."""
    chosen = select_on_val(frame)
    # Test metrics are joined only after the choice is made.
    picked = chosen.merge(frame[["run_id", "test_acc", "zs_test_acc"]], on="run_id")
    return picked.groupby(["dataset", "shots"], as_index=False).agg(
        seeds=("seed", "nunique"), test_mean=("test_acc", "mean"), test_std=("test_acc", "std"),
        zs_test=("zs_test_acc", "mean"), alphas=("alpha", lambda a: ",".join(f"{x:g}" for x in a)))


def summary_table(frame: pd.DataFrame) -> Table:
    table = Table(title="test accuracy at the alpha chosen on validation (mean +- std over seeds)")
    for col in ("dataset", "shots", "seeds", "CLIP-Adapter", "zero-shot", "alpha per seed"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for row in summary(frame).itertuples():
        std = 0.0 if pd.isna(row.test_std) else row.test_std
        table.add_row(row.dataset, str(row.shots), str(row.seeds), f"{100 * row.test_mean:.2f} +- {100 * std:.2f}",
                      f"{100 * row.zs_test:.2f}", row.alphas)
    return table
