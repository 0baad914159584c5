"""Plain-PyTorch VISOR: the readable specification of the method (paper Eq. 3, Sec. 4.3).

What. `VisorForConditionalGeneration` = transformers' SigLIP tower, LLaVA-OV projector and anyres
packing (reused unchanged) + a Qwen2 decoder whose layers follow ``config.layer_types``:

* ``text``:  ``T <- TL(T)``, causal attention over text tokens only.
* ``cross``: ``T <- TL(T + CrossAttn(T, V))``; text queries, visual keys/values after an RMSNorm
  and a per-image depthwise Conv1d (kernel 7, padding 3) as conditional position encoding
  (``x + conv(x)``), no RoPE, no mask; ``V`` is not updated.
* ``self`` and in the request's configuration: ``[V;T] <- TL([V;T])`` causal, updating ``V``.
* ``self`` but skipped: acts as ``text``.

Order, positions, routing and multi-image layout are documented in `visor_vllm.model.plan`. The router
runs inside the forward pass at ``config.router_layer`` unless a configuration is given.

`generate` keeps a per-layer text K/V cache and computes the visual keys/values of each layer
once (CA layers and the request's SA layers), so it doubles as the spec of the serving path.

Footguns. Never imports vllm (the vLLM model shares config, checkpoint schema and the pure
functions of `plan`/`packing`, not modules). One sequence at a time (``input_ids`` ``[L]`` or
``[1, L]``): this is a specification, not a batched trainer. Attention is SDPA with explicit
masks; the FLOPs model counts exactly what runs here (full mask rectangles).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionModel
from transformers.activations import ACT2FN
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
)

from visor_vllm.model import batch_layout, layers, plan
from visor_vllm.model.budget import Budget, allowed_configs
from visor_vllm.model.config import VisorConfig
from visor_vllm.model.layers import apply_rope, rope_cos_sin
from visor_vllm.model.packing import (anyres_grid_view, crop_side, pack_features,
                                      projector_config, visual_token_count)
from visor_vllm.model.plan import ImageTokenMismatchError


# ---------------------------------------------------------------------------------------------
# Building blocks (HF Qwen2 semantics, HF parameter names)
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(d, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d: int, inter: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """VISOR's new module: text queries, visual keys/values (Sec. 4.2.1), added residually."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, kernel: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.text_norm = RMSNorm(d, eps)
        self.vision_norm = RMSNorm(d, eps)
        self.pos_conv = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)  # depthwise CPE
        self.q_proj = nn.Linear(d, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

    def vision_kv(self, vis: torch.Tensor, image_lens: list[int]):
        """vis [Nv, d] -> k, v [Hkv, Nv, dh]; computed once per request and layer."""
        k, v = layers.cross_kv(self, vis, image_lens)
        return k.transpose(0, 1), v.transpose(0, 1)

    def forward(self, t: torch.Tensor, kv) -> torch.Tensor:
        """t [Nt, d] -> the residual update [Nt, d]."""
        return layers.cross_attend(self, t[None], kv[0][None], kv[1][None])[0]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: VisorConfig, kind: str):
        super().__init__()
        tc = cfg.text_config
        d, h, hkv = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
        dh = getattr(tc, "head_dim", None) or d // h
        self.kind = kind
        self.input_layernorm = RMSNorm(d, tc.rms_norm_eps)
        self.self_attn = SelfAttention(d, h, hkv, dh)
        self.post_attention_layernorm = RMSNorm(d, tc.rms_norm_eps)
        self.mlp = MLP(d, tc.intermediate_size, tc.hidden_act)
        if kind == "cross":
            self.cross_attn = CrossAttention(d, h, hkv, dh, cfg.cross_attn_conv_kernel, tc.rms_norm_eps)

    def forward(self, t: torch.Tensor, vis: torch.Tensor, lay, sa: bool, rope: dict):
        """The layer on a padded batch (`visor_vllm.model.layers.visor_layer`): the trainer's
        call, so an FSDP2 unit around this module gathers its parameters. The per-request path
        with caches is `VisorForConditionalGeneration._layer`."""
        return layers.visor_layer(self, t, vis, lay, sa, rope)


