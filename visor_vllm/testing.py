"""Tiny random VISOR models and checkpoints for tests, smoke runs and benchmarks' plumbing checks.

Why not plain HF-style init: with N(0, 0.02) weights a tiny model's logits are nearly uniform,
so greedy tokens flip on rounding noise and every configuration yields the same text. Here every
parameter (norms, conv, router included) gets seeded noise and the embedding std is 0.1: the
logits are decisive and depend on the SA configuration, which is what equivalence tests need.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from visor_vllm.model.config import preset_tiny


def random_tiny_model(seed: int = 0, **overrides):
    """Tiny `visor_vllm.model.reference.VisorForConditionalGeneration` with every parameter random."""
    from visor_vllm.model.reference import VisorForConditionalGeneration

    cfg = preset_tiny()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = VisorForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.language_model.model.embed_tokens.weight.normal_(0, 0.1, generator=g)
    return model


def write_random_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A complete VISOR checkpoint dir (config, weights, tokenizer, processor) of `random_tiny_model`
    (``overrides``: config fields, e.g. ``token_packing_ratio=2.0`` for a VISOR-TR checkpoint)."""
    from safetensors.torch import save_file

    from visor_vllm.checkpoints import files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_tiny_model(seed, **overrides)
    model.config.save_pretrained(out)
    files.build_tokenizer(out, routing_token=True)
    files.write_processor_files(out, model.config, files.VISOR_CHAT_TEMPLATE)
    files.write_generation_config(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "language_model.lm_head.weight")}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out
