"""The pseudo-label rules on hand-made per-configuration results, ties included."""

import pytest

from visor_vllm.training.labels import (full_index, group_labels, oracle_labels, per_sample,
                                        pooled_labels)

CONFIGS = [[0], [0, 2], [0, 4], [0, 2, 4]]


def _res(correct, loss, family, prefix=None):
    return [{"correct": c, "loss": l, "family": f, "prefix": c if prefix is None else p}
            for c, l, f, p in zip(correct, loss, family, prefix or correct)]


def test_group_rule_cheapest_within_99_percent_then_loss():
    fam = ["easy"] * 4 + ["hard"] * 4
    results = [
        _res([1, 1, 1, 1, 0, 0, 1, 0], [1] * 8, fam),     # [0]: easy 1.0, hard .25
        _res([1, 1, 1, 1, 1, 1, 1, 0], [2] * 8, fam),     # [0,2]: hard .75, higher loss
        _res([1, 1, 1, 1, 1, 1, 1, 0], [1] * 8, fam),     # [0,4]: hard .75, lower loss
        _res([1, 1, 1, 1, 1, 1, 1, 0], [3] * 8, fam),     # full: hard .75
    ]
    got = group_labels(CONFIGS, results, test="point")
    assert got["easy"]["config"] == 0                        # ties on accuracy -> fewest layers
    assert got["hard"]["config"] == 2                        # same size -> lowest loss
    assert got["hard"]["kept"] == [1, 2, 3]
    assert per_sample(CONFIGS, results, test="point") == [0] * 4 + [2] * 4


def test_group_rule_99_percent_threshold_is_relative_to_the_full_configuration():
    fam = ["f"] * 100
    results = [_res([1] * 98 + [0] * 2, [1] * 100, fam), _res([1] * 99 + [0], [1] * 100, fam),
               _res([1] * 97 + [0] * 3, [1] * 100, fam), _res([1] * 100, [1] * 100, fam)]
    got = group_labels(CONFIGS, results, test="point")
    assert got["f"]["kept"] == [1, 3] and got["f"]["config"] == 1   # .98 < .99 <= .99


def test_full_index_ties_go_to_the_later_configuration():
    assert full_index([[0], [0, 2], [0, 4]]) == 2


def test_oracle_most_matched_tokens_then_fewest_layers_then_loss():
    fam = ["x"] * 3
    results = [_res([0, 1, 0], [5, 1, 1], fam, prefix=[1, 2, 0]),
               _res([1, 1, 0], [1, 1, 1], fam, prefix=[2, 2, 0]),
               _res([1, 1, 0], [0.5, 1, 0.5], fam, prefix=[2, 2, 0]),
               _res([1, 1, 0], [0.1, 1, 2], fam, prefix=[2, 2, 0])]
    assert oracle_labels(CONFIGS, results) == [2, 0, 0]  # nothing right: the cheapest


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="one list"):
        group_labels(CONFIGS, [[]])
    with pytest.raises(ValueError, match="same samples"):
        group_labels(CONFIGS[:2], [_res([1], [1], ["a"]), _res([1, 1], [1, 1], ["a", "a"])])
    with pytest.raises(ValueError, match="rule"):
        per_sample(CONFIGS, [_res([1], [1], ["a"])] * 4, rule="x")


def _pair(n, both, only_full, only_cheap):
    """Per-question 0/1 results of a cheap and the full configuration on ``n`` questions."""
    cheap = [1] * both + [0] * only_full + [1] * only_cheap
    full = [1] * both + [1] * only_full + [0] * only_cheap
    pad = n - len(cheap)
    return cheap + [0] * pad, full + [0] * pad


def test_paired_rule_keeps_a_configuration_that_is_below_only_on_noise():
    """300 questions, the cheap configuration 1.3 points behind with 9 vs 5 discordant answers
    (what flipped colour_at, shape_at and exists): the point rule drops it, the paired keeps it."""
    cheap, full = _pair(300, 200, 9, 5)
    fam = ["f"] * 300
    results = [_res(cheap, [1] * 300, fam), _res(cheap, [1] * 300, fam),
               _res(cheap, [1] * 300, fam), _res(full, [1] * 300, fam)]
    assert group_labels(CONFIGS, results, test="point")["f"]["config"] == 3
    got = group_labels(CONFIGS, results)
    assert got["f"]["test"] == "paired" and got["f"]["config"] == 0 and 0 in got["f"]["kept"]


