"""`VisorConfig`: LLaVA-OneVision plus the VISOR layer schedule, in one checked place.

What it is. A transformers config (model_type ``visor``) that *is* a `LlavaOnevisionConfig` (same
vision/text sub-configs, image token, anyres pinpoints, projector fields, so transformers' SigLIP,
projector, anyres packing and `LlavaOnevisionProcessor` work unchanged) plus:

* ``layer_types`` -- one entry per LLM layer, from the closed set ``text | cross | self``
  (paper Eq. 3): ``text`` runs the transformer layer on text tokens only, ``cross`` adds the new
  cross-attention module (text queries, visual keys/values) before the text-only layer, ``self``
  is *SA-capable*: it runs the ordinary layer on ``[V;T]`` when the request's configuration
  contains it, and acts as ``text`` otherwise.
* ``sa_configs`` -- the viable SA configurations (paper Sec. 4.2.3, Appendix A), each a sorted
  list of 0-based layer indices, listed from cheapest to costliest.
* ``always_on_sa_layers`` -- SA layers present in every configuration (layer 1 in the paper).
* ``router_layer`` -- the router reads the routing token's hidden state at the *output* of this
  layer, i.e. "the block prior to the first self-attention block that is a candidate for being
  skipped" (Sec. 4.3). It must come before every optional SA layer so the choice is causal.
* ``routing_token`` / ``routing_token_id`` -- appended after each question by the chat template.
* ``position_scheme`` -- only ``vision_first``: see `visor_vllm.model.plan` for the sequence order.
* ``token_packing_ratio`` -- VISOR-TR (Appendix I), off when ``None``.

Footguns.
* Indices in this config are **0-based**. The paper and every user-facing surface (CLI ``--sa``,
  budget overrides) use **1-based layer numbers**; convert only with
  `visor_vllm.model.plan.layers_from_numbers` / `numbers_from_layers`.
* transformers builds a default instance (``VisorConfig()``) to diff against when saving, so the
  defaults must validate: with no schedule given, every layer is ``self`` and the only
  configuration runs all of them -- the degenerate VISOR that *is* LLaVA-OneVision.
* ``layer_types`` here is VISOR's; ``text_config.layer_types`` is Qwen2's sliding-window field.
"""

from __future__ import annotations

import itertools
import math

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

LAYER_KINDS = ("text", "cross", "self")

# Qwen2 / LLaVA-OV special tokens at their real ids; the routing token takes the first free slot
# inside Qwen2's padded 151,936-row embedding, so adding it needs no resize.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<image>": 151646,
    "<video>": 151647,
    "<|route|>": 151648,
}
QWEN2_VOCAB = 151936
COMPACT_SPECIALS_FROM_END = 24  # a compact vocabulary keeps its specials in its last rows


def special_tokens(vocab_size: int = QWEN2_VOCAB) -> dict[str, int]:
    """Special-token ids for a vocabulary size: Qwen2's real ids, or a compact block.

    Every real-size preset (and ``tiny``) uses Qwen2's 151,936-row vocabulary with the real ids.
    A compact vocabulary (the ``synthetic`` preset's 1,024 rows: a 151,936-row head would be
    ~90% of a 0.6M-parameter model's step) puts the same tokens, in the same order, at
    ``vocab_size - 24`` onwards; the BPE fills the rows below.
    """
    if vocab_size == QWEN2_VOCAB:
        return dict(SPECIAL_TOKENS)
    base = vocab_size - COMPACT_SPECIALS_FROM_END
    if base < 256:
        raise VisorConfigError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    first = min(SPECIAL_TOKENS.values())
    return {k: base + v - first for k, v in SPECIAL_TOKENS.items()}

# Appendix A, 1-based layer numbers, cheapest first (the order the paper lists them).
PAPER_SA_CONFIGS_0_5B = [
    [1, 4], [1, 7], [1, 4, 7], [1, 4, 16], [1, 7, 16], [1, 10, 16], [1, 4, 7, 16],
    [1, 4, 7, 22], [1, 4, 10, 16], [1, 4, 7, 10, 16], [1, 4, 7, 16, 22],
    [1, 4, 7, 10, 16, 22], [1, 4, 7, 10, 16, 19, 22],
]


class VisorConfigError(ValueError):
    """A VISOR config whose layer schedule, configurations or router placement is inconsistent."""


