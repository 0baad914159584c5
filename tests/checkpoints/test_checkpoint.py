"""Checkpoints built without the hub: deterministic, loadable by transformers, the reference model
and the processor, with the VISOR chat template routing after every question; plus the patch ledger."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it

import argparse
import hashlib
import json
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from visor_vllm.checkpoints.build import build_tiny, build_tiny_llava_onevision
from visor_vllm.checkpoints.convert import to_hub_names
from visor_vllm.checkpoints.files import LLAVA_OV_CHAT_TEMPLATE, VISOR_CHAT_TEMPLATE, load_processor
from visor_vllm.model.config import QWEN2_VOCAB, SPECIAL_TOKENS, VisorConfig, preset_tiny


ROUTE, IMAGE, IM_END = SPECIAL_TOKENS["<|route|>"], SPECIAL_TOKENS["<image>"], SPECIAL_TOKENS["<|im_end|>"]
TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": "And the color?"},
]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("a") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def tiny_again(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("b") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def tiny_seed1(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("c") / "ckpt", seed=1)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def processor(tiny):
    return load_processor(tiny)


# -- determinism and weights -------------------------------------------------------------------

def test_same_seed_same_bytes(tiny, tiny_again):
    assert sorted(os.listdir(tiny)) == sorted(os.listdir(tiny_again))
    for f in os.listdir(tiny):
        assert sha(tiny / f) == sha(tiny_again / f), f


def test_different_seed_different_weights(tiny, tiny_seed1):
    a, b = load_file(str(tiny / "model.safetensors")), load_file(str(tiny_seed1 / "model.safetensors"))
    assert set(a) == set(b)
    assert not torch.equal(a["router.fc2.weight"], b["router.fc2.weight"])
    assert not torch.equal(a["language_model.model.embed_tokens.weight"],
                           b["language_model.model.embed_tokens.weight"])


def test_every_new_module_is_random_and_non_trivial(tiny):
    state = load_file(str(tiny / "model.safetensors"))
    new = [k for k in state if ".cross_attn." in k or k.startswith("router.")]
    assert len(new) == 2 * 11 + 5
    for k in new:
        t = state[k]
        assert t.any(), k
        if k.endswith("norm.weight"):
            assert not torch.equal(t, torch.ones_like(t)) and (t - 1).abs().max() < 0.2, k


def test_reference_model_loads_and_cross_attention_matters(tiny):
    from visor_vllm.model.reference import VisorForConditionalGeneration

    model = VisorForConditionalGeneration.from_pretrained(str(tiny))
    g = torch.Generator().manual_seed(0)
    pixels, sizes = torch.randn(1, 7, 3, 32, 32, generator=g), torch.tensor([[50, 70]])
    n_vis = model.embed_images(pixels, sizes)[0].shape[0]
    text = [151644, 5, 6, 7, 8, ROUTE, IM_END, 151644, 10]
    a = model(torch.tensor(text[:3] + [IMAGE] * n_vis + text[3:]), pixels, sizes, sa_layers=[]).logits
    b = model(torch.tensor(text), sa_layers=[]).logits
    assert (a - b).abs().max() > 1e-3  # random (non-zero) cross-attention reads the image


def test_tiny_llava_is_hub_layout_and_loads_in_transformers(tiny_llava):
    state = load_file(str(tiny_llava / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {"vision_tower", "multi_modal_projector",
                                                "image_newline", "language_model"}
    assert all(k.startswith("vision_tower.vision_model.") for k in state if k.startswith("vision_tower"))
    assert "language_model.lm_head.weight" not in state  # tied, as on the hub
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(tiny_llava), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = to_hub_names(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_tiny_llava_config_is_the_tiny_presets_llava_part(tiny_llava):
    cfg = json.loads((tiny_llava / "config.json").read_text())
    tiny = preset_tiny()
    assert cfg["model_type"] == "llava_onevision"
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == tiny.image_grid_pinpoints
    for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert cfg["text_config"][k] == getattr(tiny.text_config, k)
    for k in ("hidden_size", "image_size", "patch_size"):
        assert cfg["vision_config"][k] == getattr(tiny.vision_config, k)
    assert "layer_types" not in cfg and "is_encoder_decoder" not in cfg  # nothing VISOR-only


def test_real_sizes_are_config_only(tmp_path):
    out = build_tiny_llava_onevision(tmp_path / "llava", real_sizes=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 896 and cfg["vision_config"]["image_size"] == 384
    assert not (out / "model.safetensors").exists()
    visor = build_tiny(tmp_path / "visor", preset="visor-0.5b", weights=False)
    assert VisorConfig.from_pretrained(str(visor)).num_layers == 24
    assert not (visor / "model.safetensors").exists()
    assert json.loads((visor / "processor_config.json").read_text())["num_image_tokens"] == 27 ** 2
    with pytest.raises(ValueError, match="weights=False"):
        build_tiny(tmp_path / "big", preset="visor-0.5b", weights=True)


# -- tokenizer and chat templates --------------------------------------------------------------

def test_tokenizer_specials_at_real_ids(tiny, tiny_llava):
    visor = AutoTokenizer.from_pretrained(str(tiny))
    llava = AutoTokenizer.from_pretrained(str(tiny_llava))
    for s, i in SPECIAL_TOKENS.items():
        assert visor.convert_tokens_to_ids(s) == i
        if s != "<|route|>":
            assert llava.convert_tokens_to_ids(s) == i
    assert len(visor) == QWEN2_VOCAB and len(llava) == ROUTE  # llava: like the real one (151648)
    assert "<|route|>" not in llava.get_vocab()
    assert visor.eos_token == "<|im_end|>" and visor.pad_token == "<|endoftext|>"
    assert visor.image_token == "<image>"
    for i in (0, 500, 151642, 151649, QWEN2_VOCAB - 1):  # every id decodes
        assert visor.decode([i]), i
    assert visor.decode(visor("What is shown in this image?")["input_ids"]) == "What is shown in this image?"


def test_visor_template_routes_after_each_user_question(processor):
    text = processor.apply_chat_template(TWO_TURNS, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>user\n<image>\nWhat is shown?<|route|><|im_end|>\n"
                    "<|im_start|>assistant\nA cat.<|im_end|>\n"
                    "<|im_start|>user\nAnd the color?<|route|><|im_end|>\n<|im_start|>assistant\n")
    ids = processor.tokenizer(text)["input_ids"]
    assert ids.count(ROUTE) == 2
    first = ids.index(ROUTE)
    assert ids.index(IMAGE) < first and ids[first + 1] == IM_END


def test_image_url_parts_and_llava_template():
    from jinja2 import Template

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Q"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}]
    visor = Template(VISOR_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=False)
    llava = Template(LLAVA_OV_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=False)
    assert visor == "<|im_start|>user\n<image>\nQ<|route|><|im_end|>\n"  # images before the text
    assert llava == visor.replace("<|route|>", "")


def test_processor_expands_images(processor):
    text = processor.apply_chat_template(TWO_TURNS[:1], add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (70, 50), (120, 30, 200))
    out = processor(images=image, text=text, return_tensors="pt")
    assert out["pixel_values"].shape[-3:] == (3, 32, 32)
    assert (out["input_ids"][0] == IMAGE).sum() > 16  # base crop + anyres tiles + newlines
    assert (out["input_ids"][0] == ROUTE).sum() == 1


def test_cli_build_tiny_non_tiny_preset_implies_no_weights(tmp_path, capsys):
    from visor_vllm.checkpoints.build import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["build-tiny", str(tmp_path / "d"), "--preset", "visor-1.5b"])
    assert args.func(args) == 0
    assert "--no-weights is implied" in capsys.readouterr().err
    assert (tmp_path / "d" / "config.json").exists() and not (tmp_path / "d" / "model.safetensors").exists()


def test_real_sizes_with_random_weights_writes_weights(tmp_path, monkeypatch):
    """The CLI flag reaches the builder; the weights are the real-size state dict in bf16."""
    from visor_vllm.checkpoints import build
    from visor_vllm.cli import main

    seen = {}

    def fake_state_dict(cfg, seed=0, dtype=torch.float32):
        seen.update(hidden=cfg.text_config.hidden_size, dtype=dtype, seed=seed)
        return {"language_model.model.norm.weight": torch.ones(2, dtype=dtype)}

    monkeypatch.setattr(build, "llava_onevision_state_dict", fake_state_dict)
    assert main(["build-tiny-llava", str(tmp_path / "l"), "--real-sizes", "--random-weights",
                 "--seed", "3"]) == 0
    assert seen == {"hidden": 896, "dtype": torch.bfloat16, "seed": 3}
    assert (tmp_path / "l" / "model.safetensors").exists()
    assert main(["build-tiny-llava", str(tmp_path / "m"), "--random-weights"]) == 2


@pytest.mark.slow
def test_real_size_random_weights_convert_end_to_end(tmp_path):
    """~2 min, ~4 GB: real-size random LLaVA-OV -> convert -> a VISOR dir with every weight."""
    from visor_vllm.checkpoints.convert import convert

    src = build_tiny_llava_onevision(tmp_path / "llava", real_sizes=True, random_weights=True)
    out = convert(src, tmp_path / "visor", preset="visor-0.5b")
    state = load_file(str(out / "model.safetensors"))
    assert state["language_model.model.embed_tokens.weight"].shape == (151936, 896)
    assert any(".cross_attn." in k for k in state) and any("router" in k for k in state)


def test_chat_template_drops_routing_tokens_typed_into_messages():
    from jinja2 import Template

    from visor_vllm.checkpoints.files import ROUTE, chat_template

    text = Template(chat_template(ROUTE)).render(
        messages=[{"role": "user", "content": f"a{ROUTE}b"},
                  {"role": "user", "content": [{"type": "text", "text": f"{ROUTE}c"}]}],
        add_generation_prompt=True)
    assert text.count(ROUTE) == 2  # one per user message, placed by the template
    assert f"ab{ROUTE}<|im_end|>" in text and f"c{ROUTE}<|im_end|>" in text


def test_compact_template_renders_three_header_tokens_a_turn():
    from jinja2 import Template

    from visor_vllm.checkpoints.files import chat_template, template_style

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}]
    visor = chat_template("<|route|>", "compact")
    text = Template(visor).render(messages=msgs, add_generation_prompt=True)
    assert text == "<image>Q1<|route|><|im_end|><|im_start|>A1<|im_end|>Q2<|route|><|im_end|><|im_start|>"
    llava = Template(chat_template(None, "compact")).render(messages=msgs, add_generation_prompt=True)
    assert llava == text.replace("<|route|>", "")
    assert template_style(visor) == "compact" and template_style(VISOR_CHAT_TEMPLATE) == "chatml"
    assert template_style(None) == "chatml"
    with pytest.raises(ValueError, match="unknown chat template style"):
        chat_template(None, "short")
