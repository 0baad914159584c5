"""``vllm serve --data-parallel-size 2`` of a VISOR checkpoint: two engine cores, one server.

In the default run (~50 s: a second server, two engine processes). Requests are spread over
both engines by vLLM; every reply carries the receipt of the engine that ran it, and
``/metrics`` counts every request once: each engine writes its own stats file, keyed by its
engine index (vLLM's ``data_parallel_index``; ``data_parallel_rank`` is 0 in every engine of a
dense model, which once made both engines write one file and ``/metrics`` show half the FLOPs).
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from visor_vllm.model.config import preset_tiny

from .conftest import serving
from .test_budgets_and_metrics import max_budget_replies, metrics, visor

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def test_two_data_parallel_engines_give_receipts_and_whole_metrics(tmp_path_factory):
    with serving(tmp_path_factory, "--data-parallel-size", "2") as (base, _log):
        replies, want = max_budget_replies(base)
        m = metrics((base,))
        with urllib.request.urlopen(base + "/metrics", timeout=10) as f:
            text = f.read().decode()
    costliest = [i + 1 for i in max(preset_tiny().sa_configs, key=len)]
    assert all(visor(r)["sa_layers"] == costliest for r in replies)
    per_engine = {e: float(v) for e, v in re.findall(
        r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} ([0-9.e+-]+)$', text, re.M)}
    assert set(per_engine) == {"0", "1"}, per_engine  # two engine cores behind one server
    assert m['visor:llm_flops_total{phase="prefill"}'] == pytest.approx(want, rel=1e-9)
    assert m["visor:sa_layers_per_request_count"] == 8
