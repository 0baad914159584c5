"""Each budget form changes the configuration that ran, as the client sees it (the ``visor``
receipt in the response), and ``/metrics`` carries ``visor:*`` series consistent with the FLOP
model and monotone across requests."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from .conftest import MODEL
from .test_openai_chat import chat, messages

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(server, settle_s: float = 10.0) -> dict[str, float]:
    """The ``visor:*`` series once they stop moving (two reads 0.1 s apart agree).

    A request's decode FLOPs reach the stats file when its row leaves the batch, in the engine
    step after its last token (`visor_vllm.engine.bridge.RowState.flush`): no host read in a
    steady decode step. So a read right after a response may precede that step by a moment.
    """
    def read():
        with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(visor:[^\s{]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    deadline, last = time.monotonic() + settle_s, read()
    while True:
        time.sleep(0.1)
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def visor(reply) -> dict:
    return reply.model_extra["visor"]


def max_budget_replies(base: str, n: int = 8) -> tuple[list, float]:
    """``n`` image requests on budget ``max`` to the server at ``base``: the replies and the sum
    of their receipts' prefill FLOPs (what ``visor:llm_flops_total{phase="prefill"}`` must show)."""
    from openai import OpenAI

    from .test_openai_chat import chat, messages

    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=180)
    replies = [chat(client, messages(i), extra_body={"vllm_xargs": {"visor_budget": "max"}})
               for i in range(n)]
    return replies, sum(visor(r)["visor_prefill_flops"] for r in replies)


def test_every_budget_form_changes_the_configuration_that_ran(client):
    from visor_vllm.model.config import preset_tiny

    cfg = preset_tiny()
    capable = [i + 1 for i in cfg.sa_capable_layers]
    runs = {name: visor(chat(client, messages(7), extra_body={"vllm_xargs": xargs}))
            for name, xargs in {"min": {"visor_budget": "min"}, "max": {"visor_budget": "max"},
                                "cap0": {"visor_budget": 0}, "explicit": {"visor_sa_layers": capable},
                                "flops": {"visor_max_flops": 0.01}, "auto": {}}.items()}
    cheapest = min(cfg.sa_configs, key=len)
    costliest = max(cfg.sa_configs, key=len)
    assert runs["min"]["sa_layers"] == [i + 1 for i in cheapest]
    assert runs["max"]["sa_layers"] == [i + 1 for i in costliest]
    assert runs["cap0"]["sa_layers"] == [i + 1 for i in cfg.always_on_sa_layers]
    assert runs["explicit"]["sa_layers"] == capable
    assert runs["flops"]["sa_layers"] == [i + 1 for i in cheapest]
    assert runs["flops"]["flops_cap_met"] is False  # 1% of dense is out of reach: reported
    assert runs["auto"]["budget_source"] == "router" and runs["min"]["budget_source"] == "override"
    assert runs["auto"]["sa_layers"] in [[i + 1 for i in c] for c in cfg.sa_configs]
    assert runs["max"]["visor_flops"] > runs["min"]["visor_flops"]
    for v in runs.values():
        assert v["dense_flops"] > v["visor_flops"] > 0 and v["output_tokens"] == 8


def test_receipt_flops_match_the_flop_model(client):
    from visor_vllm.model.config import preset_tiny
    from visor_vllm.model.flops import request_flops

    reply = chat(client, messages(8), extra_body={"vllm_xargs": {"visor_budget": "max"}})
    v = visor(reply)
    want = request_flops(preset_tiny(), v["image_tokens"], v["text_tokens"],
                         reply.usage.completion_tokens, [n - 1 for n in v["sa_layers"]],
                         routed=False)
    assert v["visor_flops"] == want["visor_flops"] and v["dense_flops"] == want["dense_flops"]
    assert v["text_tokens"] == reply.usage.prompt_tokens  # usage counts text tokens only


def test_streaming_reports_the_receipt_on_the_finishing_chunk(client):
    chunks = list(chat(client, messages(9), stream=True,
                       extra_body={"vllm_xargs": {"visor_budget": "min"}}))
    assert all(c.choices for c in chunks)  # no usage chunk was asked for: none arrives
    finishing = [c for c in chunks if c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].model_extra["visor"]["output_tokens"] == 8
    with_usage = list(chat(client, messages(9), stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 8 and "visor" in with_usage[-1].model_extra


def test_metrics_are_monotone_and_add_up_to_the_receipts(client, server):
    before = metrics(server)
    replies = [chat(client, messages(10 + i), extra_body={"vllm_xargs": {"visor_budget": b}})
               for i, b in enumerate(["min", "max", "max"])]
    after = metrics(server)
    got = lambda m, k: m.get(k, 0.0)  # noqa: E731
    for phase in ("prefill", "decode"):
        key = f'visor:llm_flops_total{{phase="{phase}"}}'
        dense = f'visor:dense_equivalent_flops_total{{phase="{phase}"}}'
        want = sum(visor(r)[f"visor_{phase}_flops"] for r in replies)
        assert got(after, key) - got(before, key) == pytest.approx(want, rel=1e-9)
        assert got(after, dense) - got(before, dense) == pytest.approx(
            sum(visor(r)[f"dense_{phase}_flops"] for r in replies), rel=1e-9)
    assert all(after[k] >= v for k, v in before.items())  # counters never go down
    count = "visor:sa_layers_per_request_count"
    assert got(after, count) - got(before, count) == 3
    assert got(after, "visor:visual_tokens_per_request_sum") > got(before, "visor:visual_tokens_per_request_sum")
    max_layers = ",".join(map(str, visor(replies[1])["sa_layers"]))
    key = f'visor:requests_total{{budget_source="override",sa_layers="{max_layers}"}}'
    assert got(after, key) - got(before, key) == 2


def test_client_supplied_receipt_id_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="visor_receipt"):
        chat(client, messages(0), extra_body={"vllm_xargs": {"visor_receipt": "0" * 32}})


def test_bad_flops_cap_is_a_400(client):
    import openai

    for bad in (0, 1.5, "lots"):  # (vLLM coerces a JSON true in vllm_xargs to 1 before VISOR sees it)
        with pytest.raises(openai.BadRequestError, match="visor_max_flops"):
            chat(client, messages(0), extra_body={"vllm_xargs": {"visor_max_flops": bad}})
    with pytest.raises(openai.BadRequestError, match="visor_max_flops"):
        chat(client, messages(0), extra_body={"vllm_xargs": {"visor_budget": "max", "visor_max_flops": 0.5}})


def test_model_name(client):
    assert [m.id for m in client.models.list()] == [MODEL]
