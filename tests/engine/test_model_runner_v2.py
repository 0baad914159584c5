"""VISOR on vLLM's Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``).

Two levels. (1) `VisorModelState`'s handoff, here on every machine: a new request's budget,
prompt and receipt land at its state index, leave with it, and each step passes the batch's
``idx_mapping`` as ``visor_slots``; the base class is vLLM's own, skipped by a stub. (2) The
equivalence suite end to end on MRV2, which vLLM 0.32 runs only where Triton has a backend
(GPU, or triton-cpu): **skipped on this project's CPU machines and CI** ("Model Runner V2
requires Triton"), so MRV2 is unproven end to end here.

The same cases as `test_vllm_vs_reference` (every configuration, budgets, text-only, two
images, a long prompt), batched in one engine on MRV2, against the reference; each case alone
gives the batched tokens; and the tokens equal the V1 runner's. Per-request state reaches the
model through `visor_vllm.engine.model_state.VisorModelState` there, not the V1 logits
processor.
"""

from __future__ import annotations

import os

import pytest

from .test_vllm_vs_reference import (CASES, batched, check_against_reference,  # noqa: F401
                                     llm, reference, run)

pytestmark = [pytest.mark.vllm]


def _has_triton() -> bool:
    try:
        from vllm.triton_utils.importing import HAS_TRITON
    except ImportError:
        return False
    return bool(HAS_TRITON)


needs_triton = pytest.mark.skipif(not _has_triton(), reason="vLLM's Model Runner V2 needs Triton "
                                  "with a backend for this device (none on this CPU)")


def test_model_state_hands_budgets_to_the_request_slot(tmp_path, monkeypatch):
    from types import SimpleNamespace as NS

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
    ms.remove_request("a")
    assert st.receipts[3] is None and st.allowed[3].all() and st.prompt_len[3] == 0
    ms.remove_request("never-added")  # harmless


@pytest.fixture(scope="module")
def llm_v2(visor_ckpt):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # runner_module below
    old = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # the engine process inherits it at start
    from vllm import LLM

    try:
        llm = LLM(model=str(visor_ckpt), dtype="float32", enforce_eager=True, max_model_len=4096,
                  max_num_batched_tokens=8192, max_num_seqs=16, limit_mm_per_prompt={"image": 2},
                  seed=0)
    finally:
        if old is None:
            os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        else:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = old
    yield llm
    llm.llm_engine.engine_core.shutdown()


def runner_module(worker) -> str:
    """Runs in the worker: where its model runner class comes from."""
    return type(worker.model_runner).__module__


@pytest.mark.e2e
@needs_triton
def test_the_engine_really_runs_model_runner_v2(llm_v2):
    assert llm_v2.collective_rpc(runner_module, timeout=120)[0] in (
        "vllm.v1.worker.cpu.model_runner", "vllm.v1.worker.gpu.model_runner")


@pytest.fixture(scope="module")
def batched_v2(llm_v2):
    return run(llm_v2, list(CASES))


@pytest.mark.e2e
@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_mrv2_batched_request_equals_reference(reference, batched_v2, name):
    check_against_reference(reference, name, batched_v2[name])


@pytest.mark.e2e
@needs_triton
def test_mrv2_each_request_alone_gives_the_batched_tokens(llm_v2, batched_v2):
    for name in CASES:
        assert list(run(llm_v2, [name])[name].token_ids) == list(batched_v2[name].token_ids), name


@pytest.mark.e2e
@needs_triton
def test_mrv2_gives_the_v1_runner_tokens(batched, batched_v2):
    for name in CASES:
        assert list(batched_v2[name].token_ids) == list(batched[name].token_ids), name
