"""The VISOR checkpoint directory format, written and read without any hub access.

What.
* `build_tokenizer` -- a byte-level BPE trained on a small built-in corpus, padded to Qwen2's id
  space, with the Qwen2 / LLaVA-OV special tokens at their real ids (`config.special_tokens`; compact vocabularies keep them in their last rows) and
  a ChatML chat template (LLaVA-OV's, or VISOR's that appends the routing token after each user
  message: `chat_template`), or a compact one (3 header tokens a turn instead of 10) that the
  synthetic recipe can use to buy questions per second (`template_style` tells them apart).
* `write_processor_files` / `load_processor` -- what `LlavaOnevisionProcessor.from_pretrained`
  reads (PIL image processor, hand-written processor_config.json, chat template).
* `write_generation_config`, `save_state_dict` / `load_state_dict` (one file or shards + index),
  `write_checkpoint` (weights + config + another dir's tokenizer and processor files, atomically).

Why. Everything that writes a checkpoint (the tiny builders in `visor_vllm.checkpoints.build`,
the converter, the trainer) writes these same files, so every directory loads through the same
code paths as the real model (`vllm serve`, the reference model, transformers' processor).
This module imports no other part of `visor_vllm.checkpoints`: the builders and the converter
import it, never the other way round.

Footguns.
* Tokenizers. The VISOR tokenizer (``routing_token=True``) has an entry for every id < 151,936
  (unreachable filler tokens), so random-weight models can emit any id and it still decodes. The
  LLaVA-OV one stops at 151,648 entries, exactly like the real llava-hf tokenizer, so that adding
  ``<|route|>`` (the converter does) lands at id 151,648 as it does on the real one; ids above
  decode to nothing, as on the real tokenizer.
* Processor files are written so that `LlavaOnevisionProcessor` loads without torchvision; that
  still needs `visor_vllm.patches` (see `load_processor`).
* Determinism: same arguments -> byte-identical files (seeded BPE training on a fixed corpus,
  JSON with sorted keys, tensors saved in name order).
"""


from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from visor_vllm.model.config import QWEN2_VOCAB, special_tokens
from visor_vllm.model.packing import crop_tokens

ROUTE = "<|route|>"
IMAGE, VIDEO = "<image>", "<video>"
MAX_SHARD_BYTES = 2 * 1024 ** 3
_FILLER = "<filler{}>"            # unreachable: no BPE merge produces it
_SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP normalisation, as in the llava-hf processors

