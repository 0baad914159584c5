"""The reference model's own invariants: caching, routing, layout, input errors."""

import pytest
import torch

from visor_vllm.model import plan
from visor_vllm.model.reference import ImageTokenMismatchError

from visor_vllm.testing import random_tiny_model

from .conftest import ROUTE, prompt

CONFIGS = [[0], [0, 3], [0, 5], [0, 3, 5], None]  # None: the router chooses


def n_vision(model, inputs):
    return sum(x.shape[0] for x in model.embed_images(*inputs))


@pytest.mark.parametrize("sa", CONFIGS, ids=str)
def test_cached_generate_equals_full_recompute(tiny_model, image_inputs, sa):
    ids = prompt(n_vision(tiny_model, image_inputs))
    gen = tiny_model.generate(ids, *image_inputs, sa_layers=sa, max_new_tokens=5)
    seq = torch.cat([ids, torch.tensor(gen.tokens[:-1])])
    with torch.no_grad():
        full = tiny_model(seq, *image_inputs, sa_layers=gen.prefill.sa_layers)
    n = len(gen.tokens)
    torch.testing.assert_close(gen.logits, full.logits[-n:], atol=2e-5, rtol=1e-4)
    if sa is not None:
        assert gen.prefill.sa_layers == tuple(sa)


def test_every_configuration_changes_the_output(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs))
    with torch.no_grad():
        outs = [tiny_model(ids, *image_inputs, sa_layers=c).logits[-1] for c in CONFIGS[:-1]]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-4), (CONFIGS[i], CONFIGS[j])


def test_router_choice_equals_running_that_configuration(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs))
    with torch.no_grad():
        routed = tiny_model(ids, *image_inputs)
        explicit = tiny_model(ids, *image_inputs, sa_layers=routed.sa_layers)
    cfg = tiny_model.config
    assert routed.router_logits.shape == (1, len(cfg.sa_configs))
    assert list(routed.sa_layers) == cfg.sa_configs[routed.config_index]
    torch.testing.assert_close(routed.logits, explicit.logits)


def test_several_routing_tokens_take_the_costliest_vote(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs), question=(7, ROUTE, 8, ROUTE, 9))
    with torch.no_grad():
        out = tiny_model(ids, *image_inputs)
    assert out.router_logits.shape[0] == 3
    assert out.config_index == plan.choose_configuration(tiny_model.config, out.router_logits)


def test_image_position_in_prompt_does_not_matter(tiny_model, image_inputs):
    """vision_first: V always precedes T, wherever the placeholder sits in the prompt."""
    nv = n_vision(tiny_model, image_inputs)
    with torch.no_grad():
        a = tiny_model(prompt(nv), *image_inputs, sa_layers=[0, 3])
        b = tiny_model(prompt(nv, image_first=True), *image_inputs, sa_layers=[0, 3])
    torch.testing.assert_close(a.logits, b.logits)


def test_text_only_request_runs_text_layers_only(tiny_model):
    ids = prompt(0)
    with torch.no_grad():
        out = tiny_model(ids)
        explicit = tiny_model(ids, sa_layers=[0, 3, 5])
    assert out.sa_layers == () and out.router_logits is None
    torch.testing.assert_close(out.logits, explicit.logits)
    gen = tiny_model.generate(ids, max_new_tokens=3)
    assert len(gen.tokens) == 3


def test_multi_image_uses_base_crops_in_prompt_order(tiny_model):
    g = torch.Generator().manual_seed(3)
    px, sizes = torch.randn(2, 7, 3, 32, 32, generator=g), torch.tensor([[50, 70], [40, 40]])
    feats = tiny_model.embed_images(px, sizes)
    assert [f.shape[0] for f in feats] == [16 + 1, 16 + 1]  # 4x4 base grid + one newline token
    ids = prompt(34)
    gen = tiny_model.generate(ids, px, sizes, sa_layers=[0, 5], max_new_tokens=3)
    swapped = tiny_model.generate(ids, px.flip(0), sizes.flip(0), sa_layers=[0, 5], max_new_tokens=3)
    assert not torch.allclose(gen.logits[0], swapped.logits[0], atol=1e-5)


def test_missing_routing_token_is_a_named_error(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs), route=False)
    with pytest.raises(plan.RoutingTokenMissingError, match="routing token"):
        tiny_model(ids, *image_inputs)


def test_image_token_count_mismatch_is_a_named_error(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs) - 1)
    with pytest.raises(ImageTokenMismatchError):
        tiny_model(ids, *image_inputs)


def test_sa_layers_outside_the_capable_set_are_rejected(tiny_model, image_inputs):
    ids = prompt(n_vision(tiny_model, image_inputs))
    with pytest.raises(plan.InvalidConfigurationError, match="SA-capable layer numbers are"):
        tiny_model(ids, *image_inputs, sa_layers=[0, 1])  # layer index 1 is a CA layer


def test_token_packing_reduces_visual_tokens():
    model = random_tiny_model(token_packing_ratio=2.0)
    g = torch.Generator().manual_seed(4)
    px, sizes = torch.randn(2, 7, 3, 32, 32, generator=g), torch.tensor([[50, 70], [40, 40]])
    feats = model.embed_images(px, sizes)
    assert [f.shape[0] for f in feats] == [3 * 3 + 1] * 2  # round(4/sqrt 2)=3 per side + newline
    gen = model.generate(prompt(20), px, sizes, sa_layers=[0, 3], max_new_tokens=2)
    assert len(gen.tokens) == 2
