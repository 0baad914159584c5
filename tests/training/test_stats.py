"""Intervals and paired tests (visor_vllm.training.stats) on cases with known answers."""

import random

import pytest

from visor_vllm.training.stats import (holm, mcnemar, ratio_interval, significantly_below,
                                       significantly_better, wilson)


def test_wilson_interval_known_values():
    assert wilson(0, 0) is None
    lo, hi = wilson(210, 300)                         # 0.70 on 300: about +-5.2 points
    assert lo == pytest.approx(0.6459, abs=2e-4) and hi == pytest.approx(0.7491, abs=2e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def _q(n, right):
    return [1] * right + [0] * (n - right)


def test_mcnemar_exact_tail():
    a, b = _q(200, 163), _q(200, 160)                 # 3 vs 0 discordant
    assert mcnemar(a, b) == pytest.approx(0.125)
    assert mcnemar(b, a) == 1.0 and mcnemar(a, a) == 1.0
    with pytest.raises(ValueError, match="same length"):
        mcnemar([1], [1, 0])


def test_below_and_better_need_significance():
    same = _q(300, 200)
    noisy = _q(300, 195) + [0] * 0                    # 5 vs 0 discordant: p = 1/32
    assert significantly_below(noisy, same, 0.99)
    few = _q(300, 197)                                # 3 vs 0: p = 1/8
    assert not significantly_below(few, same, 0.99)
    assert not significantly_below(same, same, 0.99)
    far = _q(300, 150)
    assert significantly_better(same, far, margin=0.02)
    assert not significantly_better(same, few, margin=0.0)
    assert not significantly_better(same, far, margin=0.5)  # significant, not by 50 points


def test_holm_steps_down_and_beats_bonferroni():
    assert holm([0.01, 0.04, 0.03, 0.5]) == [True, False, False, False]  # 0.03 >= 0.05 / 3
    assert holm([0.01, 0.03]) == [True, True]  # Bonferroni (0.025 each) keeps the second
    assert holm([0.2, 0.001]) == [False, True] and holm([]) == []


def test_ratio_interval_known_value_and_edges():
    full, router = _q(1000, 800), _q(1000, 790)       # the router loses 10 of max's 800
    lo, hi = ratio_interval(router, full)             # 0.9875, delta method: +-0.0077
    assert lo == pytest.approx(0.9798, abs=2e-4) and hi == pytest.approx(0.9952, abs=2e-4)
    assert ratio_interval(full, full) == [1.0, 1.0]   # no discordant question: no doubt
    assert ratio_interval(full, [0] * 1000) is None
    with pytest.raises(ValueError, match="same length"):
        ratio_interval([1], [1, 0])


def test_ratio_interval_covers_the_true_ratio_about_95_percent():
    rng, n, hits = random.Random(0), 2000, 0
    for _ in range(300):                              # B right 80 %, A loses 1.5 % of those
        b = [int(rng.random() < 0.8) for _ in range(n)]
        a = [y if rng.random() >= 0.015 else 0 for y in b]
        lo, hi = ratio_interval(a, b)
        hits += lo <= 0.985 <= hi
    assert 0.90 <= hits / 300 <= 0.99
