"""The engine's attention helpers equal one dense masked attention, and cost what their rows cost.

`causal_segments_attention` (first step: each new image's visual tokens attend causally among
themselves) must give what the old padded ``[R, Nv_max, Nv_max]`` masked attention gave, for
segments of different lengths and empty segments (decode rows of the same step).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm]


def dense_reference(q, k, v, lens, scale):
    """Block-diagonal causal mask over the whole flat sequence: the spec, O(n^2) memory."""
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)           # [n]
    i = torch.arange(q.shape[0])
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])       # [n, n]
    rep = q.shape[1] // k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), \
        v.repeat_interleave(rep, 1).transpose(0, 1)
    att = (qh @ kh.transpose(1, 2)) * scale
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ vh).transpose(0, 1)


@pytest.mark.parametrize("lens", [[5], [0, 7, 0, 3], [4, 4], [1, 0, 9]])
def test_causal_segments_equal_block_diagonal_attention(lens):
    from visor_vllm.engine.vllm_model import causal_segments_attention

    g = torch.Generator().manual_seed(0)
    n, H, Hkv, D = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (H, Hkv, Hkv))
    lens_t = torch.tensor(lens)
    out = causal_segments_attention(q, k, v, lens_t, D ** -0.5)
    torch.testing.assert_close(out, dense_reference(q, k, v, lens_t, D ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_causal_segments_keep_the_input_dtype():
    from visor_vllm.engine.vllm_model import causal_segments_attention

    q = k = v = torch.randn(6, 2, 4).to(torch.bfloat16)
    assert causal_segments_attention(q, k, v, torch.tensor([2, 4]), 0.5).dtype == torch.bfloat16
