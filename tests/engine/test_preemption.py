"""A preempted VISOR request re-derives its configuration: the same tokens as uncontended.

The KV pool is cut so that sixteen long image requests fit at admission but not while they all
decode; vLLM then preempts (recompute) and later re-prefills a request from its prompt plus
its outputs so far. The router must reach the same configuration (it reads only prompt
routing tokens, causally), so every request's tokens equal its uncontended run. The contended
engine runs vLLM's default compiled path, the uncontended one eagerly with room for all
sixteen at once (no preemption, checked): the preempted, compiled steps (batch sizes that
change as requests leave and re-join) give the eager tokens.

Footgun: the uncontended run is one batch, not sixteen runs of one request (2,560 decode steps
instead of 160: the test took 234 s against 186 s on a slow 2-core host); batch invariance
itself is `test_vllm_vs_reference`'s (each request alone gives the batched tokens).
"""

from __future__ import annotations

import os

import pytest

from .test_vllm_vs_reference import LONG, chat, image

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

PROMPTS = [(chat(LONG[: 1000 + 100 * i]), image(20 + i)) for i in range(16)]  # ~300-700 tokens


def generate(llm, prompts, max_tokens: int = 160):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": [img]}} for p, img in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def engine(visor_ckpt, enforce_eager=True, **kw):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=str(visor_ckpt), dtype="float32", enforce_eager=enforce_eager, max_model_len=1024,
               max_num_batched_tokens=2048, max_num_seqs=16, limit_mm_per_prompt={"image": 1},
               disable_log_stats=False, seed=0, **kw)


def test_preempted_requests_reroute_to_the_same_tokens(visor_ckpt):
    # vLLM insists on room for one max-length request (128 blocks here: SA layers hold the
    # encoder budget plus max_model_len); sixteen ~23-block prompts fill the pool and their
    # outputs do not fit
    small = engine(visor_ckpt, enforce_eager=False,  # compiled
                   num_gpu_blocks_override=140)  # 1-layer blocks (kv_layout: 8 groups)
    try:
        contended = generate(small, PROMPTS)
        preempted = sum(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        small.llm_engine.engine_core.shutdown()
    assert preempted > 0, "the test did not cause a preemption; shrink the KV pool"
    roomy = engine(visor_ckpt)
    try:
        uncontended = generate(roomy, PROMPTS)
        again = sum(m.value for m in roomy.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        roomy.llm_engine.engine_core.shutdown()
    assert again == 0, "the uncontended engine preempted too"
    assert contended == uncontended
