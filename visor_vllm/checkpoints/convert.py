"""LLaVA-OneVision (llava-hf layout) -> VISOR checkpoint: a weight map plus one pure function.

What. The VISOR checkpoint schema is the llava-hf layout *unchanged* (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``image_newline``, ``language_model.model.*``,
``language_model.lm_head.weight`` unless tied) plus the new tensors of `NEW_WEIGHTS`:

* per cross layer ``i`` (``cfg.cross_layers``), ``language_model.model.layers.{i}.cross_attn.``
  ``q_proj.{weight,bias}`` [H*dh, d], [H*dh]; ``k_proj`` / ``v_proj.{weight,bias}`` [Hkv*dh, d],
  [Hkv*dh]; ``o_proj.weight`` [d, H*dh]; ``pos_conv.{weight,bias}`` [d, 1, k], [d] (depthwise
  Conv1d, padding k//2); ``text_norm.weight`` [d]; ``vision_norm.weight`` [d] (RMSNorms);
* ``router.norm.weight`` [d], ``router.fc1.{weight,bias}`` [r, d], [r],
  ``router.fc2.{weight,bias}`` [C, r], [C] -- only when there is a choice (C = len(sa_configs) > 1).

`WEIGHT_MAP` names every copied tensor (source pattern -> VISOR pattern, ``{}`` = layer index),
`COPIED_SHAPES` / `NEW_WEIGHTS` give every tensor's shape in symbols of the config (`dims`), and
`copy_weights` is the pure function (gpt-fast / litgpt style) that `convert` wraps with file I/O.

Initialisation (``init``).
* ``"converter"`` -- what a real conversion uses. ``cross_attn.{q,k,v}_proj`` <- copies of the
  layer's ``self_attn.{q,k,v}_proj`` (text queries ask vision what the dense layer asked);
  ``o_proj`` and ``pos_conv`` <- zeros, so the converted model first computes exactly the
  text-only layer at CA layers (the standard zero-init of inserted adapters); ``text_norm`` /
  ``vision_norm`` <- the layer's ``input_layernorm``; router: norm <- ones, fc1 ~ N(0, 0.02)
  (seeded), fc1.bias, fc2.weight <- 0, fc2.bias <- 0 except +10 on the costliest configuration,
  so an untrained router conservatively runs the costliest one. The routing token's embedding
  row (and lm_head row if untied) <- the mean of the regular-vocabulary rows [0, 151643).
* ``"random"`` -- test checkpoints: every new tensor ~ N(0, 0.02), norms ~ 1 + N(0, 0.02), from a
  seeded generator, so every module changes the output. The routing token row is left as the
  source's (already random in a random source).

Footguns.
* Source names are normalised first (`to_hub_names`): transformers-5 ``state_dict`` names
  (``model.vision_tower.X``, ``model.language_model.X``, ``lm_head.weight``) and its
  ``save_pretrained`` names (``vision_tower.X``) both become hub names.
* Every source tensor must be consumed exactly once; with tied embeddings a source
  ``lm_head`` is accepted only as an exact duplicate of ``embed_tokens`` and dropped.
* `copy_weights` works on ``meta`` tensors (no data access): meta in, meta out.
* The routing token must be the *next* id of the source tokenizer (151648 for LLaVA-OV's);
  `convert` refuses otherwise rather than resizing embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from visor_vllm.checkpoints.files import (CheckpointError, chat_template, load_state_dict,
                                          save_state_dict, template_style,
                                          write_generation_config, write_processor_files)
from visor_vllm.model.config import (PRESETS, SPECIAL_TOKENS, VisorConfig, get_preset,
                                      special_tokens)

INITS = ("converter", "random")
HUB_EMBED = "language_model.model.embed_tokens.weight"
HUB_LM_HEAD = "language_model.lm_head.weight"
REGULAR_VOCAB = SPECIAL_TOKENS["<|endoftext|>"]  # rows [0, 151643) are Qwen2's trained BPE tokens
INIT_STD = 0.02
ROUTER_PRIOR = 10.0  # fc2.bias on the costliest configuration under init="converter"

_CROSS = "language_model.model.layers.{}.cross_attn."


class ConversionError(CheckpointError):
    """A source checkpoint that does not convert to the requested VISOR config."""


# ---------------------------------------------------------------------------------------------
# The declarative schema
# ---------------------------------------------------------------------------------------------

_V = "vision_tower.vision_model."
_VL = _V + "encoder.layers.{}."
_T = "language_model.model."
_TL = _T + "layers.{}."

# hub-layout name pattern -> shape in `dims` symbols; every tensor VISOR copies from LLaVA-OV
COPIED_SHAPES: dict[str, tuple[str, ...]] = {
    _V + "embeddings.patch_embedding.weight": ("vd", "vC", "p", "p"),
    _V + "embeddings.patch_embedding.bias": ("vd",),
    _V + "embeddings.position_embedding.weight": ("vP", "vd"),
    **{_VL + f"{n}.{w}": ("vd",) for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")},
    **{_VL + f"self_attn.{n}_proj.weight": ("vd", "vd") for n in ("q", "k", "v", "out")},
    **{_VL + f"self_attn.{n}_proj.bias": ("vd",) for n in ("q", "k", "v", "out")},
    _VL + "mlp.fc1.weight": ("vI", "vd"),
    _VL + "mlp.fc1.bias": ("vI",),
    _VL + "mlp.fc2.weight": ("vd", "vI"),
    _VL + "mlp.fc2.bias": ("vd",),
    _V + "post_layernorm.weight": ("vd",),
    _V + "post_layernorm.bias": ("vd",),
    "multi_modal_projector.linear_1.weight": ("d", "vdp"),
    "multi_modal_projector.linear_1.bias": ("d",),
    "multi_modal_projector.linear_2.weight": ("d", "d"),
    "multi_modal_projector.linear_2.bias": ("d",),
    "image_newline": ("d",),
    HUB_EMBED: ("V", "d"),
    _TL + "self_attn.q_proj.weight": ("H*dh", "d"),
    _TL + "self_attn.q_proj.bias": ("H*dh",),
    _TL + "self_attn.k_proj.weight": ("Hkv*dh", "d"),
    _TL + "self_attn.k_proj.bias": ("Hkv*dh",),
    _TL + "self_attn.v_proj.weight": ("Hkv*dh", "d"),
    _TL + "self_attn.v_proj.bias": ("Hkv*dh",),
    _TL + "self_attn.o_proj.weight": ("d", "H*dh"),
    _TL + "mlp.gate_proj.weight": ("I", "d"),
    _TL + "mlp.up_proj.weight": ("I", "d"),
    _TL + "mlp.down_proj.weight": ("d", "I"),
    _TL + "input_layernorm.weight": ("d",),
    _TL + "post_attention_layernorm.weight": ("d",),
    _T + "norm.weight": ("d",),
    HUB_LM_HEAD: ("V", "d"),
}

# source pattern -> VISOR pattern. The VISOR schema is the llava-hf layout unchanged, so every
# copied tensor keeps its name; the map exists so that a rename would be one line here.
WEIGHT_MAP: dict[str, str] = {name: name for name in COPIED_SHAPES}

# copied patterns that exist only under a config condition
_ONLY_IF: dict[str, Callable[[VisorConfig], bool]] = {
    HUB_LM_HEAD: lambda cfg: not cfg.tie_word_embeddings,
    "multi_modal_projector.linear_1.bias": lambda cfg: cfg.multimodal_projector_bias,
    "multi_modal_projector.linear_2.bias": lambda cfg: cfg.multimodal_projector_bias,
}


@dataclass(frozen=True)
class NewWeight:
    """A tensor VISOR adds. ``init``: its ``init="converter"`` rule; ``random``: its test init.

    Rules: ``copy:<suffix>`` (clone of ``language_model.model.layers.{i}.<suffix>``, same layer),
    ``zeros``, ``ones``, ``normal`` (N(0, 0.02)), ``norm`` (1 + N(0, 0.02)), ``costliest``
    (zeros, +ROUTER_PRIOR on the costliest configuration).
    """

    shape: tuple[str, ...]
    init: str
    random: str = "normal"


NEW_WEIGHTS: dict[str, NewWeight] = {
    _CROSS + "q_proj.weight": NewWeight(("H*dh", "d"), "copy:self_attn.q_proj.weight"),
    _CROSS + "q_proj.bias": NewWeight(("H*dh",), "copy:self_attn.q_proj.bias"),
    _CROSS + "k_proj.weight": NewWeight(("Hkv*dh", "d"), "copy:self_attn.k_proj.weight"),
    _CROSS + "k_proj.bias": NewWeight(("Hkv*dh",), "copy:self_attn.k_proj.bias"),
    _CROSS + "v_proj.weight": NewWeight(("Hkv*dh", "d"), "copy:self_attn.v_proj.weight"),
    _CROSS + "v_proj.bias": NewWeight(("Hkv*dh",), "copy:self_attn.v_proj.bias"),
    _CROSS + "o_proj.weight": NewWeight(("d", "H*dh"), "zeros"),
    _CROSS + "pos_conv.weight": NewWeight(("d", "1", "k"), "zeros"),
    _CROSS + "pos_conv.bias": NewWeight(("d",), "zeros"),
    _CROSS + "text_norm.weight": NewWeight(("d",), "copy:input_layernorm.weight", "norm"),
    _CROSS + "vision_norm.weight": NewWeight(("d",), "copy:input_layernorm.weight", "norm"),
    "router.norm.weight": NewWeight(("d",), "ones", "norm"),
    "router.fc1.weight": NewWeight(("r", "d"), "normal"),
    "router.fc1.bias": NewWeight(("r",), "zeros"),
    "router.fc2.weight": NewWeight(("C", "r"), "zeros"),
    "router.fc2.bias": NewWeight(("C",), "costliest"),
}


def dims(cfg: VisorConfig) -> dict[str, int]:
    """The shape symbols of `COPIED_SHAPES` / `NEW_WEIGHTS` for a config."""
    vc, tc = cfg.vision_config, cfg.text_config
    d, h = tc.hidden_size, tc.num_attention_heads
    s2d = cfg.token_packing_s2d ** 2 if cfg.token_packing_ratio is not None else 1
    return dict(
        vd=vc.hidden_size, vI=vc.intermediate_size, vC=vc.num_channels, p=vc.patch_size,
        vP=(vc.image_size // vc.patch_size) ** 2, vdp=vc.hidden_size * s2d,  # TR widens the projector
        d=d, I=tc.intermediate_size, V=tc.vocab_size, H=h, Hkv=tc.num_key_value_heads,
        dh=_head_dim(tc), k=cfg.cross_attn_conv_kernel, r=cfg.router_hidden_size,
        C=len(cfg.sa_configs),
    )


def _head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def _shape(spec: tuple[str, ...], sym: Mapping[str, int]) -> tuple[int, ...]:
    """("H*dh", "d") -> (H*dh, d): each entry is a product of symbols and integers."""
    out = []
    for entry in spec:
        n = 1
        for f in entry.split("*"):
            n *= int(f) if f.isdigit() else sym[f]
        out.append(n)
    return tuple(out)


def _expand(pattern: str, cfg: VisorConfig, layers: list[int] | None = None) -> list[str]:
    """A pattern's concrete names: ``{}`` over its tower's layers (or the given ones)."""
    if "{}" not in pattern:
        return [pattern]
    if layers is None:
        tower = cfg.vision_config if pattern.startswith("vision_tower.") else cfg.text_config
        layers = range(tower.num_hidden_layers)
    return [pattern.format(i) for i in layers]


def copied_tensors(cfg: VisorConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """hub source name -> (VISOR name, shape) for every tensor copied under ``cfg``."""
    sym = dims(cfg)
    out = {}
    for pattern, dst in WEIGHT_MAP.items():
        if not _ONLY_IF.get(pattern, lambda _: True)(cfg):
            continue
        shape = _shape(COPIED_SHAPES[pattern], sym)
        for src, name in zip(_expand(pattern, cfg), _expand(dst, cfg)):
            out[src] = (name, shape)
    return out


def new_tensors(cfg: VisorConfig) -> dict[str, tuple[NewWeight, int | None]]:
    """VISOR name -> (rule, layer index or None) for every new tensor, in a fixed order."""
    out = {}
    for pattern, rule in NEW_WEIGHTS.items():
        if pattern.startswith("router.") and len(cfg.sa_configs) < 2:
            continue  # no choice, no router
        if "{}" in pattern:
            for i in cfg.cross_layers:
                out[pattern.format(i)] = (rule, i)
        else:
            out[pattern] = (rule, None)
    return out


def visor_shapes(cfg: VisorConfig) -> dict[str, tuple[int, ...]]:
    """The full VISOR checkpoint schema: every tensor name and its shape."""
    sym = dims(cfg)
    out = {name: shape for name, shape in copied_tensors(cfg).values()}
    out.update({name: _shape(rule.shape, sym) for name, (rule, _) in new_tensors(cfg).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Source names
# ---------------------------------------------------------------------------------------------

_HUB_TOPS = ("vision_tower.", "language_model.", "multi_modal_projector.", "image_newline")


def hub_name(name: str) -> str:
    """transformers-5 ``state_dict`` / ``save_pretrained`` names -> llava-hf hub names."""
    if name == "lm_head.weight":
        return HUB_LM_HEAD
    if name.startswith("model.") and name[len("model."):].startswith(_HUB_TOPS):
        name = name[len("model."):]
    if name.startswith("vision_tower.") and not name.startswith(_V):
        return _V + name[len("vision_tower."):]
    if name.startswith("language_model.") and not name.startswith((_T, "language_model.lm_head.")):
        return _T + name[len("language_model."):]
    return name


def to_hub_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a source state dict to hub names; two sources for one name is an error."""
    out, origin = {}, {}
    for name, t in state.items():
        hub = hub_name(name)
        if hub in out:
            raise ConversionError(f"source tensors {origin[hub]!r} and {name!r} both map to {hub!r}")
        out[hub], origin[hub] = t, name
    return out


