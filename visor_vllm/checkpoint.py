"""Checkpoint directories built locally, without any hub access: tokenizer, processor, weights.

What.
* `build_tokenizer` -- a byte-level BPE trained on a small built-in corpus, padded to Qwen2's id
  space, with the Qwen2 / LLaVA-OV special tokens at their real ids (`config.SPECIAL_TOKENS`) and
  a ChatML chat template (LLaVA-OV's, or VISOR's that appends the routing token after each user
  message).
* `write_processor_files` / `load_processor` -- what `LlavaOnevisionProcessor.from_pretrained`
  reads (PIL image processor, hand-written processor_config.json, chat template).
* `build_tiny_llava_onevision` -- a tiny random LLaVA-OneVision in the hub's llava-hf layout (the
  converter's test source), or its real-size 0.5B config without weights.
* `build_tiny` -- a complete VISOR checkpoint: the tiny LLaVA-OV weights run through the
  converter (`visor_vllm.convert.copy_weights`, ``init="random"``), so every module matters.

Why. Tests, the reference model and vLLM smoke runs need real checkpoint *directories* that load
through the same code paths as the real model, on machines with no network.

Footguns.
* Tokenizers. The VISOR tokenizer (``routing_token=True``) has an entry for every id < 151,936
  (unreachable filler tokens), so random-weight models can emit any id and it still decodes. The
  LLaVA-OV one stops at 151,648 entries, exactly like the real llava-hf tokenizer, so that adding
  ``<|route|>`` (the converter does) lands at id 151,648 as it does on the real one; ids above
  decode to nothing, as on the real tokenizer.
* Processor files are written so that `LlavaOnevisionProcessor` loads without torchvision; that
  still needs `visor_vllm.patches` (see `load_processor`).
* Determinism: same arguments -> byte-identical files (seeded weights, seeded BPE training on a
  fixed corpus, JSON with sorted keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from visor_vllm.config import QWEN2_VOCAB, SPECIAL_TOKENS, VisorConfig, get_preset

ROUTE = "<|route|>"
IMAGE, VIDEO = "<image>", "<video>"
_LLAVA_SPECIALS = {k: v for k, v in SPECIAL_TOKENS.items() if k != ROUTE}
_FILLER = "<filler{}>"            # unreachable: no BPE merge produces it
_SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP normalisation, as in the llava-hf processors

# Small fixed English corpus (image-QA flavoured); repeated so BPE learns multi-char merges.
_CORPUS = (
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a cat sitting on a red sofa next to a window.",
    "A man is riding a bicycle down the street on a sunny day.",
    "How many people are in the photo? There are three people.",
    "You are a helpful assistant. Answer the question about the image.",
    "What color is the car parked in front of the house? It is blue.",
    "Two dogs are playing with a ball in the green park.",
    "Is there any text written on the sign? Yes, it says stop.",
    "The chart shows the number of visitors for each month of the year.",
    "Which animal is larger, the elephant or the mouse? The elephant.",
    "A woman holds an umbrella while walking in the rain at night.",
    "Read the document and tell me the total amount on the invoice.",
    "The table lists the names, ages and cities of five students.",
    "There is a small boat on the lake near the mountains.",
    "What time does the clock on the wall show? Ten past four.",
    "Answer with a single word or phrase. Please be brief.",
    "The kitchen has a white fridge, a wooden table and four chairs.",
    "Where is the bird sitting? On the branch of a tall tree.",
    "Count the apples in the basket and give the final answer.",
    "The screenshot shows a web page with a search box and buttons.",
    "Children are building a sandcastle on the beach by the sea.",
    "What is the title of the book on the desk? Modern Physics.",
    "The diagram explains how water moves through the plant.",
    "Look at the left side of the picture; what do you see there?",
)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat templates
# ---------------------------------------------------------------------------------------------

def _each_part(test: str, render: str) -> str:
    """Jinja: ``render`` once per content part whose type passes ``test``."""
    return ("{% for part in message['content'] %}{% if part['type'] " + test + " %}" + render
            + "{% endif %}{% endfor %}")


def chat_template(routing_token: str | None = None) -> str:
    """ChatML template; a message's images render as ``<image>\\n`` before its text.

    With ``routing_token`` (VISOR), each *user* message's text is followed by that token and
    then ``<|im_end|>`` (paper Sec. 4.3: "a special routing token is appended after the
    question"), one per user message. Content may be a string or a list of ``text`` / ``image``
    / ``image_url`` (/ ``video``) parts. No default system prompt (as llava-hf's template).
    """
    route = ("{% if message['role'] == 'user' %}{{ '" + routing_token + "' }}{% endif %}"
             if routing_token else "")
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        + _each_part("in ['image', 'image_url']", "{{ '<image>\\n' }}")
        + _each_part("== 'video'", "{{ '<video>\\n' }}")
        + _each_part("== 'text'", "{{ part['text'] }}")
        + "{% endif %}" + route + "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


LLAVA_OV_CHAT_TEMPLATE = chat_template()
VISOR_CHAT_TEMPLATE = chat_template(ROUTE)


def _train_bpe():
    """Byte-level BPE (~1000 entries) trained on `_CORPUS`; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_CORPUS) * 20, trainer)
    return tok


def _tokenizer_object(routing_token: bool):
    """The `tokenizers.Tokenizer`: BPE + fillers + specials at their real ids."""
    from tokenizers import Tokenizer

    specials = SPECIAL_TOKENS if routing_token else _LLAVA_SPECIALS
    # with the routing token: every id < QWEN2_VOCAB has an entry; without: stop right after
    # the specials, like the real LLaVA-OV tokenizer (see module footguns)
    size = QWEN2_VOCAB if routing_token else max(specials.values()) + 1
    data = json.loads(_train_bpe().to_str())
    vocab = data["model"]["vocab"]  # token -> id, ids 0..n-1
    taken = set(specials.values())
    for i in range(len(vocab), size):
        if i not in taken:
            vocab[_FILLER.format(i)] = i
    vocab.update(specials)
    data["model"]["ignore_merges"] = False  # whole-word vocab lookups would reach the fillers
    data["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(specials.items(), key=lambda kv: kv[1])
    ]
    tok = Tokenizer.from_str(json.dumps(data))
    for s, i in specials.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    return tok


