"""benchmarks/decode_profile.py: the profile summary (pure) and one tiny in-process run."""

import json
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest

from tests.benchmarks.script_loader import BENCHMARKS, load_script

_PATH = BENCHMARKS / "decode_profile.py"


@pytest.fixture(scope="module")
def dp():
    with load_script("decode_profile") as mod:
        yield mod


def _ev(key, self_us, total_us=None, count=1):
    return NS(key=key, self_cpu_time_total=self_us, cpu_time_total=total_us or self_us, count=count)


def test_profile_summary_per_step_and_drift_ratio(dp):
    events = [_ev(dp.GEMM_OP, 110_000, count=226), _ev(dp.ATTENTION_OP, 30_000, count=64),
              _ev(dp.FORWARD_EVENT, 2_000, total_us=150_000, count=2), _ev("aten::add", 8_000)]
    out = dp.profile_summary(events, k=2)
    assert out["profiled_steps"] == 2
    assert out["gemm_ms_per_step"] == 55.0 and out["attention_ms_per_step"] == 15.0
    assert out["profiled_forward_ms_per_step"] == 75.0        # the range, children included
    assert out["forward_over_gemm"] == round(75 / 55, 3)
    assert list(out["ops_self_ms_per_step"])[0] == dp.GEMM_OP  # by self time
    assert out["ops_self_ms_per_step"][dp.GEMM_OP] == [55.0, 113.0]
    assert out["ops_self_ms_per_step_total"] == 75.0


def test_profile_summary_without_forward_or_gemm(dp):
    out = dp.profile_summary([_ev("aten::add", 1_000)], k=1)
    assert out["profiled_forward_ms_per_step"] is None and out["forward_over_gemm"] is None
    assert out["gemm_ms_per_step"] == 0.0


@pytest.mark.vllm
@pytest.mark.e2e
def test_tiny_eager_run_profiles_decode_steps(tmp_path):
    pytest.importorskip("vllm")
    from visor_vllm.testing import write_random_tiny_checkpoint

    tiny_checkpoint = write_random_tiny_checkpoint(tmp_path / "visor-tiny")
    r = subprocess.run([sys.executable, str(_PATH), "visor", str(tiny_checkpoint), "-c", "2",
                        "--tokens", "10", "--torch-profile", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{\n"):])  # vLLM logs to stdout before it
    assert out["decode_steps_full_batch"] >= 5 and out["profiled_steps"] == 2
    assert out["gemm_ms_per_step"] > 0 and out["attention_ms_per_step"] > 0
    assert out["profiled_forward_ms_per_step"] > out["gemm_ms_per_step"]
    assert "visor::sa_attention" in out["ops_self_ms_per_step"]
    assert out["per_step_ms"]["_sa_layer (all)"] > 0  # eager: VISOR's pieces timed as well
    assert out["engine_steps_full_batch"] >= 5  # whole engine steps, host time outside the forward
    assert 0 < out["host_ms_outside_forward_p50"] <= out["host_ms_outside_forward_p90"]
    parts = out["host_parts_ms_p50"]  # where that host time goes: vLLM's phases
    assert parts["Scheduler.schedule"] > 0 and parts["GPUModelRunner._prepare_inputs"] > 0
    assert parts["compute_logits"] > 0
