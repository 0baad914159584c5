"""Tiny (or weightless real-size) checkpoints built locally: the test and smoke-run sources.

What.
* `build_tiny_llava_onevision` -- a tiny random LLaVA-OneVision in the hub's llava-hf layout (the
  converter's test source), or its real-size 0.5B config without weights.
* `build_tiny` -- a complete VISOR checkpoint: the tiny LLaVA-OV weights run through the
  converter (`visor_vllm.checkpoints.convert.copy_weights`, ``init="random"``), so every module
  matters.
* the ``build-tiny`` / ``build-tiny-llava`` sub-commands.

Why. Tests, the reference model and vLLM smoke runs need real checkpoint *directories* that load
through the same code paths as the real model, on machines with no network.

Footguns.
* Determinism: same arguments -> byte-identical model.safetensors (weights are transformers'
  init under ``torch.manual_seed(seed)``).
* Real-size presets are written without weights (vLLM's ``--load-format dummy``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from visor_vllm.checkpoints.convert import HUB_LM_HEAD, copy_weights, to_hub_names
from visor_vllm.checkpoints.files import (VISOR_CHAT_TEMPLATE, build_tokenizer, chat_template,
                                          save_state_dict, write_generation_config,
                                          write_processor_files)
from visor_vllm.model.config import VisorConfig, get_preset

# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def llava_onevision_config(preset: VisorConfig):
    """The `LlavaOnevisionConfig` a VISOR preset is built on: its LLaVA-OV fields, nothing else.

    Taken field by field from the preset (sub-configs, token ids, pinpoints, projector, ...),
    so the tiny LLaVA-OV source and the tiny VISOR preset can never drift apart.
    """
    from transformers import LlavaOnevisionConfig

    fields = {k: getattr(preset, k) for k in LlavaOnevisionConfig.__annotations__}
    fields["vision_config"] = preset.vision_config.to_dict()
    fields["text_config"] = preset.text_config.to_dict()
    cfg = LlavaOnevisionConfig(**fields)
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return cfg


def llava_onevision_state_dict(cfg, seed: int = 0,
                               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random LLaVA-OV weights (transformers' init under ``torch.manual_seed(seed)``), hub names.

    The tied ``lm_head`` is left out, as in the hub checkpoints.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).to(dtype)
    state = to_hub_names(model.state_dict())
    if cfg.tie_word_embeddings:
        state.pop(HUB_LM_HEAD)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _prepare_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_tiny_llava_onevision(out_dir: str | os.PathLike, seed: int = 0,
                               dtype: torch.dtype = torch.float32, real_sizes: bool = False,
                               preset: str | None = None,
                               extra_corpus: tuple[str, ...] = (),
                               random_weights: bool = False, template: str = "chatml") -> Path:
    """A LLaVA-OneVision checkpoint dir in the llava-hf layout (the converter's source).

    Tiny: `preset_tiny`'s LLaVA-OV part with random weights (``preset`` picks another small
    preset, e.g. ``synthetic``). ``real_sizes=True``: LLaVA-OV-0.5B dims (`preset_0_5b`'s
    sub-configs), config/tokenizer/processor only -- for vLLM's ``--load-format dummy`` -- or,
    with ``random_weights=True``, also random bf16 weights (about 1.8 GB, a minute or two), so
    ``visor-vllm convert`` and ``vllm serve`` of the converted model can be walked end to end
    offline. ``extra_corpus``: more BPE training text (`files.build_tokenizer`). ``template``:
    the chat template's style, ``"chatml"`` (LLaVA-OV's) or ``"compact"`` (`files.chat_template`).
    """
    out = _prepare_dir(out_dir)
    cfg = llava_onevision_config(get_preset("visor-0.5b" if real_sizes else preset or "tiny"))
    cfg.dtype = "bfloat16" if real_sizes else str(dtype).removeprefix("torch.")
    cfg.save_pretrained(str(out))
    vocab = cfg.text_config.vocab_size
    build_tokenizer(out, routing_token=False, extra_corpus=extra_corpus, vocab_size=vocab,
                    template=template)
    write_processor_files(out, cfg, chat_template(None, template))
    write_generation_config(out, vocab)
    if not real_sizes:
        save_state_dict(llava_onevision_state_dict(cfg, seed, dtype), out)
    elif random_weights:
        save_state_dict(llava_onevision_state_dict(cfg, seed, torch.bfloat16), out)
    return out


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny",
               weights: bool = True) -> Path:
    """A complete VISOR checkpoint dir; same seed -> byte-identical model.safetensors.

    Weights: the tiny LLaVA-OV state dict (same seed) through `convert.copy_weights` with
    ``init="random"``, so every new module (cross-attention, norms, conv, router) is non-zero.
    Presets other than ``tiny`` are written without weights (``weights=False``; use vLLM's
    ``--load-format dummy``).
    """
    cfg = get_preset(preset)
    if weights and preset != "tiny":
        raise ValueError(f"preset {preset!r} is real-sized: build it with weights=False "
                         "(random weights only exist for 'tiny')")
    out = _prepare_dir(out_dir)
    cfg.dtype = "float32" if weights else "bfloat16"
    cfg.save_pretrained(str(out))
    build_tokenizer(out, routing_token=True)
    write_processor_files(out, cfg, VISOR_CHAT_TEMPLATE)
    write_generation_config(out)
    if weights:
        src = llava_onevision_state_dict(llava_onevision_config(cfg), seed, torch.float32)
        save_state_dict(copy_weights(cfg, src, init="random", seed=seed), out)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-tiny", help="write a VISOR checkpoint dir (no hub access)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "visor-0.5b", "visor-1.5b"],
                   help="non-tiny presets imply --no-weights (real sizes: --load-format dummy)")
    p.add_argument("--no-weights", action="store_true",
                   help="config, tokenizer and processor only")
    p.set_defaults(func=_cli_build_tiny)
    q = subparsers.add_parser("build-tiny-llava",
                              help="write a tiny LLaVA-OneVision dir (llava-hf layout)")
    q.add_argument("dir")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--real-sizes", action="store_true",
                   help="LLaVA-OV-0.5B dims, no weights (for --load-format dummy)")
    q.add_argument("--random-weights", action="store_true",
                   help="with --real-sizes: also write random bf16 weights (~1.8 GB), so convert "
                        "and vllm serve can be tried at real size offline")
    q.set_defaults(func=_cli_build_tiny_llava)


def _cli_build_tiny(args: argparse.Namespace) -> int:
    weights = not args.no_weights
    if weights and args.preset != "tiny":
        print(f"note: preset {args.preset} is real-sized; writing it without weights "
              "(--no-weights is implied; load with --load-format dummy)", file=sys.stderr)
        weights = False
    return _run(lambda: build_tiny(args.dir, seed=args.seed, preset=args.preset, weights=weights))


def _cli_build_tiny_llava(args: argparse.Namespace) -> int:
    if args.random_weights and not args.real_sizes:
        print("error: --random-weights goes with --real-sizes (tiny dirs always have weights)",
              file=sys.stderr)
        return 2
    return _run(lambda: build_tiny_llava_onevision(args.dir, seed=args.seed,
                                                   real_sizes=args.real_sizes,
                                                   random_weights=args.random_weights))


def _run(build) -> int:
    try:
        out = build()
    except (OSError, ValueError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0
