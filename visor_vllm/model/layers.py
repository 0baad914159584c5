"""The VISOR decoder layer over a padded batch (paper Eq. 3): the math, in one place.

What.
* `rope_cos_sin` / `apply_rope`: Qwen2's rotary embedding (fp32 angles, as transformers').
* `attend`: SDPA with grouped K/V (no repeated heads), causal with a cached prefix or not.
* `attention_layer(layer, x, cos, sin, attend_fn)`: the ordinary Qwen2 layer on rows
  ``x [B, N, d]`` with the attention injected: what text-only layers run on ``T`` and SA layers
  on ``[V;T]``, in the trainer (`transformer_layer`: causal over right-padded rows) and in the
  reference (with its caches).
* `cross_vision_input` / `cross_kv` / `cross_attend`: VISOR's cross-attention: visual
  keys/values after an RMSNorm and the per-image depthwise conv (``x + conv(x)``), text
  queries, no RoPE; ``V`` is not updated. `cross_update` is their batched use.
* `visor_layer(layer, t, vis, lay, sa, rope)`: one VISOR layer (``text | cross | self``), what
  `DecoderLayer.forward` runs, so FSDP2 units and activation checkpointing see one module call.

Layouts (`visor_vllm.model.batch_layout.BatchLayout`): vision flat ``[Sv, d]``, text padded
``[B, Tm, d]``, SA rows gathered to ``[B, Jm, d]``; positions per `visor_vllm.model.plan`.

Footguns.
* Attention is SDPA without repeated K/V (``enable_gqa``) and without a mask wherever the rows
  allow (causal right padding needs none; CA needs one only for ragged vision), so the fused
  kernels stay eligible on GPUs. Right padding is harmless under a causal mask: real queries
  never see later pads.
* The reference model (`visor_vllm.model.reference`) runs the same functions one request at a
  time (batch 1) with its caches; `tests/training/test_model.py` holds the two equal per sample
  in fp32. The vLLM model (`visor_vllm.engine.vllm_model`) runs vLLM's fused layers and
  kernels instead (paged attention, merged QKV, fused add + RMSNorm) and shares with these
  `cross_vision_input`, `visor_vllm.model.plan` (positions, the conv's segments), the
  checkpoint and the equivalence tests.
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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None = None,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with grouped K/V: q ``[B, H, Nq, dh]``, k/v ``[B, Hkv, Nk, dh]`` -> ``[B, H, Nq, dh]``.

    ``causal_offset=None``: every query sees every key (cross-attention; ``key_mask``
    ``[B, 1, 1, Nk]`` hides padded keys). Otherwise query ``i`` sees keys
    ``0..causal_offset+i`` (the keys before the queries are a cached prefix); ``0`` with as
    many keys as queries is plain causal attention, which needs no mask tensor.
    """
    gqa = q.shape[1] != k.shape[1]
    if causal_offset is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)
    nq, nk = q.shape[2], k.shape[2]
    if causal_offset == 0 and nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rows = torch.arange(nq, device=q.device)[:, None] + causal_offset
    mask = torch.arange(nk, device=q.device)[None, :] <= rows                 # [Nq, Nk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def causal(q, k, v):
    """`attend` for rows that are whole causal sequences (the batched forward's layers)."""
    return attend(q, k, v, causal_offset=0)