@strict
class VisorConfig(LlavaOnevisionConfig):
    model_type = "visor"

    layer_types: list[str] | None = None
    sa_configs: list[list[int]] | None = None
    always_on_sa_layers: list[int] | None = None
    router_layer: int | None = None
    router_hidden_size: int = 256
    routing_token: str = "<|route|>"
    routing_token_id: int = SPECIAL_TOKENS["<|route|>"]
    position_scheme: str = "vision_first"
    cross_attn_conv_kernel: int = 7
    token_packing_ratio: float | None = None
    token_packing_s2d: int = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.text_config.num_hidden_layers
        if self.layer_types is None:  # degenerate VISOR == LLaVA-OneVision (see module footguns)
            self.layer_types = ["self"] * n
        if self.sa_configs is None:
            self.sa_configs = [[i for i, t in enumerate(self.layer_types) if t == "self"]]
        if self.always_on_sa_layers is None:
            self.always_on_sa_layers = sorted(set.intersection(*map(set, self.sa_configs)))
        validate_schedule(self)

    # -- derived views (never stored, so they cannot disagree with layer_types) -----------------
    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def cross_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "cross"]

    @property
    def sa_capable_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "self"]

    @property
    def optional_sa_layers(self) -> list[int]:
        return sorted(set(self.sa_capable_layers) - set(self.always_on_sa_layers))


def validate_schedule(cfg: VisorConfig) -> None:
    """Raise `VisorConfigError` unless the layer schedule, configurations and router agree."""
    n = cfg.text_config.num_hidden_layers
    types = cfg.layer_types
    if len(types) != n:
        raise VisorConfigError(f"layer_types has {len(types)} entries but the LLM has {n} layers")
    bad = sorted({t for t in types if t not in LAYER_KINDS})
    if bad:
        raise VisorConfigError(f"unknown layer type(s) {bad}; allowed: {list(LAYER_KINDS)}")
    capable = {i for i, t in enumerate(types) if t == "self"}
    if not cfg.sa_configs:
        raise VisorConfigError("sa_configs must list at least one configuration")
    seen = set()
    for c in cfg.sa_configs:
        _check_indices(c, n, "SA configuration")
        if not set(c) <= capable:
            raise VisorConfigError(
                f"SA configuration {c} uses layer(s) {sorted(set(c) - capable)} that are not "
                f"SA-capable (layer_types 'self' at {sorted(capable)}); a layer cannot be both "
                "cross-attention and self-attention"
            )
        if tuple(c) in seen:
            raise VisorConfigError(f"SA configuration {c} is listed twice")
        seen.add(tuple(c))
    used = set().union(*map(set, cfg.sa_configs))
    if capable - used:
        raise VisorConfigError(
            f"layer(s) {sorted(capable - used)} are 'self' but in no SA configuration; mark them 'text'"
        )
    _check_indices(cfg.always_on_sa_layers, n, "always_on_sa_layers")
    for c in cfg.sa_configs:
        if not set(cfg.always_on_sa_layers) <= set(c):
            raise VisorConfigError(
                f"SA configuration {c} lacks always-on layer(s) "
                f"{sorted(set(cfg.always_on_sa_layers) - set(c))}"
            )
    optional = sorted(capable - set(cfg.always_on_sa_layers))
    if cfg.router_layer is not None:
        if not 0 <= cfg.router_layer < n:
            raise VisorConfigError(f"router_layer {cfg.router_layer} is out of range [0, {n})")
        if optional and cfg.router_layer >= optional[0]:
            raise VisorConfigError(
                f"router_layer {cfg.router_layer} must come before the first optional SA layer "
                f"{optional[0]}: the router cannot choose a layer that has already run"
            )
    elif len(cfg.sa_configs) > 1:
        raise VisorConfigError("several SA configurations need a router_layer to choose among them")
    if cfg.position_scheme != "vision_first":
        raise VisorConfigError(f"position_scheme {cfg.position_scheme!r}: only 'vision_first' exists")
    k = cfg.cross_attn_conv_kernel
    if k < 1 or k % 2 == 0:
        raise VisorConfigError(f"cross_attn_conv_kernel must be odd and positive, got {k}")
    r = cfg.token_packing_ratio
    if r is not None and not (math.isfinite(r) and r >= 1):
        raise VisorConfigError(f"token_packing_ratio must be >= 1 (or None), got {r}")
    if cfg.token_packing_s2d < 1:
        raise VisorConfigError(f"token_packing_s2d must be >= 1, got {cfg.token_packing_s2d}")


def _check_indices(idx: list[int], n: int, what: str) -> None:
    if list(idx) != sorted(set(idx)):
        raise VisorConfigError(f"{what} {idx} must be sorted and without repeats")
    out = [i for i in idx if not 0 <= i < n]
    if out:
        raise VisorConfigError(f"{what} {idx} has layer index(es) {out} outside [0, {n})")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def uniform_layers(num_layers: int, count: int, offset: int = 0) -> list[int]:
    """``count`` layer indices spread uniformly over ``num_layers``: ``round(i*L/count) + offset``."""
    return [int(math.floor(i * num_layers / count + 0.5)) + offset for i in range(count)]


