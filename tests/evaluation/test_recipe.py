"""The served side of `visor-vllm recipe synthetic` (visor_vllm.evaluation.recipe), pure parts."""

import pytest

from visor_vllm.evaluation.recipe import _paired_ratio_ci


def _pass(correct, start=0):
    return {"samples": [{"index": start + i, "correct": c} for i, c in enumerate(correct)]}


def test_router_interval_pairs_the_two_passes_by_question():
    full = _pass([1] * 800 + [0] * 200)
    router = _pass([1] * 790 + [0] * 210)
    lo, hi = _paired_ratio_ci(router, full)           # 0.9875 +- 0.0077 (stats' known value)
    assert lo == pytest.approx(0.9798, abs=2e-4) and hi == pytest.approx(0.9952, abs=2e-4)
    # joined by question, not by position: a shuffled pass gives the same interval
    shuffled = {"samples": full["samples"][::-1]}
    assert _paired_ratio_ci(router, shuffled) == [lo, hi]
    # only the questions both passes answered count: 500-999, where the router has 290 right
    lo2, hi2 = _paired_ratio_ci(router, _pass([1] * 1000, start=500))
    assert (lo2 + hi2) / 2 == pytest.approx(290 / 500, abs=1e-4)
    assert _paired_ratio_ci({"samples": []}, full) is None
    assert _paired_ratio_ci(router, {}) is None
