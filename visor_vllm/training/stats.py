"""Statistics that noise cannot flip: intervals on accuracies and paired tests between configurations.

What.
* `wilson` -- the 95 % Wilson score interval of an accuracy ``k / n`` (every accuracy in a
  recipe's report carries one).
* `mcnemar` -- the exact one-sided McNemar test on the *same* questions: the probability of at
  least as many "A right, B wrong" answers among the discordant ones if A and B were equally
  good (a binomial tail at 1/2).
* `significantly_below(a, b, ratio)` -- A is below ``ratio`` (0.99) of B's accuracy as
  measured *and* B beats A significantly on the discordant questions (pseudo-labels, paper
  App. G's 99 % rule).
* `significantly_better(a, b, margin)` -- A beats B by more than ``margin`` as measured *and*
  significantly (the viable-configuration search).
* `below_pvalue(a, b, ratio)` -- the p-value behind `significantly_below` (1.0 where A meets
  the bar), for tests corrected over many groups.
* `holm(pvalues)` -- Holm's step-down rejections at family-wise level ``alpha``: which of m
  tests stay significant once all m are counted (pseudo-labels' ``test="holm"``).
* `ratio_interval(a, b)` -- the 95 % interval of A's accuracy over B's on the same questions
  (the router's accuracy as a fraction of the maximal configuration's, the issue's 99 % target),
  so a report says whether a seed missing 99 % is a miss the test questions can tell.

Why. The 99 % rule compares accuracies a point apart on 300 questions whose standard error is
~2.9 points: a point estimate flips on noise (measured: ``colour_at``, ``shape_at``, ``exists``
went to costlier configurations on 1-2 point differences). Every configuration answers the same
questions, so only the questions they disagree on carry evidence, and an exact test on those
stays honest with few of them (a paired bootstrap called 3 vs 0 disagreements in 200
questions significant; McNemar's one-sided p is 0.125).

Footguns.
* Inputs are per-question 0/1 results in the same question order for both configurations
  (`visor_vllm.training.evaluate` records, one list per configuration).
* `significantly_below` is not a test of the 99 % bar itself: its null is "A and B are equally
  good" (McNemar), and the 1 % margin is applied to the measured accuracies on top. It never
  drops a configuration that the point rule keeps. With a few hundred questions per family
  (the recipe), the test decides. With many thousands, a configuration measured just under
  99 % of B is dropped about as often as by the point rule, where a non-inferiority test with
  margin 0.01 x B would keep it. `significantly_better(margin)` is built the same way (null:
  equal, margin on the measured difference). Neither corrects for testing many families and
  configurations at once: with 9 families a configuration has a 1-(0.95^9) = 37 % chance that
  some family looks significantly worse when none is. `holm` is that correction.
* `ratio_interval` is the delta method on paired questions (the residuals ``a - R b``): fine at
  the recipe's thousands of questions, too narrow at a few dozen. It is no test of the target:
  the findings judge the measured ratio; the interval only says how far noise could move it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95 %
ALPHA = 0.05             # one-sided tests at 95 %
TESTS = ("paired", "point")  # how search and labels compare configurations (paired: these tests)


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval ``[lo, hi]`` of ``k`` successes in ``n`` (None when n == 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def _discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    if len(a) != len(b) or not len(a):
        raise ValueError("paired results must be two non-empty lists of the same length")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return a_only, b_only


def mcnemar(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact one-sided p-value that A is better than B on paired 0/1 results."""
    a_only, b_only = _discordant(a, b)
    n = a_only + b_only
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(a_only, n + 1)) / 2 ** n


def below_pvalue(a: Sequence[float], b: Sequence[float], ratio: float = 0.99) -> float:
    """McNemar's p that B beats A where A is below ``ratio`` x B's accuracy as measured; 1.0
    where it is not (no test: the bar is met)."""
    _discordant(a, b)
    return mcnemar(b, a) if sum(a) < ratio * sum(b) - 1e-9 else 1.0


def significantly_below(a: Sequence[float], b: Sequence[float], ratio: float = 0.99,
                        alpha: float = ALPHA) -> bool:
    """A's accuracy is below ``ratio`` x B's, and B beats A significantly (see footguns)."""
    return below_pvalue(a, b, ratio) < alpha


def significantly_better(a: Sequence[float], b: Sequence[float], margin: float = 0.0,
                         alpha: float = ALPHA) -> bool:
    """A beats B by more than ``margin`` (a fraction of the questions) and significantly."""
    _discordant(a, b)
    return (sum(a) - sum(b)) / len(a) > margin + 1e-12 and mcnemar(a, b) < alpha


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down test: ``rejected[i]`` for each of the m p-values, family-wise error
    at most ``alpha`` (the i-th smallest p must be below ``alpha / (m - i)``, 0-based, and
    every smaller one rejected). Uniformly more powerful than Bonferroni's ``alpha / m``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] >= alpha / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected


def ratio_interval(a: Sequence[float], b: Sequence[float], z: float = Z95) -> list[float] | None:
    """The 95 % interval ``[lo, hi]`` of ``sum(a) / sum(b)`` for paired 0/1 results on the same
    questions (delta method, footguns); None when B got nothing right."""
    _discordant(a, b)
    n, sb = len(a), sum(b)
    if sb <= 0:
        return None
    r = sum(a) / sb
    resid = [x - r * y for x, y in zip(a, b)]  # mean 0 by construction
    var = sum(e * e for e in resid) / max(n - 1, 1)
    half = z * math.sqrt(var / n) / (sb / n)
    return [round(r - half, 4), round(r + half, 4)]
