"""One ranking rule for every choice of a best run (the parent's summary, the report, promote): the
expected order is written out here."""

import pandas as pd

from workflows.runs_table import rank_runs

NAN = float("nan")


def test_best_val_then_more_shots_lower_seed_smaller_alpha_and_beta_then_run_id():
    rows = [  # run_id, val_acc, shots, seed, alpha, beta
        ("r3", 0.8, 4, 1, 0.6, 0.2),
        ("r9", 0.8, 4, 1, 0.2, 0.2),
        ("r5", 0.8, 4, 1, 0.2, 0.2),
        ("r1", 0.8, 2, 1, 0.2, 0.2),
        ("r2", 0.8, 4, 2, 0.2, 0.2),
        ("r0", 0.7, 16, 1, 0.2, 0.2),
        ("r4", NAN, 16, 1, 0.2, 0.2),
        ("r7", 0.8, 4, 1, 0.2, 0.6),
        ("r8", 0.8, 4, 1, NAN, NAN),
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "val_acc", "shots", "seed", "alpha", "beta"])
    # r8 has no ratio (zero-shot): it counts as alpha 0, closest to zero-shot of all.
    assert rank_runs(frame)["run_id"].tolist() == ["r8", "r5", "r9", "r7", "r3", "r2", "r1", "r0", "r4"]