def attention_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    attend_fn=causal) -> torch.Tensor:
    """The ordinary (Qwen2) layer on rows ``x [B, N, d]``; cos/sin ``[B, N, dh]``.

    ``attend_fn(q [B, H, N, dh], k [B, Hkv, N, dh], v) -> [B, H, N, dh]`` is the attention: the
    trainer's is causal over right-padded rows (`causal`); the reference's prepends and stores
    its caches. Everything else (norms, projections, RoPE, residuals, SwiGLU) is this one code.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    cos, sin = cos[:, None], sin[:, None]
    q = apply_rope(_heads(attn.q_proj(h), attn.heads, attn.head_dim), cos, sin)
    k = apply_rope(_heads(attn.k_proj(h), attn.kv_heads, attn.head_dim), cos, sin)
    v = _heads(attn.v_proj(h), attn.kv_heads, attn.head_dim)
    x = x + attn.o_proj(_merge(attend_fn(q, k, v)))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def cross_vision_input(ca, vis: torch.Tensor, image_lens, gaps=None) -> torch.Tensor:
    """What CA's keys and values are projected from, ``[Nv, d]``: the visual tokens ``vis
    [Nv, d]`` after RMSNorm and the per-image depthwise conv (``x + conv(x)``, zero-padded at
    image borders; paper Sec. 4.2.1). The vLLM model calls this too, then its fused K/V GEMM."""
    x = ca.vision_norm(vis)
    return x + plan.segment_depthwise_conv1d(x, image_lens, ca.pos_conv.weight, ca.pos_conv.bias,
                                             gaps=gaps)


def cross_kv(ca, vis: torch.Tensor, image_lens, gaps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CA keys/values of visual tokens ``vis [Nv, d]`` (`cross_vision_input`, then the
    projections); ``[Nv, Hkv, dh]`` each. Computed once per request and layer (the visual tokens
    do not change in CA layers)."""
    x = cross_vision_input(ca, vis, image_lens, gaps)
    n = x.shape[0]
    return (ca.k_proj(x).view(n, ca.kv_heads, ca.head_dim),
            ca.v_proj(x).view(n, ca.kv_heads, ca.head_dim))


def cross_attend(ca, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CA's residual update ``[B, Nt, d]`` for text ``t [B, Nt, d]`` over k/v ``[B, Hkv, Nv, dh]``
    (no RoPE: the conv gave the visual tokens their positions)."""
    q = _heads(ca.q_proj(ca.text_norm(t)), ca.heads, ca.head_dim)
    return ca.o_proj(_merge(attend(q, k, v, key_mask=key_mask)))


def transformer_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The ordinary layer on right-padded rows ``x [B, N, d]``, causal; cos/sin ``[B, N, dh]``."""
    return attention_layer(layer, x, cos, sin, causal)


def cross_update(ca, t: torch.Tensor, vis: torch.Tensor, lay) -> torch.Tensor:
    """VISOR's cross-attention update ``[B, Tm, d]`` for padded text ``t`` and flat ``vis``."""
    k, v = cross_kv(ca, vis, lay.image_lens, lay.conv_gaps)               # [Sv, Hkv, dh]
    kp = _heads(lay.pad_vision(k.flatten(1)), ca.kv_heads, ca.head_dim)     # [B, Hkv, Vm, dh]
    vp = _heads(lay.pad_vision(v.flatten(1)), ca.kv_heads, ca.head_dim)
    mask = None if lay.v_key_mask is None else lay.v_key_mask[:, None, None, :]
    out = cross_attend(ca, t, kp, vp, mask)
    if mask is not None:  # samples without images attended a dummy key: no update for them
        out = out * lay.has_vision[:, None, None].to(out.dtype)
    return out


def zero_touch(module) -> torch.Tensor | float:
    """``0`` that depends on every trainable parameter of ``module``: added to the output of a
    batch that skipped ``module`` (no images), so each of them still gets a gradient (zeros).
    DDP's reducer and FSDP2's reduce-scatter need every rank to produce the same gradients;
    a rank whose micro-batch was text-only would otherwise hang or fail the next step. Called
    inside the module's owner's forward, so FSDP2 has gathered these parameters."""
    ps = [p.sum() for p in module.parameters() if p.requires_grad]
    return torch.stack(ps).sum() * 0.0 if ps else 0.0


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
    elif layer.kind == "cross" and torch.is_grad_enabled():
        t = t + zero_touch(layer.cross_attn)  # no images: CA still gets its (zero) gradient
    if layer.kind == "self" and sa and lay.sv:
        x = transformer_layer(layer, lay.to_joint(vis, t), *rope["joint"])
        vis, t = lay.from_joint(x)
    else:
        t = transformer_layer(layer, t, *rope["text"])
    return t, vis
