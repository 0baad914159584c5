"""Budget parsing: every allowed form, and a named error listing what is allowed otherwise."""

import pytest

from visor_vllm.model.budget import Budget, BudgetError, allowed_configs, parse_budget
from visor_vllm.model.config import get_preset

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
    assert parse_budget({"visor_sa_layers": [4.0, "1"]}, CFG).sa_layers == (0, 3)
    # the always-on layer always runs: an empty list or one without it is refused, not run
    # (the paper's 0-SA ablation stays an offline experiment: reference model, sa_layers=[])
    with pytest.raises(BudgetError, match="empty"):
        parse_budget({"visor_sa_layers": []}, CFG)
    with pytest.raises(BudgetError, match="always-on"):
        parse_budget({"visor_sa_layers": [4]}, CFG)
    with pytest.raises(BudgetError) as e:  # a huge list is not echoed back whole
        parse_budget({"visor_sa_layers": list(range(100_000))}, CFG)
    assert len(str(e.value)) < 400
    with pytest.raises(BudgetError, match=r"choose from \[1, 4, 7, 10, 16, 19, 22\]"):
        parse_budget({"visor_sa_layers": [1, 2]}, CFG)


@pytest.mark.parametrize("extra, match", [
    ({"visor_budget": "lots"}, "auto"), ({"visor_budget": -1}, ">= 0"), ({"visor_budget": True}, ">= 0"),
    ({"visor_budget": 1.5}, ">= 0"), ({"visor_sa_layers": 4}, "list"), ({"visor_sa_layers": ["a"]}, "integer"),
    ({"visor_sa_layers": [1.5]}, "integer"), ({"visor_sa_layers": [True]}, "integer"),
    ({"visor_sa_layers": [1, 1]}, "distinct"), ({"visor_colour": 1}, "allowed"),
    ({"VISOR_BUDGET": "min"}, r"'VISOR_BUDGET'\]; allowed: \['visor_budget'"),
    ({"VisorBudget": 1}, "unknown VISOR argument"), ({"visorbudget": 1}, "allowed"),
    ({"visor_budget": "max", "visor_sa_layers": [1]}, "give it alone"), ({"visor_budget": 0}, "smallest has 1"),
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


def test_flops_cap_parses_and_combines_only_with_router_budgets():
    b = parse_budget({"visor_max_flops": "0.25"}, CFG)
    assert (b.mode, b.max_flops, b.source) == ("auto", 0.25, "override")
    assert parse_budget({"visor_max_flops": 1, "visor_budget": 2}, CFG).cap == 2
    for bad in (0, -0.1, 1.01, "x", True, [0.5]):
        with pytest.raises(BudgetError, match=r"visor_max_flops must be a number in \(0, 1\]"):
            parse_budget({"visor_max_flops": bad}, CFG)
    with pytest.raises(BudgetError, match="combines with"):
        parse_budget({"visor_max_flops": 0.5, "visor_budget": "min"}, CFG)


def test_flops_cap_keeps_what_fits_and_reports_when_nothing_does():
    from visor_vllm.model.budget import flops_fit
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops

    nv, nt = 7290, 40
    ratio = [prefill_flops(CFG, nv, nt, c) / dense_prefill_flops(CFG, nv, nt) for c in CFG.sa_configs]
    cap = sorted(ratio)[5] + 1e-9
    mask = allowed_configs(CFG, Budget(max_flops=cap), nv, nt)
    assert mask == [r <= cap for r in ratio] and sum(mask) == 6
    assert allowed_configs(CFG, Budget(max_flops=cap)) == [True] * len(ratio)  # no counts: no cap
    fit, met = flops_fit(CFG, [True] * len(ratio), 1e-6, nv, nt)
    assert not met and fit == [i == ratio.index(min(ratio)) for i in range(len(ratio))]
    assert flops_fit(CFG, [True] * len(ratio), 1e-6, 0, nt)[1]  # text only: nothing to cap


@pytest.mark.parametrize("env, mode, source", [("", "auto", "router"), ("auto", "auto", "router"),
                                               ("min", "min", "default"), ("2", "cap", "default"),
                                               ('{"visor_max_flops": 0.3}', "auto", "default")])
def test_server_default_budget_applies_to_requests_without_budget_keys(monkeypatch, env, mode, source):
    from visor_vllm.model.budget import DEFAULT_ENV

    monkeypatch.setenv(DEFAULT_ENV, env)
    b = parse_budget({"visor_receipt": "0" * 32, "other": 1}, CFG)
    assert (b.mode, b.source) == (mode, source)
    assert parse_budget({"visor_budget": "max"}, CFG).source == "override"


@pytest.mark.parametrize("env", ["lots", "{bad json", "[]", '{"visor_colour": 1}'])
def test_bad_server_default_names_the_variable(monkeypatch, env):
    from visor_vllm.model.budget import DEFAULT_ENV, default_budget

    monkeypatch.setenv(DEFAULT_ENV, env)
    with pytest.raises(BudgetError, match=DEFAULT_ENV):
        default_budget(CFG)


def test_a_flops_cap_is_a_fraction_of_dense_on_the_full_image():
    """VISOR-TR: the cap compares with dense LLaVA-OV on the image's full count, so a cap that
    no configuration meets against the packed count is met against the full one."""
    from visor_vllm.model.budget import flops_fit
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops

    cfg = get_preset("visor-0.5b")
    cheapest = min(cfg.sa_configs, key=len)
    cost = prefill_flops(cfg, 741, 60, cheapest)
    cap = cost / dense_prefill_flops(cfg, 1485, 60) * 1.01
    mask = [True] * len(cfg.sa_configs)
    assert flops_fit(cfg, mask, cap, 741, 60)[1] is False
    fit, met = flops_fit(cfg, mask, cap, 741, 60, n_image_dense=1485)
    assert met and fit[cfg.sa_configs.index(cheapest)]


@pytest.mark.parametrize("preset", ["preset_tiny", "preset_0_5b", "preset_1_5b"])
def test_possible_sa_layers_cover_every_configuration_the_worker_can_run(preset):
    """The scheduler allocates vision K/V from possible_sa_layers before the first step; every
    configuration the worker may then run (allowed, FLOP-capped with its fallback) is inside."""
    import visor_vllm.model.config as config_module
    from types import SimpleNamespace

    from visor_vllm.model.budget import Budget, allowed_configs, possible_sa_layers

    cfg = getattr(config_module, preset)()
    light = SimpleNamespace(sa_configs=cfg.sa_configs, always_on_sa_layers=cfg.always_on_sa_layers)
    n_opt = len(cfg.sa_capable_layers) - len(cfg.always_on_sa_layers)
    budgets = ([Budget(), Budget("min"), Budget("max")] + [Budget("cap", cap=k) for k in range(n_opt + 1)]
               + [Budget("auto", max_flops=f) for f in (0.01, 0.3, 1.0)]
               + [Budget("cap", cap=1, max_flops=0.01), Budget("layers", sa_layers=tuple(cfg.sa_configs[0]))])
    for budget in budgets:
        possible = possible_sa_layers(light, budget)
        assert possible == possible_sa_layers(cfg, budget)
        if budget.mode == "layers":
            assert possible == set(budget.sa_layers)
            continue
        for n_image in (0, 10, 729, 5000):
            mask = allowed_configs(cfg, budget, n_image=n_image, n_text=20)
            for c, ok in zip(cfg.sa_configs, mask):
                assert not ok or set(c) <= possible, (budget, n_image, c)
    cheapest = set(min(cfg.sa_configs, key=len))
    assert possible_sa_layers(cfg, Budget("min")) == cheapest
    assert possible_sa_layers(cfg, Budget("max")) == set(cfg.sa_capable_layers)