def build_tokenizer(out_dir: str | os.PathLike, routing_token: bool = True):
    """Write a `PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json, chat template).

    ``routing_token=True``: VISOR -- ``<|route|>`` at 151648 and the VISOR chat template.
    ``routing_token=False``: LLaVA-OneVision -- no routing token, LLaVA-OV chat template.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(routing_token),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO},
    )
    tok.chat_template = VISOR_CHAT_TEMPLATE if routing_token else LLAVA_OV_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


# ---------------------------------------------------------------------------------------------
# Processor files
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_processor_files(out_dir: str | os.PathLike, cfg, template: str) -> None:
    """preprocessor_config.json, processor_config.json, video_preprocessor_config.json, chat template.

    ``cfg``: a `LlavaOnevisionConfig` (or `VisorConfig`): crop size, pinpoints, patch size.
    """
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    out = Path(out_dir)
    vc = cfg.vision_config
    s = vc.image_size
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints,
        do_pad=True, image_mean=_SIGLIP_MEAN_STD, image_std=_SIGLIP_MEAN_STD)
    pre = ip.to_dict()
    # the PIL backend explicitly: identical pixels with or without torchvision
    pre["image_processor_type"] = "LlavaOnevisionImageProcessorPil"
    _write_json(out / "preprocessor_config.json", pre)
    # By hand: ProcessorMixin.save_pretrained needs a video processor object (torchvision).
    _write_json(out / "processor_config.json", {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (s // vc.patch_size) ** 2,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_aspect_ratio": cfg.vision_aspect_ratio,
        "image_token": IMAGE,
        "video_token": VIDEO,
    })
    # Names the real class (works where torchvision exists); without torchvision the
    # video-processor patch bypasses it. Videos are unsupported either way.
    _write_json(out / "video_preprocessor_config.json", {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": s, "width": s}})
    (out / "chat_template.jinja").write_text(template)


def load_processor(path: str | os.PathLike):
    """`LlavaOnevisionProcessor` for a checkpoint dir; works without torchvision (see patches)."""
    from transformers import LlavaOnevisionProcessor

    from visor_vllm import register
    from visor_vllm.patches import apply_transformers_patches

    register()  # AutoConfig must know model_type "visor" (AutoTokenizer reads config.json)
    apply_transformers_patches()
    return LlavaOnevisionProcessor.from_pretrained(str(path), local_files_only=True)


def write_generation_config(out_dir: str | os.PathLike) -> None:
    """ChatML stops at ``<|im_end|>``; ``<|endoftext|>`` also ends (Qwen2 convention)."""
    _write_json(Path(out_dir) / "generation_config.json", {
        "bos_token_id": SPECIAL_TOKENS["<|endoftext|>"],
        "eos_token_id": [SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]],
        "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"],
    })


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

    from visor_vllm.convert import HUB_LM_HEAD, to_hub_names

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
                               dtype: torch.dtype = torch.float32, real_sizes: bool = False) -> Path:
    """A LLaVA-OneVision checkpoint dir in the llava-hf layout (the converter's source).

    Tiny: `preset_tiny`'s LLaVA-OV part with random weights. ``real_sizes=True``: LLaVA-OV-0.5B
    dims (`preset_0_5b`'s sub-configs), config/tokenizer/processor only -- for vLLM's
    ``--load-format dummy``.
    """
    from visor_vllm.convert import save_state_dict

    out = _prepare_dir(out_dir)
    cfg = llava_onevision_config(get_preset("visor-0.5b" if real_sizes else "tiny"))
    cfg.dtype = "bfloat16" if real_sizes else str(dtype).removeprefix("torch.")
    cfg.save_pretrained(str(out))
    build_tokenizer(out, routing_token=False)
    write_processor_files(out, cfg, LLAVA_OV_CHAT_TEMPLATE)
    write_generation_config(out)
    if not real_sizes:
        save_state_dict(llava_onevision_state_dict(cfg, seed, dtype), out)
    return out


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny",
               weights: bool = True) -> Path:
    """A complete VISOR checkpoint dir; same seed -> byte-identical model.safetensors.

    Weights: the tiny LLaVA-OV state dict (same seed) through `convert.copy_weights` with
    ``init="random"``, so every new module (cross-attention, norms, conv, router) is non-zero.
    Presets other than ``tiny`` are written without weights (``weights=False``; use vLLM's
    ``--load-format dummy``).
    """
    from visor_vllm.convert import copy_weights, save_state_dict

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
    q.set_defaults(func=_cli_build_tiny_llava)


def _cli_build_tiny(args: argparse.Namespace) -> int:
    weights = not args.no_weights
    if weights and args.preset != "tiny":
        print(f"note: preset {args.preset} is real-sized; writing it without weights "
              "(--no-weights is implied; load with --load-format dummy)", file=sys.stderr)
        weights = False
    return _run(lambda: build_tiny(args.dir, seed=args.seed, preset=args.preset, weights=weights))


def _cli_build_tiny_llava(args: argparse.Namespace) -> int:
    return _run(lambda: build_tiny_llava_onevision(args.dir, seed=args.seed,
                                                   real_sizes=args.real_sizes))


def _run(build) -> int:
    try:
        out = build()
    except (OSError, ValueError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0
