"""Tensor parallelism 2 on the CPU build: the same greedy tokens as one rank.

Slow (two worker processes on a 2-core box) and so deselected by default: ``make test
PYTEST_ARGS='-m slow'``. It exercises the parallel linear layers (column/row/merged, the packed
``qkv``/``gate_up``/``kv`` weights), head splitting in the cross-attention and SA paths, the
replicated router and conv, and that only rank 0 writes receipts; eager, and compiled (each
rank compiles its own VISOR decoder).
"""

from __future__ import annotations

import os

import pytest

from .test_vllm_vs_reference import CASES, MAX_TOKENS

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]

NAMES = ["router", "sa_1_4_6", "min", "two_images", "text_only"]


def tokens(visor_ckpt, tp: int, monkeypatch, enforce_eager: bool = True):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM-CPU binds one NUMA node per rank by default; this box has one: one core per rank
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(visor_ckpt), dtype="float32", enforce_eager=enforce_eager, max_model_len=2048,
              max_num_batched_tokens=4096, max_num_seqs=8, limit_mm_per_prompt={"image": 2},
              tensor_parallel_size=tp, distributed_executor_backend="mp", seed=0)
    try:
        prompts = [{"prompt": CASES[n][0], **({"multi_modal_data": {"image": CASES[n][1]}}
                                              if CASES[n][1] else {})} for n in NAMES]
        params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                 extra_args=CASES[n][2]) for n in NAMES]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_tp2_gives_the_tokens_of_one_rank(visor_ckpt, monkeypatch, enforce_eager):
    assert tokens(visor_ckpt, 2, monkeypatch, enforce_eager) == tokens(visor_ckpt, 1, monkeypatch)