def schedule_from_slots(num_layers: int, slot_configs: list[list[int]]) -> dict:
    """The paper's rule, applied to any depth.

    ``|L_CA| = |L_SA| = L/3`` (Sec. 4.2.3). SA slots sit on the uniform grid
    ``round(i*L/n)`` (n = L//3, so layers 1, 4, 7, ... in the paper's numbering for L=24); CA
    layers sit one layer after each slot, so every CA layer reads visual tokens that an SA layer
    just refined. ``slot_configs`` name grid slots, so one list of configurations (Appendix A's,
    given for 0.5B) carries over to deeper models. The SA-capable layers are the slots some
    configuration uses; the router reads the block before the first optional SA layer.
    """
    n = num_layers // 3
    grid = uniform_layers(num_layers, n)
    ca = uniform_layers(num_layers, n, offset=1)
    configs = [[grid[s] for s in c] for c in slot_configs]
    capable = sorted(set().union(*map(set, configs)))
    types = ["text"] * num_layers
    for i in ca:
        types[i] = "cross"
    for i in capable:
        types[i] = "self"
    always = sorted(set.intersection(*map(set, configs)))
    optional = [i for i in capable if i not in always]
    return dict(layer_types=types, sa_configs=configs, always_on_sa_layers=always,
                router_layer=optional[0] - 1 if optional else None)


def _paper_slots() -> list[list[int]]:
    # Appendix A layers are 1, 4, 7, ... = slot*3 + 1 on the 24-layer grid.
    return [[(x - 1) // 3 for x in c] for c in PAPER_SA_CONFIGS_0_5B]


def _siglip_so400m() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                              num_attention_heads=16, image_size=384, patch_size=14,
                              vision_use_head=False, layer_norm_eps=1e-6)


def _qwen2(hidden, inter, layers, heads, kv_heads, vocab=QWEN2_VOCAB) -> Qwen2Config:
    sp = special_tokens(vocab)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"])


def _make(vision, text, schedule, pinpoints=None, **extra) -> VisorConfig:
    sp = special_tokens(text.vocab_size)
    cfg = VisorConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=sp["<image>"], video_token_index=sp["<video>"],
        routing_token_id=sp["<|route|>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
        image_grid_pinpoints=pinpoints, **schedule, **extra,
        # vLLM: visual tokens are the encoder sequence, text the decoder sequence (vllm_model);
        # the decoder start token is never prepended (the processor skips it) but must exist.
        is_encoder_decoder=True, decoder_start_token_id=sp["<|im_start|>"],
    )
    cfg.architectures = ["VisorForConditionalGeneration"]
    return cfg


def preset_0_5b() -> VisorConfig:
    """Qwen2-0.5B + SigLIP-400M, 24 layers; Appendix A's 13 configurations verbatim."""
    return _make(_siglip_so400m(), _qwen2(896, 4864, 24, 14, 2), schedule_from_slots(24, _paper_slots()))


def preset_1_5b() -> VisorConfig:
    """Qwen2-1.5B + SigLIP-400M, 28 layers; the 0.5B slot configurations on the 28-layer grid."""
    return _make(_siglip_so400m(), _qwen2(1536, 8960, 28, 12, 2), schedule_from_slots(28, _paper_slots()))


TINY_IMAGE_SIZE = 32  # SigLIP crop; patch 8 -> a 4x4 grid, 16 visual tokens per crop


def preset_tiny() -> VisorConfig:
    """Six layers covering every kind; head_dim 32 (a size vLLM's CPU attention supports).

    layers: 0 self (always on), 1 cross, 2 text (router reads here), 3 self, 4 cross, 5 self.
    """
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8,
                                vision_use_head=False, layer_norm_eps=1e-6)
    text = _qwen2(128, 256, 6, 4, 2)
    schedule = dict(layer_types=["self", "cross", "text", "self", "cross", "self"],
                    sa_configs=[[0], [0, 3], [0, 5], [0, 3, 5]], always_on_sa_layers=[0],
                    router_layer=2)
    s = TINY_IMAGE_SIZE
    pinpoints = [[s * i, s * j] for i in range(1, 7) for j in range(1, 7)]
    return _make(vision, text, schedule, pinpoints=pinpoints, router_hidden_size=32)


SYNTHETIC_VOCAB = 1024      # compact vocabulary: BPE rows 0..999, specials from 1000
SYNTHETIC_IMAGE_SIZE = 32  # a 4x4 grid of 8-px cells: one visual token per cell and crop


