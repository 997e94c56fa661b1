from collections import Counter

import pytest

from workflows.sweep import SweepError, SweepSpec, grid


def test_grid_axes_per_method_and_variant():
    spec = SweepSpec(shots=[1, 16], seeds=[1, 2], alphas=[0.2, 0.6], betas=[0.1, 0.5],
                     adapters=["visual", "text", "both"], methods=["clip-adapter", "zero-shot", "tip-adapter"],
                     backbone="ca-flow-tiny", pretrained="random")
    trials = grid(spec, ["d"])
    by = Counter((t["method"], t["hparams"].get("variant")) for t in trials)
    # visual: alphas only; text: betas only; both: alphas x betas; each x shots x seeds
    assert by == {("clip-adapter", "visual"): 2 * 2 * 2, ("clip-adapter", "text"): 2 * 2 * 2,
                  ("clip-adapter", "both"): 4 * 2 * 2, ("zero-shot", None): 2, ("tip-adapter", None): 2 * 2}
    assert len({t["key"] for t in trials}) == len(trials)  # every trial has its own identity
    assert {t["hparams"]["epochs"] for t in trials if t["method"] == "clip-adapter" and t["shots"] == 1} == {50}
    assert {t["hparams"]["epochs"] for t in trials if t["method"] == "clip-adapter" and t["shots"] == 16} == {200}
    assert grid(spec, ["d"]) == trials  # keys are stable: a resumed sweep finds its runs


def test_unknown_method_is_refused():
    with pytest.raises(SweepError, match="unknown method 'cocoop'"):
        SweepSpec(methods=["cocoop"], backbone="ca-flow-tiny").validate()
