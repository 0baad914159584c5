"""VISOR on vLLM's Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``).

Two levels. (1) `VisorModelState`'s handoff: a new request's budget, prompt and receipt land at
its state index, leave with it, and each step passes the batch's ``idx_mapping`` as
``visor_slots``; the base class is vLLM's own, skipped by a stub. (2) The equivalence suite end
to end on MRV2, eager and compiled. vLLM 0.32 runs MRV2 only where Triton has a backend for the
device (GPU, or triton-cpu, which this project's package index lacks), so the engine runs in a
subprocess (`tests.engine.run_cases`) with `tests.engine.triton_interpreter`: a Triton backend
named ``cpu`` under ``TRITON_INTERPRET=1``, so vLLM's own MRV2 kernels (input preparation,
block tables, sampling) execute in Triton's interpreter around VISOR's model.

The same cases as `test_vllm_vs_reference` (every configuration, budgets, text-only, two
images, a long prompt), batched in one engine on MRV2, against the reference (which runs each
alone); `ALONE` of them alone give the batched tokens on MRV2 too; and the tokens equal the V1
runner's. Per-request state reaches the
model through `visor_vllm.engine.model_state.VisorModelState` there, not the V1 logits
processor.

Footguns. What runs interpreted here runs compiled by Triton on a GPU; the kernels are vLLM's,
the same source, but a Triton-GPU miscompile would not show here. Every interpreted engine step
costs seconds on a slow 2-core host, so only `ALONE` (router-chosen, a budget, text-only, two
images) run alone: every case alone took the module's engine 376 s there against 257 s, and
each case is already held to the one-request reference in the batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from . import triton_interpreter
from .test_vllm_vs_reference import CASES, check_against_reference

pytestmark = [pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]


def test_model_state_hands_budgets_to_the_request_slot(tmp_path, monkeypatch):
    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.model_states.encoder_decoder import EncoderDecoderModelState

    from visor_vllm.engine import bridge, receipts
    from visor_vllm.engine.model_state import VisorModelState
    from visor_vllm.engine.vllm_model import VisorForConditionalGeneration
    from visor_vllm.model.config import preset_tiny

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))

    def base_init(self, vllm_config, model, encoder_cache, device):  # no encoder runner here
        self.vllm_config, self.max_num_reqs, self.encoder_outputs = vllm_config, 4, []

    monkeypatch.setattr(EncoderDecoderModelState, "__init__", base_init)
    assert VisorForConditionalGeneration.get_model_state_cls() is VisorModelState
    hf = preset_tiny()
    cfg = NS(model_config=NS(hf_config=hf, model="/ckpt"))
    ms = VisorModelState(cfg, None, None, "cpu")
    st = bridge.STATE
    rid = receipts.new_id()
    route = hf.routing_token_id
    ms.add_request(3, NS(req_id="a", prompt_token_ids=[5, route, 6], prefill_token_ids=[5, route, 6],
                         sampling_params=SamplingParams(extra_args={"visor_budget": "min",
                                                                    "visor_receipt": rid})))
    ms.add_request(1, NS(req_id="b", prompt_token_ids=[5, 6], prefill_token_ids=[5, 6, 9, 9],
                         sampling_params=SamplingParams()))
    assert st.allowed[3].sum() == 1 and st.prompt_len[3] == 3 and st.receipts[3] == rid
    assert st.n_routing[3] == 1 and not st.resumed[3] and st.resumed[1]  # b: re-added after preemption
    inputs = ms.prepare_inputs(NS(idx_mapping=torch.tensor([1, 3, 0, 0]), num_reqs=2), None)
    assert inputs["visor_slots"].tolist() == [1, 3] and inputs["encoder_outputs"] == []
    # a CUDA graph captured on the dummy batch reads every later step's slots at its address
    captured = ms.prepare_dummy_inputs(4, 4)["visor_slots"]
    later = ms.prepare_inputs(NS(idx_mapping=torch.tensor([2, 0, 1]), num_reqs=3), None)
    assert later["visor_slots"].data_ptr() == captured.data_ptr() == inputs["visor_slots"].data_ptr()
    assert captured[:3].tolist() == [2, 0, 1]
    ms.remove_request("a")
    assert st.receipts[3] is None and st.allowed[3].all() and st.prompt_len[3] == 0
    ms.remove_request("never-added")  # harmless


ALONE = ("router", "min", "text_only", "two_images")


def run_v2(folder: Path, ckpt, *flags: str) -> dict:
    """`tests.engine.run_cases` on MRV2 with the Triton interpreter backend; its JSON result."""
    pytest.importorskip("triton")
    env = {**os.environ, **triton_interpreter.install(folder), "VLLM_USE_V2_MODEL_RUNNER": "1"}
    out = folder / "out.json"
    proc = subprocess.run([sys.executable, "-m", "tests.engine.run_cases", str(ckpt), str(out),
                           "--alone", ",".join(ALONE), *flags],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert "Using V2 Model Runner" in log, log[-4000:]  # cpu_worker logs it only on MRV2
    return json.loads(out.read_text())


@pytest.fixture(scope="module",
                params=["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def v2(request, visor_ckpt, tmp_path_factory):
    """The cases on MRV2 in a subprocess engine (see the module docstring), as vLLM outputs."""
    flags = ["--compiled"] if request.param == "compiled" else []
    res = run_v2(tmp_path_factory.mktemp(f"mrv2-{request.param}"), visor_ckpt, *flags)

    def output(d):
        return NS(token_ids=d["token_ids"],
                  logprobs=[{int(t): NS(logprob=lp) for t, lp in step.items()} for step in d["logprobs"]])

    return NS(runner=res["runner"], batched={n: output(d) for n, d in res["batched"].items()},
              alone={n: output(d) for n, d in res["alone"].items()})


@pytest.mark.e2e
def test_the_engine_really_runs_model_runner_v2(v2):
    assert v2.runner == "vllm.v1.worker.cpu.model_runner", v2.runner


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(CASES))
def test_mrv2_batched_request_equals_reference(reference, v2, name):
    check_against_reference(reference, name, v2.batched[name])


@pytest.mark.e2e
def test_mrv2_each_request_alone_gives_the_batched_tokens(v2):
    assert sorted(v2.alone) == sorted(ALONE)
    for name in ALONE:
        assert v2.alone[name].token_ids == v2.batched[name].token_ids, name


@pytest.mark.e2e
def test_mrv2_gives_the_v1_runner_tokens(batched, v2):
    for name in CASES:
        assert v2.batched[name].token_ids == list(batched[name].token_ids), name


@pytest.mark.e2e
@pytest.mark.slow
def test_mrv2_preempted_requests_reroute_to_the_same_tokens(visor_ckpt, tmp_path):
    """`test_preemption` on MRV2: re-added requests (``resumed``) re-route to their tokens.

    Seven of its prompts, 112 tokens each: five fit at admission and one is preempted while
    they decode (the full sixteen x 160 would take an hour with the interpreted sampler)."""
    res = run_v2(tmp_path, visor_ckpt, "--mode", "preemption", "--prompts", "7", "--max-tokens", "112")
    assert res["runner"] == "vllm.v1.worker.cpu.model_runner"
    assert res["preempted"] > 0, "the test did not cause a preemption; shrink the KV pool"
    assert res["contended"] == res["alone"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_mrv2_tp2_gives_the_tokens_of_one_rank(visor_ckpt, tmp_path, mode):
    res = run_v2(tmp_path, visor_ckpt, "--mode", "tp", *(["--compiled"] if mode == "compiled" else []))
    assert res["tp2"] == res["tp1"]
