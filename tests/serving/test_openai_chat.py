"""`vllm serve` of a tiny VISOR checkpoint answers OpenAI chat.completions with images."""

from __future__ import annotations

import base64
import io
import urllib.request

import numpy as np
import pytest

from .conftest import MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def data_url(seed: int, h: int = 50, w: int = 70) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(*seeds: int, question: str = "What is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": data_url(s)}} for s in seeds]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, msgs, **kw):
    return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                          temperature=0, **kw)


def test_chat_with_image_streaming_equals_non_streaming(client):
    full = chat(client, messages(0))
    assert full.choices[0].message.content
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens == 8
    stream = chat(client, messages(0), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_budget_override_and_multi_image(client):
    a = chat(client, messages(1), extra_body={"vllm_xargs": {"visor_sa_layers": [1]}})
    b = chat(client, messages(1), extra_body={"vllm_xargs": {"visor_sa_layers": [1, 4, 6]}})
    assert a.choices[0].message.content and b.choices[0].message.content
    two = chat(client, messages(2, 3), extra_body={"vllm_xargs": {"visor_budget": "max"}})
    assert two.choices[0].message.content


@pytest.mark.parametrize("xargs", [{"visor_budget": "lots"}, {"visor_sa_layers": [2]},
                                   {"visor_colour": "red"}])
def test_bad_budget_is_http_400_and_server_stays_healthy(client, server, xargs):
    import openai

    with pytest.raises(openai.BadRequestError, match="visor"):
        chat(client, messages(0), extra_body={"vllm_xargs": xargs})
    with urllib.request.urlopen(server[0] + "/health", timeout=5) as r:
        assert r.status == 200
