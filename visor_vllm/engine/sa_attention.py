"""Attention of an SA-capable layer in vLLM: text queries over ``[V ; T]`` with vLLM's own kernel.

What. Each SA-capable layer keeps one paged sequence per request (`visor_vllm.engine.kv_layout`):
the layer's visual K/V at slots ``0..Nv-1`` when the row's configuration runs the layer
(``prefix = Nv``), else nothing (``prefix = 0``), then the text K/V. In this layout the paper's SA
layer is plain causal attention: a text query at text position ``j`` attends slots
``0..prefix+j``, i.e. every visual token and the text up to itself. So the layer calls its
backend's ``do_kv_cache_update`` and ``forward`` (the ones `Attention` calls) with vLLM's block
table and its own ``seq_lens = prefix + T`` and slots; nothing is gathered or merged.

Why here. vLLM builds the group's metadata from text lengths; `with_prefix` is the one place
that knows which metadata fields change with the prefix, per backend:
* CPU (proven here): ``seq_lens``, ``max_seq_len`` and the kernel's work partition
  (``scheduler_metadata``, recomputed from the new lengths).
* Other backends (FlashAttention-style metadata on CUDA/ROCm): ``seq_lens`` and
  ``max_seq_len``, and ``scheduler_metadata`` dropped (an AOT plan for the text lengths would
  be wrong). **Unproven**: no GPU build of vLLM runs in this project; `check_backend` logs it.

Footguns.
* ``max_seq_len`` is an upper bound (the group's text maximum plus a static bound on a
  request's visual tokens, the encoder budget), so it needs no device-to-host read and does
  not change between the replays of a captured graph.
* The block size is the *kernel's* (taken from the cache tensor), which is what the block table
  counts in; vLLM may split allocator blocks into smaller kernel blocks.
* Backends that write K/V inside ``forward`` (``forward_includes_kv_cache_update``) are
  refused by `check_backend`: VISOR writes the vision and text K/V at its own slots first.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vllm.logger import init_logger

logger = init_logger(__name__)


def kernel_block_size(kv_cache: torch.Tensor) -> int:
    """Tokens per block of one layer's paged cache, in the layout its backend allocated."""
    if kv_cache.dim() == 4:             # CPU: [num_blocks, Hkv, block_size, 2 * D]
        return kv_cache.shape[2]
    if kv_cache.dim() == 5:             # flash-style: [2, num_blocks, block_size, Hkv, D]
        return kv_cache.shape[2] if kv_cache.shape[0] == 2 else kv_cache.shape[1]
    raise NotImplementedError(f"VISOR does not know the KV cache layout {tuple(kv_cache.shape)}")


def slots(block_table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, bs: int) -> torch.Tensor:
    """Flat slots ``[n]`` of sequence positions ``pos`` [n] of batch rows ``rows`` [n]."""
    return block_table[rows, pos // bs].long() * bs + pos % bs


def is_cpu(md) -> bool:
    return type(md).__name__ == "CPUAttentionMetadata"


def check_backend(attn) -> None:
    """Refuse a backend that writes K/V inside ``forward``; say once that a non-CPU one is
    unproven (called at model load, per SA-capable layer)."""
    backend = attn.attn_backend
    if backend.forward_includes_kv_cache_update:
        raise NotImplementedError(
            f"VISOR: the {backend.get_name()} attention backend writes K/V inside its forward; "
            "VISOR's SA layers need a backend with a separate do_kv_cache_update")
    name = backend.get_name()
    if name != "CPU_ATTN":
        logger.warning_once("VISOR: SA-layer attention on the %s backend passes vLLM's kernel "
                            "a [vision ; text] sequence per request; proven on CPU only", name)


def with_prefix(md, attn, prefix: torch.Tensor, max_prefix: int, dtype: torch.dtype):
    """The layer group's metadata ``md`` for sequences that start with ``prefix`` [R] extra
    tokens (``max_prefix`` >= ``prefix.max()``, a host int); ``dtype``: the model's."""
    num_reqs = md.query_start_loc.numel() - 1
    seq = md.seq_lens.clone()
    seq[:num_reqs] += prefix.to(seq.dtype)
    changes = dict(seq_lens=seq, max_seq_len=md.max_seq_len + max_prefix)
    if is_cpu(md):
        from vllm import _custom_ops as ops
        from vllm import envs

        impl = attn.impl
        changes["scheduler_metadata"] = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_reqs, num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size, seq_lens=seq, dtype=dtype,
            query_start_loc=md.query_start_loc, causal=True, sliding_window_size=-1,
            isa=attn.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype=impl.kv_cache_dtype)
    elif hasattr(md, "scheduler_metadata"):
        changes["scheduler_metadata"] = None
    return replace(md, **changes)


def write(attn, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
    """Write k/v ``[n, Hkv, D]`` at flat slots ``[n]`` (``-1``: skip) of the layer's cache."""
    attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slot)


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q ``[n, H, D]`` over the layer's paged sequences under ``md``
    (`with_prefix`) into ``out`` ``[n, H, D]``; k/v ``[n, Hkv, D]``: this step's text K/V,
    already written."""
    out = torch.empty_like(q) if out is None else out
    attn.impl.forward(attn, q, k, v, attn.kv_cache, md, output=out)
    return out
