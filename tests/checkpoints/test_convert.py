"""LLaVA-OV -> VISOR conversion: the weight map covers the real 0.5B model, the pure function
initialises as documented, and every bad source is a named error."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from visor_vllm.checkpoints.build import build_tiny_llava_onevision, llava_onevision_config
from visor_vllm.checkpoints.convert import (COPIED_SHAPES, HUB_EMBED, HUB_LM_HEAD, NEW_WEIGHTS,
                                            REGULAR_VOCAB, WEIGHT_MAP, ConversionError,
                                            check_source_config, convert, copy_weights, hub_name,
                                            to_hub_names, visor_shapes)
from visor_vllm.checkpoints.files import load_state_dict, save_state_dict
from visor_vllm.model.config import VisorConfig, get_preset, preset_tiny


ROUTE_ID = 151648
CA_SUFFIXES = [f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")] + [
    "o_proj.weight", "pos_conv.weight", "pos_conv.bias", "text_norm.weight", "vision_norm.weight"]
ROUTER_KEYS = {"router.norm.weight", "router.fc1.weight", "router.fc1.bias", "router.fc2.weight",
               "router.fc2.bias"}


def meta_source(preset: VisorConfig) -> dict[str, torch.Tensor]:
    """The LLaVA-OV state dict a preset is built on, on the meta device (transformers-5 names)."""
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(llava_onevision_config(preset))
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def converted(tiny_llava, tmp_path_factory):
    return convert(tiny_llava, tmp_path_factory.mktemp("visor") / "ckpt", preset="tiny",
                   progress=False)


@pytest.fixture(scope="module")
def src_state(tiny_llava):
    return load_file(str(tiny_llava / "model.safetensors"))


@pytest.fixture(scope="module")
def out_state(converted):
    return load_file(str(converted / "model.safetensors"))


# -- the weight map ----------------------------------------------------------------------------

def test_weight_map_covers_the_real_0_5b_model_on_meta():
    cfg = get_preset("visor-0.5b")
    raw = meta_source(cfg)                       # model.vision_tower.*, lm_head.weight, ...
    src = to_hub_names(raw)
    assert HUB_LM_HEAD in src                    # tied, but state_dict lists it: consumed as duplicate
    out = copy_weights(cfg, src)
    assert all(t.is_meta for t in out.values())
    cross = {f"language_model.model.layers.{i}.cross_attn.{s}"
             for i in cfg.cross_layers for s in CA_SUFFIXES}
    assert len(cfg.cross_layers) == 8 and len(cross) == 8 * 11
    assert set(out) == (set(src) - {HUB_LM_HEAD}) | cross | ROUTER_KEYS
    for name, shape in visor_shapes(cfg).items():
        assert tuple(out[name].shape) == shape, name
    for name in set(src) - {HUB_LM_HEAD}:
        assert out[name].shape == src[name].shape
    i = cfg.cross_layers[0]
    for p in ("q_proj", "k_proj", "v_proj"):
        ca, sa = (f"language_model.model.layers.{i}.{m}.{p}.weight" for m in ("cross_attn", "self_attn"))
        assert out[ca].shape == src[sa].shape
    assert tuple(out[f"language_model.model.layers.{i}.cross_attn.pos_conv.weight"].shape) == (896, 1, 7)
    assert tuple(out["router.fc1.weight"].shape) == (256, 896)
    assert tuple(out["router.fc2.weight"].shape) == (13, 256)
    # transformers-5 state_dict names are accepted directly
    assert set(copy_weights(cfg, raw)) == set(out)


def test_schema_is_the_reference_models_state_dict():
    from visor_vllm.model.reference import VisorForConditionalGeneration

    cfg = get_preset("visor-0.5b")
    with torch.device("meta"):
        ref = VisorForConditionalGeneration(cfg).state_dict()
    ref.pop(HUB_LM_HEAD)  # tied
    assert {k: tuple(v.shape) for k, v in ref.items()} == visor_shapes(cfg)


def test_tables_are_consistent():
    assert set(WEIGHT_MAP) == set(COPIED_SHAPES)
    assert not set(WEIGHT_MAP.values()) & set(NEW_WEIGHTS)
    for rule in NEW_WEIGHTS.values():
        assert rule.init.split(":")[0] in ("copy", "zeros", "ones", "normal", "costliest")
        assert rule.random in ("normal", "norm")


def test_no_router_without_a_choice():
    cfg = preset_tiny()
    cfg.sa_configs, cfg.router_layer = [[0, 3, 5]], None
    assert not any(k.startswith("router.") for k in visor_shapes(cfg))


@pytest.mark.parametrize("name, hub", [
    ("model.vision_tower.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("vision_tower.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
    ("vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
    ("model.language_model.norm.weight", "language_model.model.norm.weight"),
    ("language_model.model.norm.weight", "language_model.model.norm.weight"),
    ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
    ("model.image_newline", "image_newline"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),
])
def test_source_names_are_normalised(name, hub):
    assert hub_name(name) == hub


def test_two_names_for_one_tensor_is_an_error():
    t = torch.empty(1, device="meta")
    with pytest.raises(ConversionError, match="both map to"):
        to_hub_names({"model.image_newline": t, "image_newline": t})


# -- copy_weights errors (meta tiny sources: no data) ------------------------------------------

def test_missing_and_unexpected_tensors_are_named():
    cfg = preset_tiny()
    src = to_hub_names(meta_source(cfg))
    src.pop("language_model.model.layers.3.mlp.up_proj.weight")
    src["vision_tower.vision_model.head.probe"] = torch.empty(1, device="meta")
    with pytest.raises(ConversionError) as e:
        copy_weights(cfg, src)
    msg = str(e.value)
    assert "missing" in msg and "layers.3.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "head.probe" in msg


@pytest.mark.parametrize("name", [
    HUB_EMBED,
    "language_model.model.layers.1.self_attn.k_proj.weight",
    "language_model.model.layers.0.mlp.down_proj.weight",
    "multi_modal_projector.linear_1.weight",
])
def test_shape_mismatch_is_an_error(name):
    cfg = preset_tiny()
    src = to_hub_names(meta_source(cfg))
    src[name] = torch.empty(*src[name].shape[:-1], src[name].shape[-1] + 1, device="meta")
    with pytest.raises(ConversionError, match=name.replace(".", r"\.") + ": source shape"):
        copy_weights(cfg, src)


def test_tied_lm_head_must_duplicate_embed(src_state):
    src = dict(src_state)
    src[HUB_LM_HEAD] = src[HUB_EMBED].clone()
    assert HUB_LM_HEAD not in copy_weights(preset_tiny(), src)  # an exact duplicate is dropped
    src[HUB_LM_HEAD][0, 0] += 1
    with pytest.raises(ConversionError, match="ties word embeddings"):
        copy_weights(preset_tiny(), src)


def test_copy_weights_does_not_touch_its_input(src_state):
    before = src_state[HUB_EMBED][ROUTE_ID].clone()
    out = copy_weights(preset_tiny(), src_state)
    assert torch.equal(src_state[HUB_EMBED][ROUTE_ID], before)
    assert not torch.equal(out[HUB_EMBED][ROUTE_ID], before)


# -- convert() on the tiny LLaVA-OV ------------------------------------------------------------

def test_every_original_tensor_is_copied_byte_identical(src_state, out_state):
    for name, t in src_state.items():
        if name == HUB_EMBED:
            keep = torch.ones(t.shape[0], dtype=torch.bool)
            keep[ROUTE_ID] = False
            assert torch.equal(out_state[name][keep], t[keep])
        else:
            assert torch.equal(out_state[name], t), name


def test_converter_init(src_state, out_state):
    cfg = preset_tiny()
    mean = src_state[HUB_EMBED][:REGULAR_VOCAB].mean(0)
    torch.testing.assert_close(out_state[HUB_EMBED][ROUTE_ID], mean)
    for i in cfg.cross_layers:
        ca, sa = f"language_model.model.layers.{i}.cross_attn.", f"language_model.model.layers.{i}."
        assert not out_state[ca + "o_proj.weight"].any()
        assert not out_state[ca + "pos_conv.weight"].any() and not out_state[ca + "pos_conv.bias"].any()
        for p in ("q_proj", "k_proj", "v_proj"):
            for w in ("weight", "bias"):
                assert torch.equal(out_state[ca + f"{p}.{w}"], src_state[sa + f"self_attn.{p}.{w}"])
        for n in ("text_norm", "vision_norm"):
            assert torch.equal(out_state[ca + f"{n}.weight"], src_state[sa + "input_layernorm.weight"])
    assert torch.equal(out_state["router.norm.weight"], torch.ones(128))
    assert out_state["router.fc1.weight"].std() == pytest.approx(0.02, rel=0.1)
    assert not out_state["router.fc1.bias"].any() and not out_state["router.fc2.weight"].any()
    assert out_state["router.fc2.bias"].tolist() == [0, 0, 0, 10]  # last = costliest [0, 3, 5]


def test_converted_ca_layers_start_as_text_only_layers(converted):
    """Zero o_proj: with no SA layer, an image changes nothing (text positions are relative)."""
    from visor_vllm.model.reference import VisorForConditionalGeneration

    model = VisorForConditionalGeneration.from_pretrained(str(converted))
    g = torch.Generator().manual_seed(0)
    pixels, sizes = torch.randn(1, 7, 3, 32, 32, generator=g), torch.tensor([[50, 70]])
    n_vis = model.embed_images(pixels, sizes)[0].shape[0]
    text = [151644, 5, 6, 7, 8, ROUTE_ID, 151645, 151644, 10]
    with_image = torch.tensor(text[:3] + [151646] * n_vis + text[3:])
    a = model(with_image, pixels, sizes, sa_layers=[]).logits
    b = model(torch.tensor(text), sa_layers=[]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_converted_config_tokenizer_and_processor(converted):
    cfg = VisorConfig.from_pretrained(str(converted))
    tiny = preset_tiny()
    assert cfg.architectures == ["VisorForConditionalGeneration"]
    for k in ("layer_types", "sa_configs", "router_layer", "routing_token_id", "image_grid_pinpoints"):
        assert getattr(cfg, k) == getattr(tiny, k)
    tok = AutoTokenizer.from_pretrained(str(converted))
    assert tok.convert_tokens_to_ids("<|route|>") == ROUTE_ID
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.endswith("hi<|route|><|im_end|>\n")
    assert tok(text)["input_ids"][-3:-1] == [ROUTE_ID, 151645]
    for f in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "chat_template.jinja", "generation_config.json"):
        assert (converted / f).exists(), f
    assert "<|route|>" in (converted / "chat_template.jinja").read_text()


# -- refusals ----------------------------------------------------------------------------------

def test_mismatched_source_lists_every_field(tiny_llava, tmp_path):
    with pytest.raises(ConversionError) as e:
        convert(tiny_llava, tmp_path / "out", preset="visor-0.5b", progress=False)
    msg = str(e.value)
    for field in ("text_config.hidden_size: source 128 != preset 896",
                  "text_config.num_hidden_layers: source 6 != preset 24",
                  "vision_config.hidden_size: source 64 != preset 1152",
                  "vision_config.image_size: source 32 != preset 384",
                  "vision_config.patch_size: source 8 != preset 14"):
        assert field in msg
    assert not (tmp_path / "out").exists()


def test_source_must_be_llava_onevision(tiny_llava):
    cfg = json.loads((tiny_llava / "config.json").read_text())
    with pytest.raises(ConversionError, match="'llava_onevision'"):
        check_source_config(dict(cfg, model_type="llava"), preset_tiny())


def test_non_empty_destination_is_refused(tiny_llava, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert(tiny_llava, tmp_path, preset="tiny", progress=False)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_routing_token_must_land_at_its_id(tiny_llava, tmp_path):
    cfg = preset_tiny()
    cfg.routing_token_id = 151700
    with pytest.raises(ConversionError, match="lands at id 151648"):
        convert(tiny_llava, tmp_path / "out", preset=cfg, progress=False)


def test_cli_bad_source_is_one_line_exit_2(tmp_path, capsys):
    from visor_vllm.cli import main

    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "config.json" in err


def test_cli_mismatch_is_one_line_exit_2(tiny_llava, tmp_path, capsys):
    from visor_vllm.cli import main

    assert main(["convert", str(tiny_llava), str(tmp_path / "out"), "--preset", "visor-0.5b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_config.hidden_size" in err


# -- files -------------------------------------------------------------------------------------

def test_sharded_save_and_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(5)}  # 16 KiB each
    files = save_state_dict(state, tmp_path, max_shard_bytes=40_000)
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").exists()
    back = load_state_dict(tmp_path)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_conversion_keeps_a_compact_template(tmp_path):
    from visor_vllm.checkpoints.files import template_style

    src = build_tiny_llava_onevision(tmp_path / "llava", seed=0, template="compact")
    assert template_style((src / "chat_template.jinja").read_text()) == "compact"
    dst = convert(src, tmp_path / "visor", preset="tiny", progress=False)
    assert template_style((dst / "chat_template.jinja").read_text()) == "compact"
    tok = AutoTokenizer.from_pretrained(str(dst))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "hi<|route|><|im_end|><|im_start|>"