class Router(nn.Module):
    """MLP over the routing token's hidden state -> logits over ``config.sa_configs``."""

    def __init__(self, d: int, hidden: int, num_configs: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, num_configs)

    def forward(self, x):  # [R, d] -> [R, C]
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TextModel(nn.Module):
    def __init__(self, cfg: VisorConfig):
        super().__init__()
        tc = cfg.text_config
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, k) for k in cfg.layer_types)
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)


class LanguageModel(nn.Module):
    """Container so parameter names match the llava-hf layout (``language_model.model.*``)."""

    def __init__(self, cfg: VisorConfig):
        super().__init__()
        tc = cfg.text_config
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------
# Cache and outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class VisorCache:
    """Per-request state after prefill. Shapes: text K/V [Hkv, Nt_seen, dh]; vision K/V [Hkv, Nv, dh]."""

    sa_layers: tuple[int, ...]
    n_vision: int
    n_text: int = 0
    text_kv: list = field(default_factory=list)     # per layer (k, v) or None
    vision_kv: dict = field(default_factory=dict)   # layer -> (k, v): CA layers and run SA layers


@dataclass
class VisorOutput:
    logits: torch.Tensor                     # [Nt, vocab] for the text tokens, in prompt order
    sa_layers: tuple[int, ...]               # 0-based SA layers that ran (() for text-only)
    router_logits: torch.Tensor | None       # [R, C] when the router chose
    config_index: int | None                 # index into config.sa_configs when it is one
    cache: VisorCache | None = None


