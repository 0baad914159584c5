"""Pure layout and routing functions shared by the reference and the vLLM model."""

import pytest
import torch

from visor_vllm.model import plan
from visor_vllm.model.config import get_preset, preset_tiny


def test_layer_numbers_round_trip():
    assert plan.layers_from_numbers([1, 4, 7]) == [0, 3, 6]
    assert plan.numbers_from_layers([0, 3, 6]) == [1, 4, 7]


def test_costliest_vote_wins_and_ties_go_to_the_later_config():
    cfg = get_preset("visor-0.5b")  # configs 0 ([1,4]) and 1 ([1,7]) cost the same
    logits = torch.full((3, 13), -1.0)
    logits[0, 0] = logits[1, 1] = logits[2, 2] = 1.0   # votes: [1,4], [1,7], [1,4,7]
    assert plan.choose_configuration(cfg, logits) == 2
    assert plan.choose_configuration(cfg, logits[:2]) == 1
    assert plan.choose_configuration(cfg, logits[:1]) == 0


def test_router_without_tokens_is_an_error():
    with pytest.raises(plan.RoutingTokenMissingError):
        plan.choose_configuration(preset_tiny(), torch.zeros(0, 4))


def test_check_sa_layers_names_the_capable_layers():
    with pytest.raises(plan.InvalidConfigurationError, match=r"\[1, 4, 7, 10, 16, 19, 22\]"):
        plan.check_sa_layers(get_preset("visor-0.5b"), [0, 1])
    assert plan.check_sa_layers(preset_tiny(), [5, 0]) == (0, 5)


def test_vision_first_positions():
    v, t = plan.vision_first_positions(4, 3, past_text=2)
    assert v.tolist() == [0, 1, 2, 3] and t.tolist() == [6, 7, 8]


def test_segment_conv_equals_a_conv_per_segment():
    g = torch.Generator().manual_seed(0)
    lens, d, k = [5, 1, 9, 3], 6, 7
    x = torch.randn(sum(lens), d, generator=g)
    w, b = torch.randn(d, 1, k, generator=g), torch.randn(d, generator=g)
    got = plan.segment_depthwise_conv1d(x, lens, w, b)
    want = torch.cat([torch.nn.functional.conv1d(s.t()[None], w, b, padding=k // 2, groups=d)[0].t()
                      for s in x.split(lens)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        plan.segment_depthwise_conv1d(x, [1, 2], w, b)
