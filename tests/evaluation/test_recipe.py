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
    # only the questions both passes answered count: shifted indices pair the wrong questions
    assert _paired_ratio_ci(router, _pass([1] * 1000, start=500)) != [lo, hi]
    assert _paired_ratio_ci({"samples": []}, full) is None
    assert _paired_ratio_ci(router, {}) is None