class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read: missing or inconsistent weight files."""


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


COMPACT = "{#- visor:compact -#}"  # marks the compact template (`template_style` reads it)


def chat_template(routing_token: str | None = None, style: str = "chatml") -> str:
    """A chat template; a message's images render as ``<image>\\n`` (ChatML) before its text.

    With ``routing_token`` (VISOR), each *user* message's text is followed by that token and
    then ``<|im_end|>`` (paper Sec. 4.3: "a special routing token is appended after the
    question"), one per user message. Content may be a string or a list of ``text`` / ``image``
    / ``image_url`` (/ ``video``) parts. No default system prompt (as llava-hf's template).

    ``style="chatml"``: LLaVA-OV's ChatML (``<|im_start|>user\\n ... <|im_end|>\\n``, 10 tokens
    of headers a turn). ``style="compact"``: the synthetic recipe's token-lean format, 3 tokens
    a turn: ``question[<|route|>]<|im_end|><|im_start|>answer<|im_end|>``, images as a bare
    ``<image>``, generation prompt ``<|im_start|>``. Same special tokens, same stop token; the
    converter keeps the source's style (`template_style`).
    """
    if style not in ("chatml", "compact"):
        raise ValueError(f"unknown chat template style {style!r}: 'chatml' or 'compact'")
    compact = style == "compact"
    route = ("{% if message['role'] == 'user' %}{{ '" + routing_token + "' }}{% endif %}"
             if routing_token else "")
    # a routing token typed into a message would vote too: only the template's own may
    scrub = f" | replace('{routing_token}', '')" if routing_token else ""
    head = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>' }}{% endif %}" if compact
            else "{{ '<|im_start|>' + message['role'] + '\\n' }}")
    nl = "" if compact else "\\n"
    return (
        (COMPACT if compact else "")
        + "{% for message in messages %}" + head
        + "{% if message['content'] is string %}{{ message['content']" + scrub + " }}{% else %}"
        + _each_part("in ['image', 'image_url']", "{{ '<image>" + nl + "' }}")
        + _each_part("== 'video'", "{{ '<video>" + nl + "' }}")
        + _each_part("== 'text'", "{{ part['text']" + scrub + " }}")
        + "{% endif %}" + route + "{{ '<|im_end|>" + nl + "' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + ("<|im_start|>" if compact
                                                else "<|im_start|>assistant\\n") + "' }}{% endif %}"
    )


def template_style(template: str | None) -> str:
    """``"compact"`` for a template `chat_template` wrote in that style, else ``"chatml"``."""
    return "compact" if template and template.startswith(COMPACT) else "chatml"


LLAVA_OV_CHAT_TEMPLATE = chat_template()
VISOR_CHAT_TEMPLATE = chat_template(ROUTE)


def _train_bpe(extra_corpus: tuple[str, ...] = (), vocab_size: int = 1000):
    """Byte-level BPE (<= ``vocab_size`` entries) on `_CORPUS` (+ ``extra_corpus``); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((list(_CORPUS) + list(extra_corpus)) * 20, trainer)
    return tok


def _tokenizer_object(routing_token: bool, extra_corpus: tuple[str, ...] = (),
                      vocab_size: int = QWEN2_VOCAB):
    """The `tokenizers.Tokenizer`: BPE + fillers + specials at their ids (`special_tokens`)."""
    from tokenizers import Tokenizer

    specials = special_tokens(vocab_size)
    if not routing_token:
        specials.pop(ROUTE)
    # with the routing token: every id < vocab_size has an entry; without: stop right after
    # the specials, like the real LLaVA-OV tokenizer (see module footguns)
    size = vocab_size if routing_token else max(specials.values()) + 1
    data = json.loads(_train_bpe(extra_corpus, min(1000, min(specials.values()))).to_str())
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


def build_tokenizer(out_dir: str | os.PathLike, routing_token: bool = True,
                    extra_corpus: tuple[str, ...] = (), vocab_size: int = QWEN2_VOCAB,
                    template: str = "chatml"):
    """Write a `PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json, chat template).

    ``routing_token=True``: VISOR -- ``<|route|>`` at 151648 and the VISOR chat template.
    ``routing_token=False``: LLaVA-OneVision -- no routing token, LLaVA-OV chat template.
    ``extra_corpus``: more training text for the BPE, so that a task's words become single
    tokens (the synthetic task's questions would otherwise cost ~3 tokens a word).
    ``vocab_size``: Qwen2's (real special-token ids) or a compact one (`special_tokens`).
    ``template``: the chat template's style (`chat_template`).
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(routing_token, tuple(extra_corpus), vocab_size),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO},
    )
    tok.chat_template = chat_template(ROUTE if routing_token else None, template)
    tok.save_pretrained(str(out_dir))
    return tok


# ---------------------------------------------------------------------------------------------
# Processor files
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_processor_files(out_dir: str | os.PathLike, cfg, template: str) -> None:
    """preprocessor_config.json, processor_config.json, video_preprocessor_config.json, chat template.

    ``cfg``: a `LlavaOnevisionConfig` (or `VisorConfig`): crop size, pinpoints, patch size
    (and a VISOR-TR packing ratio, which the processor's token counts follow).
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
        # a TR checkpoint's packed count: transformers' processor derives every count from it
        "num_image_tokens": crop_tokens(cfg),
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

    from visor_vllm import register_transformers

    # AutoConfig must know model_type "visor" (AutoTokenizer reads config.json), and the
    # transformers patches make the processor load without torchvision
    register_transformers()
    return LlavaOnevisionProcessor.from_pretrained(str(path), local_files_only=True)


def write_generation_config(out_dir: str | os.PathLike, vocab_size: int = QWEN2_VOCAB) -> None:
    """ChatML stops at ``<|im_end|>``; ``<|endoftext|>`` also ends (Qwen2 convention)."""
    sp = special_tokens(vocab_size)
    _write_json(Path(out_dir) / "generation_config.json", {
        "bos_token_id": sp["<|endoftext|>"],
        "eos_token_id": [sp["<|im_end|>"], sp["<|endoftext|>"]],
        "pad_token_id": sp["<|endoftext|>"],
    })


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------

def load_state_dict(src_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards of model.safetensors.index.json."""
    from safetensors.torch import load_file

    src = Path(src_dir)
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{src} has no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(src / f))
        dup = set(part) & set(state)
        if dup:
            raise CheckpointError(f"tensor(s) {', '.join(sorted(dup)[:8])} appear in more than one shard")
        state.update(part)
    return state


def save_state_dict(state: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write model.safetensors, or ~``max_shard_bytes`` shards plus the index; returns file names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {k: state[k].contiguous() for k in sorted(state)}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    groups: list[list[str]] = [[]]
    for k in tensors:  # greedy in name order: one shard holds a run of names
        if groups[-1] and sum(sizes[n] for n in groups[-1]) + sizes[k] > max_shard_bytes:
            groups.append([])
        groups[-1].append(k)
    if len(groups) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_file({k: tensors[k] for k in group}, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def write_checkpoint(out_dir: str | os.PathLike, config, state: dict[str, torch.Tensor],
                     like: str | os.PathLike) -> Path:
    """A checkpoint dir: ``state`` + ``config`` with ``like``'s tokenizer/processor/template files.

    Written to ``<out>.tmp`` and renamed, so a crash never leaves a half-written ``out``
    (an existing ``out`` is replaced).
    """
    import shutil

    out, like = Path(out_dir), Path(like)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in like.iterdir():  # tokenizer, processor, chat template, generation config
        if f.is_file() and not (f.name.startswith("model") and ".safetensors" in f.name) \
                and f.name != "config.json":
            shutil.copyfile(f, tmp / f.name)
    save_state_dict(state, tmp)
    config.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
