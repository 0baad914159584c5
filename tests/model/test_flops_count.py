"""The FLOPs model's formulas equal a brute-force count of what the reference model executes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visor_vllm.model import flops

from .conftest import prompt


def counted(fn) -> int:
    """FLOPs of ``fn``. SDPA runs on its math backend: the counter sees attention's matmuls only
    when SDPA decomposes into them (CPU's fused kernels report none); the math is the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("sa", [[0], [0, 3], [0, 3, 5], None], ids=str)
def test_prefill_and_decode_match_flop_counter(tiny_model, image_inputs, sa):
    cfg = tiny_model.config
    vis = tiny_model.embed_images(*image_inputs)[0]                    # one image: [Nv, d]
    ids = prompt(vis.shape[0])
    text = ids[ids != cfg.image_token_index]
    route_idx = (text == cfg.routing_token_id).nonzero().flatten()
    lm_head = flops.request_flops(cfg, 0, 1, 1, [])["lm_head_flops_per_token"]
    with torch.no_grad():
        out = tiny_model._run(text, vis, [vis.shape[0]], sa, route_idx, True)
        got = counted(lambda: tiny_model._run(text, vis, [vis.shape[0]], sa, route_idx, False))
        want = flops.prefill_flops(cfg, vis.shape[0], text.numel(), out.sa_layers,
                                   routed=sa is None)
        assert got - text.numel() * lm_head == want
        step = counted(lambda: tiny_model.decode(torch.tensor([5]), out.cache))
    assert step - lm_head == flops.decode_step_flops(cfg, vis.shape[0], text.numel() + 1, out.sa_layers)


def test_text_only_prefill_matches_flop_counter(tiny_model):
    cfg = tiny_model.config
    text = prompt(0)
    lm_head = flops.request_flops(cfg, 0, 1, 1, [])["lm_head_flops_per_token"]
    with torch.no_grad():
        got = counted(lambda: tiny_model._run(text, None, [], None, torch.tensor([]), False))
    assert got - text.numel() * lm_head == flops.prefill_flops(cfg, 0, text.numel(), [])
