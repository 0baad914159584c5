"""``visor:*`` metrics are whole with several API server processes (vLLM's multiprocess mode).

Slow (a second server with ``--api-server-count 2``): ``make test PYTEST_ARGS='-m slow'``.
Requests are spread over both API processes by the kernel; every ``/metrics`` read, whichever
process answers, must show the sum over all requests.
"""

from __future__ import annotations

import pytest

from .conftest import serving
from .test_budgets_and_metrics import max_budget_replies, metrics

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]


def test_metrics_add_up_across_api_server_processes(tmp_path_factory):
    with serving(tmp_path_factory, "--api-server-count", "2") as (base, _log):
        _replies, want = max_budget_replies(base)
        reads = [metrics((base,)) for _ in range(6)]
    for m in reads:
        assert m['visor:llm_flops_total{phase="prefill"}'] == pytest.approx(want, rel=1e-9)
        assert m["visor:sa_layers_per_request_count"] == 8
