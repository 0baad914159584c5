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


def _paged_case(layout: str, seed: int = 0):
    """Three rows (decode, prefill, decode) with text and vision K/V written into paged caches
    whose blocks are shuffled and partly stale; returns what `sa_text_attention` needs and
    the dense per-row reference."""
    from types import SimpleNamespace

    from visor_vllm.engine.vllm_model import attention_groups, paged_kv_views, write_paged

    g = torch.Generator().manual_seed(seed)
    H, Hkv, D, bs, nb = 4, 2, 8, 4, 40
    q_lens, seq_lens = torch.tensor([1, 5, 1]), torch.tensor([9, 5, 3])
    n_vision, active = torch.tensor([10, 6, 7]), torch.tensor([True, False, True])
    shape = (nb, Hkv, bs, 2 * D) if layout == "cpu" else (2, nb, bs, Hkv, D)
    caches = [torch.randn(shape, generator=g) * 50 for _ in range(2)]  # stale garbage everywhere
    perm = torch.randperm(nb - 1, generator=g) + 1                      # block 0: the null block
    tables = [perm[:24].view(3, 8), perm[24:].view(3, 5)]               # text, vision; [R, cols]
    texts, visions = [], []
    for r in range(3):
        for cache, table, n, out in ((caches[0], tables[0], seq_lens[r], texts),
                                     (caches[1], tables[1], n_vision[r], visions)):
            k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
            slots = table[r, torch.arange(n) // bs] * bs + torch.arange(n) % bs
            write_paged(paged_kv_views(cache, D), slots, k, v)
            out.append((k, v))
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
    row = torch.repeat_interleave(torch.arange(3), q_lens)
    col = torch.arange(int(qsl[-1])) - qsl[row]
    s = SimpleNamespace(n_vision=n_vision, seq_lens=seq_lens, computed=seq_lens - q_lens,
                        attn_groups=attention_groups(q_lens, row, col))
    q = torch.randn(int(qsl[-1]), H, D, generator=g)
    want = torch.empty_like(q)
    for t in range(q.shape[0]):
        r, c = int(row[t]), int(col[t])
        kt, vt = (x[: int(s.computed[r]) + c + 1] for x in texts[r])   # causal text
        kv_, vv_ = visions[r] if active[r] else (kt[:0], vt[:0])
        k, v = torch.cat([kv_, kt]), torch.cat([vv_, vt])               # [K, Hkv, D]
        att = torch.einsum("hd,khd->hk", q[t], k.repeat_interleave(H // Hkv, 1)) * D ** -0.5
        want[t] = torch.einsum("hk,khd->hd", att.softmax(-1), v.repeat_interleave(H // Hkv, 1))
    return q, s, caches, tables, active, want


@pytest.mark.parametrize("layout", ["cpu", "flash"])
def test_sa_text_attention_equals_dense_attention_per_row(layout):
    """Whole-page reads of shuffled, partly stale pages (garbage past each row's length, in its
    last block and in its table's unused columns) give exactly each row's dense attention over
    [vision if it runs the layer ; its causal text]."""
    from visor_vllm.engine.vllm_model import sa_text_attention

    q, s, (tc, vc), (tt, vt), active, want = _paged_case(layout)
    tt = torch.cat([tt, torch.full((3, 2), 7)], 1)  # stale ids in columns no row needs
    out = sa_text_attention(q, s, tc, tt, vc, vt, active, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_sa_text_attention_ignores_non_finite_stale_slots():
    from visor_vllm.engine.vllm_model import sa_text_attention

    q, s, (tc, vc), (tt, vt), active, want = _paged_case("cpu", seed=1)
    # row 0's text ends at token 8 of 9 -> slot 1 of its third block is past its length;
    # row 1 (prefill, 5 tokens) -> slots 1.. of its second block
    tc[tt[0, 2], :, 1:] = float("nan")
    tc[tt[1, 1], :, 1:] = float("nan")
    vc[vt[2, 1], :, 3:] = float("inf")      # row 2's vision: 7 tokens, slot 3 of block 2 is stale
    out = sa_text_attention(q, s, tc, tt, vc, vt, active, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
