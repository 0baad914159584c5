"""Budget parsing: every allowed form, and a named error listing what is allowed otherwise."""

import pytest

from visor_vllm.budget import Budget, BudgetError, allowed_configs, parse_budget
from visor_vllm.config import get_preset

CFG = get_preset("visor-0.5b")


@pytest.mark.parametrize("extra, mode", [(None, "auto"), ({}, "auto"), ({"visor_budget": "auto"}, "auto"),
                                         ({"visor_budget": "MIN"}, "min"), ({"visor_budget": "max"}, "max"),
                                         ({"visor_budget": 2}, "cap"), ({"visor_budget": "3"}, "cap"),
                                         ({"other_key": 1}, "auto")])
def test_forms(extra, mode):
    assert parse_budget(extra, CFG).mode == mode


def test_explicit_layers_are_1_based_and_checked():
    assert parse_budget({"visor_sa_layers": [4, 1]}, CFG).sa_layers == (0, 3)
    assert parse_budget({"visor_sa_layers": "1,7"}, CFG).sa_layers == (0, 6)
    with pytest.raises(BudgetError, match=r"choose from \[1, 4, 7, 10, 16, 19, 22\]"):
        parse_budget({"visor_sa_layers": [1, 2]}, CFG)


@pytest.mark.parametrize("extra, match", [
    ({"visor_budget": "lots"}, "auto"), ({"visor_budget": -1}, ">= 0"), ({"visor_budget": True}, ">= 0"),
    ({"visor_budget": 1.5}, ">= 0"), ({"visor_sa_layers": 4}, "list"), ({"visor_sa_layers": ["a"]}, "integer"),
    ({"visor_sa_layers": [1, 1]}, "distinct"), ({"visor_colour": 1}, "allowed"),
    ({"visor_budget": "max", "visor_sa_layers": [1]}, "not both"), ({"visor_budget": 0}, "smallest has 1"),
])
def test_bad_budgets(extra, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget(extra, CFG)


def test_allowed_masks():
    n = len(CFG.sa_configs)
    assert allowed_configs(CFG, Budget()) == [True] * n
    assert allowed_configs(CFG, Budget("min")) == [True] + [False] * (n - 1)
    assert allowed_configs(CFG, Budget("max")) == [False] * (n - 1) + [True]
    cap = allowed_configs(CFG, Budget("cap", cap=2))  # at most 2 optional layers: 3 SA layers
    assert cap == [len(c) <= 3 for c in CFG.sa_configs] and sum(cap) == 6
