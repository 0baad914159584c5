"""VisorConfig: presets follow the paper, every inconsistent schedule is a named error."""

import pytest

from visor_vllm.model.config import (PAPER_SA_CONFIGS_0_5B, VisorConfig, VisorConfigError, get_preset,
                                     preset_tiny)
from visor_vllm.model.plan import numbers_from_layers


def test_0_5b_preset_is_appendix_a():
    cfg = get_preset("visor-0.5b")
    assert cfg.num_layers == 24 and cfg.text_config.hidden_size == 896
    assert [numbers_from_layers(c) for c in cfg.sa_configs] == PAPER_SA_CONFIGS_0_5B
    assert numbers_from_layers(cfg.sa_capable_layers) == [1, 4, 7, 10, 16, 19, 22]
    assert numbers_from_layers(cfg.always_on_sa_layers) == [1]
    assert len(cfg.cross_layers) == 8 == cfg.num_layers // 3
    assert not set(cfg.cross_layers) & set(cfg.sa_capable_layers)
    assert cfg.router_layer == cfg.optional_sa_layers[0] - 1  # the block before layer 4


def test_1_5b_preset_follows_the_same_rule():
    cfg = get_preset("visor-1.5b")
    assert cfg.num_layers == 28 and cfg.text_config.hidden_size == 1536
    assert len(cfg.cross_layers) == 9 and len(cfg.sa_configs) == 13
    assert cfg.router_layer < cfg.optional_sa_layers[0]


def test_round_trip_through_config_json(tmp_path):
    cfg = preset_tiny()
    cfg.save_pretrained(tmp_path)
    back = VisorConfig.from_pretrained(tmp_path)
    for k in ("layer_types", "sa_configs", "always_on_sa_layers", "router_layer", "routing_token_id"):
        assert getattr(back, k) == getattr(cfg, k)
    assert back.model_type == "visor"


def test_default_is_degenerate_llava_onevision():
    cfg = VisorConfig(text_config={"num_hidden_layers": 3})
    assert cfg.layer_types == ["self"] * 3 and cfg.sa_configs == [[0, 1, 2]]


def tiny(**kw):
    base = dict(text_config=preset_tiny().text_config.to_dict(),
                layer_types=["self", "cross", "text", "self", "cross", "self"],
                sa_configs=[[0], [0, 3], [0, 5], [0, 3, 5]], always_on_sa_layers=[0], router_layer=2)
    base.update(kw)
    return VisorConfig(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=["self"] * 5), "6 layers"),
    (dict(layer_types=["self", "cross", "text", "self", "bogus", "self"]), "unknown layer type"),
    (dict(sa_configs=[[0], [0, 1]]), "not SA-capable"),             # a CA layer in a config
    (dict(sa_configs=[[0], [0, 9]]), "outside"),                     # index out of range
    (dict(sa_configs=[[0], [3, 0]]), "sorted"),
    (dict(sa_configs=[[0], [0, 3], [0, 3, 5], [0, 3]]), "twice"),
    (dict(sa_configs=[[0], [0, 3]]), "in no SA configuration"),       # layer 5 never used
    (dict(sa_configs=[[0], [0, 3], [3, 5]]), "lacks always-on"),
    (dict(router_layer=3), "before the first optional SA layer"),
    (dict(router_layer=-1), "out of range"),
    (dict(router_layer=None), "need a router_layer"),
    (dict(sa_configs=[]), "at least one"),
    (dict(position_scheme="interleaved"), "vision_first"),
    (dict(cross_attn_conv_kernel=6), "odd"),
    (dict(token_packing_ratio=0.5), ">= 1"),
])
def test_invalid_schedules_raise(kw, match):
    with pytest.raises(VisorConfigError, match=match):
        tiny(**kw)


def test_unknown_preset():
    with pytest.raises(VisorConfigError, match="visor-0.5b"):
        get_preset("visor-7b")


def test_the_synthetic_presets_share_their_llava_part_and_differ_in_schedule():
    from visor_vllm.checkpoints.build import llava_onevision_config

    a, b = get_preset("synthetic"), get_preset("synthetic-5sa")
    assert llava_onevision_config(a).to_dict() == llava_onevision_config(b).to_dict()
    assert a.sa_configs == [[0], [0, 2], [0, 4], [0, 6], [0, 2, 4], [0, 2, 6], [0, 4, 6],
                            [0, 2, 4, 6]]  # unchanged: cheapest first
    assert b.cross_layers == [1, 4, 7] and b.optional_sa_layers == [2, 3, 5, 6]
    assert len(b.sa_configs) == 16 and b.sa_configs[-1] == [0, 2, 3, 5, 6]
    assert [len(c) for c in b.sa_configs] == sorted(len(c) for c in b.sa_configs)


def test_the_late_ca_schedule_keeps_the_default_counts_and_costs():
    """``synthetic-late-ca`` moves the default's CA layers last: the same LLaVA-OV part, the
    same 16 configurations by size, each costing what the default's of that size costs; the
    router sits in the block before the first optional SA layer, which is now layer 0's."""
    from visor_vllm.checkpoints.build import llava_onevision_config
    from visor_vllm.model.config import validate_schedule
    from visor_vllm.model.flops import prefill_flops

    five, late = get_preset("synthetic-5sa"), get_preset("synthetic-late-ca")
    validate_schedule(late)
    assert llava_onevision_config(five).to_dict() == llava_onevision_config(late).to_dict()
    assert late.layer_types == ["self"] * 5 + ["cross"] * 3
    assert late.cross_layers == [5, 6, 7] and late.optional_sa_layers == [1, 2, 3, 4]
    assert late.router_layer == 0 and five.router_layer == 1
    assert len(late.sa_configs) == 16 and late.sa_configs[-1] == [0, 1, 2, 3, 4]
    assert [len(c) for c in late.sa_configs] == [len(c) for c in five.sa_configs]
    for a, b in zip(five.sa_configs, late.sa_configs):
        assert prefill_flops(five, 36, 9, a) == prefill_flops(late, 36, 9, b)