@dataclass
class GenerateOutput:
    tokens: list[int]                        # greedy tokens, the first one from the prefill
    logits: torch.Tensor                     # [len(tokens), vocab], the logits each was taken from
    prefill: VisorOutput                     # configuration that ran, router logits, cache


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class VisorForConditionalGeneration(nn.Module):
    def __init__(self, config: VisorConfig):
        super().__init__()
        self.config = config
        tc = config.text_config
        # hub layout: vision_tower.vision_model.* (transformers 5 drops the inner prefix)
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(projector_config(config))
        self.image_newline = nn.Parameter(torch.zeros(tc.hidden_size))
        self.language_model = LanguageModel(config)
        if plan.needs_router(config):
            self.router = Router(tc.hidden_size, config.router_hidden_size, len(config.sa_configs),
                                 tc.rms_norm_eps)
        dh = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        theta = (tc.rope_parameters or {}).get("rope_theta", 10000.0)
        self._rope = (theta, dh)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        theta, dh = self._rope
        return 1.0 / theta ** (torch.arange(0, dh, 2, device=device).float() / dh)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)``, ``.bfloat16()`` (DeepSpeed's bf16) would round RoPE's frequencies
        (angles off by ~1 rad at a few thousand positions, unlike vLLM's fp32 tables): they are
        recomputed in fp32 on the buffer's new device after every cast or move."""
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file

        config = VisorConfig.from_pretrained(path)
        model = cls(config)
        index = os.path.join(path, "model.safetensors.index.json")
        files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
                 else ["model.safetensors"])
        state = {}
        for f in files:
            state.update(load_file(os.path.join(path, f)))
        expected = set(model.state_dict())
        if config.tie_word_embeddings:
            expected.discard("language_model.lm_head.weight")
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match VisorConfig: missing "
                             f"{sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}...")
        model.load_state_dict(state, strict=False)
        return model.to(dtype).eval()

    # -- vision ---------------------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """LLaVA-OV image features, one ``[n_i, d]`` tensor per image (anyres + newline tokens).

        pixel_values: [n_images, max_crops, 3, S, S] as transformers' processor returns it.
        A prompt with several images uses each image's base crop only (LLaVA-OV's multi-image rule).
        """
        crops = self.crops_per_image(image_sizes)
        pixels = torch.cat([p[:n] for p, n in zip(pixel_values, crops)], dim=0)
        feats, side = self.encode_crops(pixels)
        return self.pack_images(list(torch.split(feats, crops, dim=0)), image_sizes, side)

    def dense_image_tokens(self, image_sizes: torch.Tensor | None, n_images: int) -> int:
        """What dense LLaVA-OV would see of these images: their full count (VISOR-TR packs)."""
        if not n_images:
            return 0
        return sum(visual_token_count(self.config, int(h), int(w), n_images, packed=False)
                   for h, w in image_sizes.tolist())

    def crops_per_image(self, image_sizes: torch.Tensor) -> list[int]:
        """Crops the tower sees per image of one prompt: anyres tiles for one image, else 1."""
        return batch_layout.crops_per_image(self.config, image_sizes.tolist(), len(image_sizes))

    def encode_crops(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Crops ``[n, 3, S, S]`` -> projected features ``[n, side*side, d]`` and the grid side.

        Crops are independent, so crops of many prompts can share one call (the trainer does).
        """
        cfg = self.config
        hidden = self.vision_tower.vision_model(pixels.to(self.inv_freq.device, self._dtype()),
                                   output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        hidden = pack_features(hidden, cfg)  # VISOR-TR (Appendix I), before the projector
        return self.multi_modal_projector(hidden), crop_side(cfg)

    def pack_images(self, feats: list[torch.Tensor], image_sizes: torch.Tensor,
                    side: int) -> list[torch.Tensor]:
        """One prompt's per-image crop features -> LLaVA-OV's packed sequence per image."""
        cfg = self.config
        # transformers' packing derives the grid side from the vision config: give it this one
        view = SimpleNamespace(config=anyres_grid_view(cfg, side))
        packed, _ = LlavaOnevisionModel.pack_image_features(
            view, feats, image_sizes, image_newline=self.image_newline,
            vision_aspect_ratio=cfg.vision_aspect_ratio)
        return list(packed)

    # -- decoder --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, sa_layers=None,
                use_cache: bool = False, budget: Budget | None = None) -> VisorOutput:
        """Prefill a prompt.

        ``sa_layers``: explicit 0-based SA layers; otherwise the router chooses, restricted by
        ``budget`` (`visor_vllm.model.budget`; an explicit-layers budget is the same as ``sa_layers``).
        """
        if budget is not None and budget.mode == "layers":
            sa_layers = budget.sa_layers
        ids = input_ids.reshape(-1)
        is_image = ids == self.config.image_token_index
        images = (self.embed_images(pixel_values, image_sizes)
                  if pixel_values is not None else [])
        n_vision = int(is_image.sum())
        if n_vision != sum(x.shape[0] for x in images):
            raise ImageTokenMismatchError(
                f"prompt has {n_vision} image tokens but the images give "
                f"{[x.shape[0] for x in images]} features")
        vis = torch.cat(images) if images else None
        text_ids = ids[~is_image]
        routing_idx = (text_ids == self.config.routing_token_id).nonzero().flatten()
        allowed = (None if budget is None
                   else allowed_configs(self.config, budget, n_vision, int(text_ids.numel()),
                                        self.dense_image_tokens(image_sizes, len(images))))
        return self._run(text_ids, vis, [x.shape[0] for x in images], sa_layers, routing_idx,
                         use_cache, allowed)

    def _run(self, text_ids, vis, image_lens, sa_layers, routing_idx, use_cache,
             allowed=None) -> VisorOutput:
        cfg, lm = self.config, self.language_model.model
        n_vision = 0 if vis is None else vis.shape[0]
        route = n_vision > 0 and sa_layers is None and plan.needs_router(cfg)
        if n_vision == 0:
            chosen = ()
        elif sa_layers is not None:
            chosen = plan.check_sa_layers(cfg, sa_layers)
        elif not plan.needs_router(cfg) or (allowed is not None and sum(allowed) == 1):
            chosen = tuple(cfg.sa_configs[allowed.index(True) if allowed else 0])
            route = False
        else:
            if routing_idx.numel() == 0:
                raise plan.RoutingTokenMissingError(
                    f"the prompt has images but no routing token {cfg.routing_token!r} "
                    f"(id {cfg.routing_token_id}); use the VISOR chat template or pass sa_layers")
            chosen = tuple(cfg.always_on_sa_layers)  # until the router layer (see plan)
        cache = VisorCache(chosen, n_vision)
        t = lm.embed_tokens(text_ids)
        v_pos, t_pos = plan.vision_first_positions(n_vision, t.shape[0], device=t.device)
        router_logits, index = None, None
        for i, layer in enumerate(lm.layers):
            t, vis = self._layer(i, layer, t, t_pos, vis, v_pos, image_lens, cache)
            if route and i == cfg.router_layer:
                router_logits = self.router(t[routing_idx])
                index = plan.choose_configuration(cfg, router_logits, allowed)
                cache.sa_layers = tuple(cfg.sa_configs[index])
        cache.n_text = t.shape[0]
        if index is None and cache.sa_layers and list(cache.sa_layers) in cfg.sa_configs:
            index = cfg.sa_configs.index(list(cache.sa_layers))
        logits = self.language_model.lm_head(lm.norm(t))
        return VisorOutput(logits, cache.sa_layers, router_logits, index, cache if use_cache else None)

    def _layer(self, i, layer, t, t_pos, vis, v_pos, image_lens, cache: VisorCache):
        """One decoder layer on new text tokens ``t`` [n, d] (and on ``vis`` [Nv, d] at prefill).

        The math is `visor_vllm.model.layers` (the trainer's), one request at a time (batch 1);
        what is particular here is the caches: the text K/V of every layer, the visual K/V of
        CA layers and of the SA layers that ran.
        """
        past = cache.text_kv[i] if i < len(cache.text_kv) else None
        if layer.kind == "cross" and cache.n_vision:
            if i not in cache.vision_kv:
                cache.vision_kv[i] = layer.cross_attn.vision_kv(vis, image_lens)
            t = t + layer.cross_attn(t, cache.vision_kv[i])
        joint = layer.kind == "self" and i in cache.sa_layers and cache.n_vision > 0
        seen = {}
        if joint and i not in cache.vision_kv:  # prefill of an SA layer: run on [V;T], update V
            nv = vis.shape[0]

            def attend(q, k, v):  # causal over [V;T]; V's K/V cached for the text that follows
                seen["k"], seen["v"] = k[0, :, nv:], v[0, :, nv:]
                cache.vision_kv[i] = (k[0, :, :nv], v[0, :, :nv])
                return layers.attend(q, k, v, causal_offset=0)
            cos, sin = rope_cos_sin(self.inv_freq, torch.cat([v_pos, t_pos]), vis.dtype)
            x = layers.attention_layer(layer, torch.cat([vis, t])[None], cos[None], sin[None],
                                       attend)[0]
            vis, t = x[:nv], x[nv:]
        else:  # text tokens only, after any cached prefix (vision K/V of a run SA layer, past text)
            prefix = ([cache.vision_kv[i]] if joint else []) + ([past] if past is not None else [])

            def attend(q, k, v):
                seen["k"], seen["v"] = k[0], v[0]
                k = torch.cat([p[0] for p in prefix] + [k[0]], dim=1)[None]
                v = torch.cat([p[1] for p in prefix] + [v[0]], dim=1)[None]
                return layers.attend(q, k, v, causal_offset=k.shape[2] - q.shape[2])
            cos, sin = rope_cos_sin(self.inv_freq, t_pos, t.dtype)
            t = layers.attention_layer(layer, t[None], cos[None], sin[None], attend)[0]
        k_new, v_new = seen["k"], seen["v"]
        text_kv = (k_new, v_new) if past is None else (torch.cat([past[0], k_new], 1),
                                                        torch.cat([past[1], v_new], 1))
        if i < len(cache.text_kv):
            cache.text_kv[i] = text_kv
        else:
            cache.text_kv.append(text_kv)
        return t, vis

    def decode(self, token_ids: torch.Tensor, cache: VisorCache) -> torch.Tensor:
        """Run new text tokens ``[n]`` against a prefilled cache; returns logits ``[n, vocab]``."""
        lm = self.language_model.model
        t = lm.embed_tokens(token_ids.reshape(-1))
        _, t_pos = plan.vision_first_positions(cache.n_vision, t.shape[0], past_text=cache.n_text,
                                               device=t.device)
        for i, layer in enumerate(lm.layers):
            t, _ = self._layer(i, layer, t, t_pos, None, None, None, cache)
        cache.n_text += t.shape[0]
        return self.language_model.lm_head(lm.norm(t))

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, image_sizes=None, sa_layers=None,
                 max_new_tokens: int = 16, eos_token_id: int | None = None,
                 budget: Budget | None = None) -> GenerateOutput:
        """Greedy decoding with caches: prefill once, then one token per step."""
        out = self.forward(input_ids, pixel_values, image_sizes, sa_layers, use_cache=True,
                           budget=budget)
        tokens, step_logits, logits = [], [], out.logits[-1:]
        for _ in range(max_new_tokens):
            step_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            if len(tokens) == max_new_tokens or tokens[-1] == eos_token_id:
                break
            logits = self.decode(torch.tensor([tokens[-1]], device=logits.device), out.cache)
        return GenerateOutput(tokens, torch.stack(step_logits), out)

    def _dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

