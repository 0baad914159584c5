"""The engine's attention equals dense attention, and costs what its rows cost.

`causal_segments_attention` (first step: each new image's visual tokens attend causally among
themselves) must give what the old padded ``[R, Nv_max, Nv_max]`` masked attention gave, for
segments of different lengths and empty segments (decode rows of the same step).
`visor_vllm.engine.sa_attention` (SA-capable layers: text over ``[vision ; text]`` with vLLM's
CPU kernel) must give each row's dense attention, with and without a vision prefix.
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


def _sa_case(dtype=torch.float32, seed: int = 0):
    """Three rows (decode with a vision prefix, prefill without, decode with) of one SA-capable
    layer's ``[vision ; text]`` paged sequences on the CPU kernel, written through
    `sa_attention.write` into shuffled blocks of a cache full of stale data; returns the layer,
    queries, the group's text-length metadata, the prefixes and the dense per-row reference."""
    from types import SimpleNamespace

    from unittest import mock

    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackendImpl, CPUAttentionMetadata,
                                                     _get_attn_isa)

    from visor_vllm.engine import sa_attention

    g = torch.Generator().manual_seed(seed)
    H, Hkv, D, bs, nb = 4, 2, 32, 32, 24
    q_lens, seq_lens = torch.tensor([1, 5, 1]), torch.tensor([9, 5, 40])   # text tokens
    prefix = torch.tensor([45, 0, 70])                                      # vision slots
    model = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))  # all the impl reads
    with mock.patch.object(cpu_attn, "get_current_vllm_config", lambda: model):
        impl = CPUAttentionBackendImpl(H, D, D ** -0.5, Hkv, None, None, "auto")
    cache = (torch.randn(nb, Hkv, bs, 2 * D, generator=g) * 50).to(dtype)  # stale everywhere
    layer = SimpleNamespace(impl=impl, kv_cache=cache, isa=_get_attn_isa(dtype, bs, D),
                            _k_scale_float=1.0, _v_scale_float=1.0)
    perm = torch.randperm(nb - 1, generator=g) + 1                           # block 0: null
    table = perm[:21].view(3, 7).to(torch.int32)                            # [R, cols]
    seqs = []
    for r in range(3):
        n = int(prefix[r] + seq_lens[r])
        k, v = (torch.randn(n, Hkv, D, generator=g).to(dtype) for _ in range(2))
        rows = torch.full((n,), r)
        sa_attention.write(layer, k, v, sa_attention.slots(table, rows, torch.arange(n), bs))
        seqs.append((k, v))
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)])
    n = int(qsl[-1])
    md = CPUAttentionMetadata(num_actual_tokens=n, max_query_len=int(q_lens.max()),
                              query_start_loc=qsl, max_seq_len=int(seq_lens.max()),
                              seq_lens=seq_lens.to(torch.int32), block_table=table,
                              slot_mapping=torch.zeros(n, dtype=torch.long),
                              scheduler_metadata=None)
    q = torch.randn(n, H, D, generator=g).to(dtype)
    row = torch.repeat_interleave(torch.arange(3), q_lens)
    col = torch.arange(n) - qsl[:-1].long()[row]
    want = torch.empty(n, H, D)
    for t in range(n):
        r = int(row[t])
        end = int(prefix[r] + seq_lens[r] - q_lens[r] + col[t]) + 1       # causal over [V ; T]
        k, v = (x[:end].float().repeat_interleave(H // Hkv, 1) for x in seqs[r])
        att = torch.einsum("hd,khd->hk", q[t].float(), k) * D ** -0.5
        want[t] = torch.einsum("hk,khd->hd", att.softmax(-1), v)
    return layer, q, md, prefix, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sa_attention_is_causal_attention_over_vision_then_text(dtype):
    """vLLM's CPU kernel, given `with_prefix` metadata, gives each row's dense attention over
    [its vision K/V if it has a prefix ; its causal text], from shuffled blocks with stale data
    past every row's length (what `VisorDecoder._sa_layer` relies on)."""
    from visor_vllm.engine import sa_attention

    layer, q, md, prefix, want = _sa_case(dtype)
    mdp = sa_attention.with_prefix(md, layer, prefix, int(prefix.max()), dtype)
    assert mdp.seq_lens.tolist() == [54, 5, 110] and md.seq_lens.tolist() == [9, 5, 40]
    out = sa_attention.attend(layer, q, q[:, :2], q[:, :2], mdp)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_kernel_block_size_reads_each_layout():
    from visor_vllm.engine.sa_attention import kernel_block_size

    assert kernel_block_size(torch.empty(5, 2, 32, 128)) == 32          # CPU
    assert kernel_block_size(torch.empty(2, 5, 16, 2, 64)) == 16        # flash
    with pytest.raises(NotImplementedError):
        kernel_block_size(torch.empty(5, 16))