# ---------------------------------------------------------------------------------------------
# The pure function
# ---------------------------------------------------------------------------------------------

def copy_weights(cfg: VisorConfig, src: Mapping[str, torch.Tensor], init: str = "converter",
                 seed: int = 0, on_tensor: Callable[[str], None] | None = None,
                 ) -> dict[str, torch.Tensor]:
    """LLaVA-OV state dict (hub or transformers-5 names) -> VISOR state dict. Pure.

    Inputs are never modified (edited tensors are cloned). ``meta`` inputs give ``meta`` outputs.
    ``on_tensor(name)`` is called once per output tensor (a progress hook).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    hub = to_hub_names(src)
    plan = copied_tensors(cfg)
    _check_names(cfg, hub, plan)
    out: dict[str, torch.Tensor] = {}
    for name, (dst, shape) in plan.items():
        _check_shape(name, hub[name], shape)
        out[dst] = hub[name]
        _notify(on_tensor, dst)
    embed = out[HUB_EMBED]
    gen = torch.Generator().manual_seed(seed)
    sym = dims(cfg)
    for name, (rule, layer) in new_tensors(cfg).items():
        how = rule.init if init == "converter" else rule.random
        out[name] = _new_tensor(cfg, how, _shape(rule.shape, sym), layer, out, embed, gen)
        _notify(on_tensor, name)
    if init == "converter":
        _init_routing_rows(cfg, out)
    return out


def _notify(hook, name: str) -> None:
    if hook is not None:
        hook(name)


def _check_names(cfg: VisorConfig, hub: Mapping[str, torch.Tensor], plan: Mapping) -> None:
    """Every source tensor consumed exactly once; the tied lm_head only as a duplicate."""
    extra = set(hub) - set(plan)
    if cfg.tie_word_embeddings and HUB_LM_HEAD in extra:
        extra.discard(HUB_LM_HEAD)
        _check_tied_duplicate(hub[HUB_LM_HEAD], hub.get(HUB_EMBED))
    missing = set(plan) - set(hub)
    problems = []
    if missing:
        problems.append(f"missing source tensor(s) {_some(missing)}")
    if extra:
        problems.append(f"unexpected source tensor(s) {_some(extra)}")
    if problems:
        raise ConversionError("; ".join(problems))


def _check_tied_duplicate(lm_head: torch.Tensor, embed: torch.Tensor | None) -> None:
    if embed is None or lm_head.is_meta or embed.is_meta:
        return  # the missing embed is reported by the caller; meta has no data to compare
    if lm_head.shape != embed.shape or not torch.equal(lm_head, embed):
        raise ConversionError(f"the config ties word embeddings but the source {HUB_LM_HEAD} "
                              "differs from embed_tokens")


def _some(names: set[str], k: int = 8) -> str:
    s = sorted(names)
    return str(s[:k]) + (f" (+{len(s) - k} more)" if len(s) > k else "")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ConversionError(f"{name}: source shape {tuple(t.shape)} != expected {shape}")


def _new_tensor(cfg: VisorConfig, how: str, shape: tuple[int, ...], layer: int | None,
                out: Mapping[str, torch.Tensor], embed: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
    dtype, device = embed.dtype, embed.device
    if how.startswith("copy:"):
        return out[_TL.format(layer) + how[len("copy:"):]].clone()
    if how in ("zeros", "costliest", "ones"):
        t = (torch.ones if how == "ones" else torch.zeros)(shape, dtype=dtype, device=device)
        if how == "costliest":
            t[costliest_config(cfg)] = ROUTER_PRIOR
        return t
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    noise = torch.randn(shape, generator=gen) * INIT_STD  # fp32 on CPU: same draws everywhere
    if how == "norm":
        noise += 1.0
    elif how != "normal":
        raise ValueError(f"unknown init rule {how!r}")
    return noise.to(device=device, dtype=dtype)


def costliest_config(cfg: VisorConfig) -> int:
    """Index of the costliest configuration: most SA layers, ties to the later (as `plan`)."""
    return max(range(len(cfg.sa_configs)), key=lambda i: (len(cfg.sa_configs[i]), i))


def _init_routing_rows(cfg: VisorConfig, out: dict[str, torch.Tensor]) -> None:
    """The routing token's embedding (and untied lm_head) row <- mean of the regular vocab rows."""
    for name in (HUB_EMBED, HUB_LM_HEAD):
        if name not in out:
            continue
        w = out[name].clone()  # [V, d]; never edit the source tensor
        regular = min(special_tokens(w.shape[0]).values())  # REGULAR_VOCAB for Qwen2's
        w[cfg.routing_token_id] = w[:regular].float().mean(0).to(w.dtype)
        out[name] = w


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------