def _synthetic(layer_types: list[str]) -> VisorConfig:
    """The synthetic model with a layer schedule: layer 0 SA always on, every subset of the
    other SA-capable layers a configuration (cheapest first), the router in the block before
    the first of them (layer 1 where layer 1 is CA, layer 0 where it is SA-capable)."""
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=2, image_size=SYNTHETIC_IMAGE_SIZE,
                                patch_size=8, vision_use_head=False, layer_norm_eps=1e-6)
    text = _qwen2(64, 256, 8, 2, 2, vocab=SYNTHETIC_VOCAB)
    text.tie_word_embeddings = False  # as the measured prototype: a separate head, default init
    sa = [i for i, t in enumerate(layer_types) if t == "self"][1:]
    optional = [list(c) for n in range(len(sa) + 1) for c in itertools.combinations(sa, n)]
    schedule = dict(layer_types=list(layer_types),
                    sa_configs=[[0] + c for c in optional], always_on_sa_layers=[0],
                    router_layer=sa[0] - 1)
    s = SYNTHETIC_IMAGE_SIZE
    cfg = _make(vision, text, schedule, pinpoints=[[s, s]], router_hidden_size=64)
    cfg.tie_word_embeddings = False
    return cfg


def preset_synthetic() -> VisorConfig:
    """The embedded training task's model (`visor_vllm.training.synthetic`): 8 layers, 8 configs.

    layers: ``[SA*, CA, SA, CA, SA, CA, SA, CA]`` -- SA-capable 0 (always on), 2, 4, 6, a CA
    layer after each SA slot, the router after layer 1: every subset of {2, 4, 6} is a
    configuration. d=64, 2 heads of 32, SwiGLU 256: the design `training-feasibility.md`
    measured to show the paper's effects on 2 CPU cores. The vision tower is a 1-layer SigLIP
    that the recipe makes cell-local (attention output zeroed) and pretrains on per-cell
    attributes before freezing it: a frozen, good, non-mixing encoder, so that every cross-cell
    relation is the LLM's work (with a trained mixing tower the effects vanished there).
    A compact 1,024-token vocabulary (`special_tokens`) and an untied head, as the prototype.
    """
    return _synthetic(["self", "cross"] * 4)


def preset_synthetic_5sa() -> VisorConfig:
    """`preset_synthetic` with five SA-capable layers of eight: 16 configurations.

    layers: ``[SA*, CA, SA, SA, CA, SA, SA, CA]`` -- SA-capable 0 (always on), 2, 3, 5, 6;
    CA 1, 4, 7. The same LLaVA-OV part (the same dense model converts to either), the router
    after layer 1 as there. Why: converting the dense model turns the layers that become CA
    into ones that no longer update visual tokens, and the multi-round family ``largest``
    lost most there (recipe key ``preset``; docs/training.md).
    """
    return _synthetic(["self", "cross", "self", "self", "cross", "self", "self", "cross"])


def preset_synthetic_late_ca() -> VisorConfig:
    """`preset_synthetic_5sa`'s counts with the CA layers last: 16 configurations.

    layers: ``[SA*, SA, SA, SA, SA, CA, CA, CA]`` -- SA-capable 0 (always on), 1, 2, 3, 4; CA
    5, 6, 7; the router after layer 0 (the block before the first optional SA layer). Every
    configuration costs what the same number of SA layers costs in ``synthetic-5sa``. Why: a CA
    layer never updates the visual tokens, and stage 1 (new modules only) cannot put back an
    update the dense model made there. Freezing the dense model's visual tokens at layers
    6-8 (1-based) cost ten of eleven seeds' dense models no family, while at 2, 5 and 8 it
    cost seed 5 every vertical family (``vsame`` 1.00 -> 0.64), as VISOR lost them there.
    Screened on four seeds (2026-12-07, docs/training.md): finding 2 on all four, all three
    findings on two, as the default; not the default. Footgun: the router reads the routing
    token after one layer and fits its labels worse (71-94 % against 99.8 %).
    """
    return _synthetic(["self", "self", "self", "self", "self", "cross", "cross", "cross"])


PRESETS = {"visor-0.5b": preset_0_5b, "visor-1.5b": preset_1_5b, "tiny": preset_tiny,
           "synthetic": preset_synthetic, "synthetic-5sa": preset_synthetic_5sa,
           "synthetic-late-ca": preset_synthetic_late_ca}


def get_preset(name: str) -> VisorConfig:
    """A fresh `VisorConfig` for a preset name (a key of `PRESETS`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise VisorConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
