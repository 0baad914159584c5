"""The VISOR decoder layer over a padded batch (paper Eq. 3): the math, in one place.

What.
* `rope_cos_sin` / `apply_rope`: Qwen2's rotary embedding (fp32 angles, as transformers').
* `transformer_layer(layer, x, cos, sin)`: the ordinary Qwen2 layer, causal, on right-padded
  rows ``x [B, N, d]``: what text-only layers run on ``T`` and SA layers on ``[V;T]``.
* `cross_update(ca, t, vis, lay)`: VISOR's cross-attention residual update: text queries,
  visual keys/values after an RMSNorm and the per-image depthwise conv (``x + conv(x)``), no
  RoPE; ``V`` is not updated.
* `visor_layer(layer, t, vis, lay, sa, rope)`: one VISOR layer (``text | cross | self``), what
  `DecoderLayer.forward` runs, so FSDP2 units and activation checkpointing see one module call.

Layouts (`visor_vllm.model.batch_layout.BatchLayout`): vision flat ``[Sv, d]``, text padded
``[B, Tm, d]``, SA rows gathered to ``[B, Jm, d]``; positions per `visor_vllm.model.plan`.

Footguns.
* Attention is SDPA without repeated K/V (``enable_gqa``) and without a mask wherever the rows
  allow (causal right padding needs none; CA needs one only for ragged vision), so the fused
  kernels stay eligible on GPUs. Right padding is harmless under a causal mask: real queries
  never see later pads.
* The reference model (`visor_vllm.model.reference`) keeps its per-request path with caches;
  `tests/training/test_model.py` holds the two equal per sample in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visor_vllm.model import plan


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
    """cos/sin ``[*pos.shape, dh]`` for positions ``pos`` (fp32 math, as HF's Qwen2 rotary)."""
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., N, dh] with cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _heads(x: torch.Tensor, n: int, dh: int) -> torch.Tensor:
    """[B, N, n*dh] -> [B, n, N, dh]."""
    return x.view(x.shape[0], x.shape[1], n, dh).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, n, N, dh] -> [B, N, n*dh]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def transformer_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The ordinary layer on right-padded rows ``x [B, N, d]``, causal; cos/sin ``[B, N, dh]``."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    cos, sin = cos[:, None], sin[:, None]
    q = apply_rope(_heads(attn.q_proj(h), attn.heads, attn.head_dim), cos, sin)
    k = apply_rope(_heads(attn.k_proj(h), attn.kv_heads, attn.head_dim), cos, sin)
    v = _heads(attn.v_proj(h), attn.kv_heads, attn.head_dim)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         enable_gqa=attn.heads != attn.kv_heads)
    x = x + attn.o_proj(_merge(out))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def cross_update(ca, t: torch.Tensor, vis: torch.Tensor, lay) -> torch.Tensor:
    """VISOR's cross-attention update ``[B, Tm, d]`` for padded text ``t`` and flat ``vis``."""
    x = ca.vision_norm(vis)
    x = x + plan.segment_depthwise_conv1d(x, lay.image_lens, ca.pos_conv.weight, ca.pos_conv.bias,
                                          gaps=lay.conv_gaps)
    xp = lay.pad_vision(x)                                        # [B, Vm, d]
    k = _heads(ca.k_proj(xp), ca.kv_heads, ca.head_dim)
    v = _heads(ca.v_proj(xp), ca.kv_heads, ca.head_dim)
    q = _heads(ca.q_proj(ca.text_norm(t)), ca.heads, ca.head_dim)
    mask = None if lay.v_key_mask is None else lay.v_key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         enable_gqa=ca.heads != ca.kv_heads)
    out = ca.o_proj(_merge(out))
    if mask is not None:  # samples without images attended a dummy key: no update for them
        out = out * lay.has_vision[:, None, None].to(out.dtype)
    return out


def rope_tables(inv_freq: torch.Tensor, lay, dtype: torch.dtype) -> dict:
    """cos/sin of the text rows and (with images) of the joint rows, once per forward."""
    out = {"text": rope_cos_sin(inv_freq, lay.t_pos, dtype)}
    if lay.sv:
        out["joint"] = rope_cos_sin(inv_freq, lay.j_pos, dtype)
    return out


def visor_layer(layer, t: torch.Tensor, vis: torch.Tensor, lay, sa: bool, rope: dict):
    """One VISOR layer on a batch: ``(t [B, Tm, d], vis [Sv, d]) -> (t, vis)``.

    ``sa``: the batch's configuration runs this (SA-capable) layer on ``[V;T]``.
    """
    if layer.kind == "cross" and lay.sv:
        t = t + cross_update(layer.cross_attn, t, vis, lay)
    if layer.kind == "self" and sa and lay.sv:
        x = transformer_layer(layer, lay.to_joint(vis, t), *rope["joint"])
        vis, t = lay.from_joint(x)
    else:
        t = transformer_layer(layer, t, *rope["text"])
    return t, vis
