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


def test_a_method_that_chose_its_ratio_ranks_by_the_ratio_it_used(tmp_path):
    """Three runs tie on val_acc, shots and seed. Tip-Adapter logs its starting alpha (0.1) and the
    alpha its search chose (2.0): it used 2.0, so it ranks after CLIP-Adapter at 0.6 and zero-shot
    (no ratio: 0) ranks first. A rule reading the starting alpha, or taking a chosen ratio as none,
    puts Tip-Adapter second or first."""
    from mlflow import MlflowClient
    from workflows.promote import best_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("ranking")
    runs = {
        "zero-shot": {},
        "clip-adapter": {"alpha": "0.6"},
        "tip-adapter": {"alpha": "0.1", "chosen_alpha": "2.0", "beta": "1", "chosen_beta": "5.5"},
    }
    ids = {}
    for method, ratios in runs.items():
        run = client.create_run(exp)
        ids[run.info.run_id] = method
        for key, value in {"dataset": "d", "method": method, "shots": "4", "seed": "1", **ratios}.items():
            client.log_param(run.info.run_id, key, value)
        for metric in ("val_acc", "test_acc", "zs_test_acc"):
            client.log_metric(run.info.run_id, metric, 0.8)
        client.set_terminated(run.info.run_id)
    logged = client.search_runs([exp])
    order = []
    while logged:
        top = best_run(logged)
        order.append(ids[top.info.run_id])
        logged = [r for r in logged if r.info.run_id != top.info.run_id]
    assert order == ["zero-shot", "clip-adapter", "tip-adapter"]