_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "num_channels")
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")


def check_source_config(src_config: Mapping, preset_cfg: VisorConfig) -> None:
    """Raise `ConversionError` listing every ``field: source X != preset Y`` mismatch."""
    from transformers import LlavaOnevisionConfig

    kind = src_config.get("model_type")
    if kind != "llava_onevision":
        raise ConversionError(f"source model_type is {kind!r}, expected 'llava_onevision'")
    try:  # fills the defaults a hub config.json leaves out
        src = LlavaOnevisionConfig.from_dict(dict(src_config))
    except Exception as e:  # noqa: BLE001 -- any parse failure is a bad source
        raise ConversionError(f"cannot read the source config: {e}".splitlines()[0]) from e
    bad = []
    for sub, fields in (("vision_config", _VISION_FIELDS), ("text_config", _TEXT_FIELDS)):
        for f in fields:
            a, b = _field(getattr(src, sub), f), _field(getattr(preset_cfg, sub), f)
            if a != b:
                bad.append(f"{sub}.{f}: source {a} != preset {b}")
    if bad:
        raise ConversionError("source config does not match the preset: " + "; ".join(bad))


def _field(sub, name: str):
    return _head_dim(sub) if name == "head_dim" else getattr(sub, name, None)


def visor_config_from_source(src_config: Mapping, preset_cfg: VisorConfig) -> VisorConfig:
    """The preset's VISOR fields on top of the source's LLaVA-OV fields (sub-configs, token ids,
    pinpoints, projector, ...), so the converted model keeps every source setting."""
    from transformers import LlavaOnevisionConfig

    d = preset_cfg.to_dict()
    d.update({k: src_config[k] for k in LlavaOnevisionConfig.__annotations__ if k in src_config})
    d["dtype"] = src_config.get("dtype") or src_config.get("torch_dtype") or d.get("dtype")
    d.pop("torch_dtype", None)
    try:
        cfg = VisorConfig.from_dict(d)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"cannot build the VISOR config: {e}".splitlines()[0]) from e
    cfg.architectures = ["VisorForConditionalGeneration"]
    return cfg


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def visor_tokenizer(src_dir: str | os.PathLike, cfg: VisorConfig):
    """The source tokenizer plus the routing token (at ``cfg.routing_token_id``) and VISOR template
    (in the source template's style: `files.template_style`)."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src_dir), local_files_only=True)  # never the hub
    if cfg.routing_token not in tok.get_vocab():
        tok.add_tokens([AddedToken(cfg.routing_token, special=True, normalized=False)],
                       special_tokens=True)
    got = tok.convert_tokens_to_ids(cfg.routing_token)
    if got != cfg.routing_token_id:
        raise ConversionError(
            f"the routing token {cfg.routing_token!r} lands at id {got} in the source tokenizer, "
            f"not at routing_token_id {cfg.routing_token_id} (the source tokenizer has "
            f"{len(tok)} entries; expected {cfg.routing_token_id})")
    # in the source's style (a real LLaVA-OV's is ChatML)
    tok.chat_template = chat_template(cfg.routing_token, template_style(tok.chat_template))
    for k in ("is_local", "local_files_only"):  # load-time kwargs transformers would save
        tok.init_kwargs.pop(k, None)
    return tok


_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                    "video_preprocessor_config.json")


def write_visor_processor(src_dir: Path, dst_dir: Path, cfg: VisorConfig, template: str) -> None:
    """The source's processor files where present (else written), with VISOR's ``template``
    (the converted tokenizer's, so the two cannot disagree)."""
    write_processor_files(dst_dir, cfg, template)
    for name in _PROCESSOR_FILES:
        if not (src_dir / name).exists():
            continue
        data = json.loads((src_dir / name).read_text())
        data.pop("chat_template", None)  # VISOR's template is chat_template.jinja
        (dst_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
            preset: str | VisorConfig = "visor-0.5b", init: str = "converter",
            progress: bool = True) -> Path:
    """Convert a LLaVA-OneVision checkpoint dir into a VISOR checkpoint dir (must be new/empty)."""
    from tqdm.auto import tqdm

    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"destination {dst} exists and is not empty; refusing to overwrite")
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json: not a checkpoint directory")
    preset_cfg = get_preset(preset) if isinstance(preset, str) else preset
    src_config = json.loads((src / "config.json").read_text())
    check_source_config(src_config, preset_cfg)
    cfg = visor_config_from_source(src_config, preset_cfg)
    tok = visor_tokenizer(src, cfg)  # before any weight I/O: fail early
    state = load_state_dict(src)
    with tqdm(total=len(visor_shapes(cfg)), desc="converting", unit="tensor",
              disable=not progress) as bar:
        out = copy_weights(cfg, state, init=init, on_tensor=lambda _: bar.update())
    dst.mkdir(parents=True, exist_ok=True)
    save_state_dict(out, dst)
    cfg.save_pretrained(str(dst))
    tok.save_pretrained(str(dst))
    write_visor_processor(src, dst, cfg, tok.chat_template)
    if (src / "generation_config.json").exists():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    else:
        write_generation_config(dst)
    return dst


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a LLaVA-OneVision checkpoint dir to VISOR")
    p.add_argument("src", help="LLaVA-OneVision dir (llava-hf layout, e.g. "
                               "llava-onevision-qwen2-0.5b-ov-hf)")
    p.add_argument("dst", help="new (or empty) output dir")
    p.add_argument("--preset", default="visor-0.5b", help=f"VISOR preset ({', '.join(PRESETS)})")
    p.set_defaults(func=_cli_convert)


def _cli_convert(args: argparse.Namespace) -> int:
    try:
        out = convert(args.src, args.dst, preset=args.preset)
    except (ValueError, OSError) as e:  # ConversionError, VisorConfigError, unreadable files
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
