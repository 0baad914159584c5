"""Plain ``vllm serve DIR`` (no ``--middleware``) exports ``visor:*``: the stat-logger plugin.

The series count what the engine executed, so they add up with ``vllm:*`` in the cases a
per-response view gets wrong: ``n > 1`` (one prefill per sample), a list of prompts on
``/v1/completions`` (one request each), and endpoints without receipts.
"""

from __future__ import annotations

import pytest

from .conftest import MODEL, serving
from .test_budgets_and_metrics import metrics
from .test_openai_chat import messages

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def _vllm(server, name: str) -> float:
    import re
    import urllib.request

    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$",
                                            text, re.M))


def test_plain_vllm_serve_exports_executed_flops(tmp_path_factory):
    from openai import OpenAI

    from visor_vllm.model.config import preset_tiny
    from visor_vllm.model.flops import prefill_flops, request_flops

    cfg = preset_tiny()
    costliest = max(cfg.sa_configs, key=len)
    from transformers import AutoTokenizer

    from visor_vllm.testing import write_random_tiny_checkpoint

    ckpt = write_random_tiny_checkpoint(tmp_path_factory.mktemp("plain-ckpt"))
    tokens = AutoTokenizer.from_pretrained(ckpt)  # vLLM's /tokenize is empty for enc-dec models
    with serving(tmp_path_factory, ckpt=ckpt, middleware=False) as server:
        client = OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)
        m0 = metrics(server)
        assert m0['visor:llm_flops_total{phase="prefill"}'] == 0  # the series exist from the start
        done0 = _vllm(server, "vllm:request_success_total")
        one = client.chat.completions.create(
            model=MODEL, messages=messages(3), max_tokens=6, temperature=0,
            extra_body={"vllm_xargs": {"visor_budget": "max"}, "ignore_eos": True})
        assert "visor" not in (one.model_extra or {})  # receipts need the middleware
        m1 = metrics(server)
        nv = m1["visor:visual_tokens_per_request_sum"]
        want = request_flops(cfg, int(nv), one.usage.prompt_tokens, 6, costliest, routed=False)
        for phase in ("prefill", "decode"):
            assert m1[f'visor:llm_flops_total{{phase="{phase}"}}'] == want[f"visor_{phase}_flops"]
            assert (m1[f'visor:dense_equivalent_flops_total{{phase="{phase}"}}']
                    == want[f"dense_{phase}_flops"])
        layers = ",".join(str(i + 1) for i in costliest)
        assert m1[f'visor:requests_total{{budget_source="override",sa_layers="{layers}"}}'] == 1

        # n=2: two samples, two prefills; a list of two text prompts: two requests
        two = client.chat.completions.create(
            model=MODEL, messages=messages(3), max_tokens=6, temperature=1.0, n=2,
            extra_body={"vllm_xargs": {"visor_budget": "max"}, "ignore_eos": True})
        assert len(two.choices) == 2
        listed = client.completions.create(model=MODEL, prompt=["a b c", "d e f g"], max_tokens=3,
                                           extra_body={"ignore_eos": True})
        assert len(listed.choices) == 2
        m2 = metrics(server)
        pre = 'visor:llm_flops_total{phase="prefill"}'
        text = sum(prefill_flops(cfg, 0, len(tokens(p)["input_ids"]), []) for p in ("a b c", "d e f g"))
        assert m2[pre] - m1[pre] == 2 * want["visor_prefill_flops"] + text
        assert m2["visor:sa_layers_per_request_count"] == 5
        assert m2['visor:requests_total{budget_source="router",sa_layers=""}'] == 2  # text-only
        assert _vllm(server, "vllm:request_success_total") - done0 == 5