def test_paired_rule_drops_a_configuration_that_is_really_below():
    """10 points behind on 300 questions (40 vs 10 discordant): dropped by both rules."""
    cheap, full = _pair(300, 150, 40, 10)
    fam = ["f"] * 300
    results = [_res(cheap, [1] * 300, fam), _res(full, [2] * 300, fam),
               _res(cheap, [1] * 300, fam), _res(full, [3] * 300, fam)]
    for test in ("paired", "point"):
        got = group_labels(CONFIGS, results, test=test)["f"]
        assert got["kept"] == [1, 3] and got["config"] == 1, test


def test_holm_rule_forgives_one_family_among_nine_that_looks_worse_by_chance():
    """Nine families; on one the cheap configuration is 3 points behind (12 vs 3 discordant
    answers, McNemar p = 0.018): the paired rule sends that family to the full configuration,
    Holm's correction over the nine keeps the cheap one (p must beat 0.05 / 9). A family 10
    points behind (p < 1e-5) goes to the full configuration under both."""
    fams = [f"f{i}" for i in range(9)]
    cheap, full, fam = [], [], []
    for f in fams:
        c, u = (_pair(300, 200, 12, 3) if f == "f0" else _pair(300, 150, 40, 10) if f == "f1"
                else _pair(300, 250, 2, 2))
        cheap, full, fam = cheap + c, full + u, fam + [f] * 300
    n = len(fam)
    results = [_res(cheap, [1] * n, fam), _res(cheap, [1] * n, fam),
               _res(cheap, [1] * n, fam), _res(full, [1] * n, fam)]
    paired, holm = group_labels(CONFIGS, results), group_labels(CONFIGS, results, test="holm")
    assert paired["f0"]["config"] == 3 and holm["f0"]["config"] == 0
    assert paired["f1"]["config"] == holm["f1"]["config"] == 3
    assert all(holm[f]["config"] == 0 and holm[f]["test"] == "holm" for f in fams[2:])
    assert per_sample(CONFIGS, results, test="holm")[:300] == [0] * 300
    with pytest.raises(ValueError, match="test is one of"):
        group_labels(CONFIGS, results, test="bonferroni")


def test_cheapest_mix_spends_where_it_pays_and_meets_the_pooled_ratio():
    from visor_vllm.training.labels import cheapest_mix

    flops = [1.0, 2.0, 3.0]  # min, mid, full
    q = {"easy": 100, "hard": 100}
    correct = [{"easy": 99, "hard": 60}, {"easy": 99, "hard": 80}, {"easy": 100, "hard": 90}]
    b = cheapest_mix(flops, correct, q, full=2, ratio=0.99)
    # full: 190 right; 99 % of it is 188.1: easy on min (99) and hard on full (90) = 189 at 2.0
    assert b["choice"] == {"easy": 0, "hard": 2}
    assert b["flops"] == pytest.approx(2.0) and b["accuracy"] == pytest.approx(189 / 200)
    assert b["full_accuracy"] == pytest.approx(0.95)
    # a looser ratio lets the mid configuration take hard
    assert cheapest_mix(flops, correct, q, full=2, ratio=0.9)["choice"] == {"easy": 0, "hard": 1}
    # when the cheapest configuration is as good everywhere, it takes everything
    same = [{"easy": 90, "hard": 90}] * 3
    assert cheapest_mix(flops, same, q, full=2)["flops"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cheapest_mix(flops, correct[:2], q, full=2)
    with pytest.raises(ValueError):
        cheapest_mix(flops, [{"easy": 1}] * 3, q, full=2)


def test_pooled_rule_lets_one_family_pay_for_another():
    """The paper's rule keeps 99 % of every family; the pooled rule keeps 99 % of the whole."""
    configs = [[0], [0, 2]]
    fam = ["a"] * 100 + ["b"] * 100
    # a: 98 vs 100 right (the cheap one is 2 points below); b: 100 vs 100
    cheap = _res([1] * 98 + [0] * 2 + [1] * 100, [0.1] * 200, fam)
    full = _res([1] * 200, [0.1] * 200, fam)
    results = [cheap, full]
    assert group_labels(configs, results, test="point")["a"]["config"] == 1
    assert pooled_labels(configs, results, [1.0, 2.0]) == {"a": 0, "b": 0}  # 198 >= 0.99 * 200
    assert per_sample(configs, results, "pooled", flops=[1.0, 2.0]) == [0] * 200
    assert pooled_labels(configs, results, [1.0, 2.0], ratio=0.995) == {"a": 1, "b": 0}
    with pytest.raises(ValueError, match="FLOPs"):
        per_sample(configs, results, "pooled")
    with pytest.raises(ValueError, match="rule is one of"):
        per_sample(configs, results, "cheapest")
