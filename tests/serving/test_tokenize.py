"""``/tokenize`` and ``/detokenize`` on a VISOR server: the decoder prompt's tokens, routing token
included (vLLM's encoder-decoder path alone answers ``{"count": 0, "tokens": []}``)."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import pytest

from .conftest import MODEL
from .test_openai_chat import chat, messages


def _post(base: str, path: str, payload: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(payload).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_decoder_tokens_are_the_trainers_prompt_without_image_tokens(tmp_path):
    """The middleware's rendering equals the trainer's (the same text `vllm serve` builds),
    image placeholders removed: what the decoder really sees."""
    from visor_vllm.serving.middleware import decoder_tokens
    from visor_vllm.testing import write_random_tiny_checkpoint
    from visor_vllm.training.data import SampleEncoder

    ckpt = write_random_tiny_checkpoint(tmp_path / "ck")
    msgs = messages(0, question="what colour is the cat")
    got = decoder_tokens({"messages": msgs, "return_token_strs": True},
                         SimpleNamespace(tokenizer=str(ckpt), max_model_len=4096))
    enc = SampleEncoder(ckpt)
    want = [t for t in enc._ids([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is the cat"}]}],
        add_generation_prompt=True) if t != enc.image_token_id]
    assert got["tokens"] == want and got["count"] == len(want)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["routing_token_id"] in got["tokens"] and cfg["image_token_index"] not in got["tokens"]
    assert len(got["token_strs"]) == got["count"]
    with pytest.raises(ValueError, match="not supported"):
        decoder_tokens({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
                       SimpleNamespace(tokenizer=str(ckpt), max_model_len=4096))


@pytest.mark.vllm
@pytest.mark.e2e
def test_tokenize_counts_what_the_receipt_counts_and_detokenize_reads_it_back(server):
    from openai import OpenAI

    base = server[0]
    msgs = messages(3, question="Is there a dog?")
    tok = _post(base, "/tokenize", {"model": MODEL, "messages": msgs})
    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    receipt = chat(client, msgs).model_extra["visor"]
    assert tok["count"] > 0 and tok["count"] == receipt["text_tokens"] == len(tok["tokens"])
    back = _post(base, "/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
    assert "Is there a dog?" in back["prompt"]
    plain = _post(base, "/tokenize", {"model": MODEL, "prompt": "hello world"})
    assert plain["count"] == len(plain["tokens"]) > 0
    bad = urllib.request.Request(base + "/tokenize", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}).encode(),
        {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=60)
    assert e.value.code == 400 and "not supported" in e.value.read().decode()
