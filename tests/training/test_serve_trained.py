"""A checkpoint the trainer wrote serves under `vllm serve` and answers the `openai` client."""

import base64
import io

import pytest
from PIL import Image

from visor_vllm.training.trainer import run

from ..serving.conftest import serving
from .conftest import tiny_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def test_trained_checkpoint_serves(tmp_path_factory, visor_ckpt_synth, synth_data):
    import openai

    out = run(tiny_recipe(visor_ckpt_synth, synth_data, tmp_path_factory.mktemp("run"),
                          [{"kind": "stage2", "steps": 2, "lr": 1e-3, "batch_size": 4,
                            "configs": "viable"}], save_every=100), progress=False)
    buf = io.BytesIO()
    Image.open(synth_data / "images" / "test-000000.png").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with serving(tmp_path_factory, ckpt=out) as (base, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        for budget, layers in (("min", [1]), ("max", [1, 3, 5, 7])):
            reply = client.chat.completions.create(
                model="visor-tiny", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "colour at 1 2"}]}],
                extra_body={"vllm_xargs": {"visor_budget": budget}})
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.model_extra["visor"]["sa_layers"] == layers
            assert reply.model_extra["visor"]["image_tokens"] == 36


def test_compact_template_checkpoint_serves_its_own_prompt(tmp_path_factory, synth_data):
    """A checkpoint with the compact chat template: vLLM renders it, the receipt counts it."""
    import openai
    from transformers import AutoTokenizer

    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.training.synthetic import corpus

    tmp = tmp_path_factory.mktemp("compact")
    src = build_tiny_llava_onevision(tmp / "llava", preset="synthetic", extra_corpus=corpus(),
                                     template="compact")
    ckpt = convert(src, tmp / "visor", preset="synthetic", init="random", progress=False)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompt = tok.apply_chat_template([{"role": "user", "content": "colour at 1 2"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "colour at 1 2<|route|><|im_end|><|im_start|>"
    want = len(tok(prompt, add_special_tokens=False)["input_ids"])
    buf = io.BytesIO()
    Image.open(synth_data / "images" / "test-000000.png").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with serving(tmp_path_factory, ckpt=ckpt) as (base, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        reply = client.chat.completions.create(
            model="visor-tiny", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "colour at 1 2"}]}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.model_extra["visor"]["image_tokens"] == 36
        assert reply.model_extra["visor"]["text_tokens"] == want
