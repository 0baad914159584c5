"""Run an engine test's workload in a fresh engine in *this* process; write the outputs as JSON.

What. ``python -m tests.engine.run_cases CKPT OUT.json [--compiled] [--mode M]``:
* ``cases`` (default): the engine of the equivalence suite (`test_vllm_vs_reference.engine`,
  or without ``enforce_eager``) runs every case of ``CASES`` batched in one ``generate``, then each case
  alone (``--alone a,b``: only those): ``{"runner": module, "batched": {name: out},
  "alone": {name: out}}`` with
  ``out = {"token_ids": [...], "logprobs": [{token: logprob}, ...]}``.
* ``preemption``: `test_preemption`'s contended engine (compiled, a cut KV pool), then each
  prompt alone in an eager engine (the slow MRV2 test's reference; `test_preemption` itself
  now compares with one uncontended batch): ``{"runner", "contended", "alone", "preempted"}``.
* ``tp``: `test_tensor_parallel`'s cases at tensor parallel 2 (eager or ``--compiled``) and 1:
  ``{"tp2", "tp1"}`` (which runner each engine used is in the log: "Using V2 Model Runner").

Why a subprocess: the engine's runner (``VLLM_USE_V2_MODEL_RUNNER``) and Triton's backends are
fixed at import time, so `test_model_runner_v2` runs its engine here, under the environment
from `tests.engine.triton_interpreter.install`, without touching the pytest process.
"""

from __future__ import annotations

import argparse
import json
import os


def runner_module(worker) -> str:
    """Runs in the worker: where its model runner class comes from."""
    return type(worker.model_runner).__module__


def dump(out) -> dict:
    return {"token_ids": list(out.token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in out.logprobs]}


def preemption(ckpt: str, n_prompts: int, max_tokens: int) -> dict:
    """`test_preemption`'s workload (its first ``n_prompts`` prompts, ``max_tokens`` each): a
    compiled engine with a cut KV pool, then each prompt alone."""
    from .test_preemption import PROMPTS, engine, generate

    prompts = PROMPTS[:n_prompts]
    small = engine(ckpt, enforce_eager=False, num_gpu_blocks_override=140)
    try:
        runner = small.collective_rpc(runner_module, timeout=120)[0]
        contended = generate(small, prompts, max_tokens)
        preempted = sum(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        small.llm_engine.engine_core.shutdown()
    roomy = engine(ckpt)
    try:
        alone = [generate(roomy, [p], max_tokens)[0] for p in prompts]
    finally:
        roomy.llm_engine.engine_core.shutdown()
    return {"runner": runner, "contended": contended, "alone": alone, "preempted": preempted}


def tensor_parallel(ckpt: str, compiled: bool) -> dict:
    """`test_tensor_parallel`'s workload: TP 2 (eager or compiled), then one rank, eager."""
    from .test_tensor_parallel import tokens

    class Env:  # the monkeypatch `tokens` expects; this process is thrown away anyway
        setenv = staticmethod(os.environ.__setitem__)

    return {"tp2": tokens(ckpt, 2, Env, enforce_eager=not compiled), "tp1": tokens(ckpt, 1, Env)}


def cases(ckpt: str, compiled: bool, alone: list[str] | None = None) -> dict:
    """`test_vllm_vs_reference`'s engine and cases: all batched, then each of ``alone`` (default:
    every case) alone."""
    from .test_vllm_vs_reference import CASES, engine, run

    llm = engine(ckpt, enforce_eager=not compiled)
    try:
        return {"runner": llm.collective_rpc(runner_module, timeout=120)[0],
                "batched": {n: dump(o) for n, o in run(llm, list(CASES)).items()},
                "alone": {n: dump(run(llm, [n])[n]) for n in (alone or CASES)}}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--compiled", action="store_true", help="no enforce_eager (torch.compile)")
    p.add_argument("--mode", choices=["cases", "preemption", "tp"], default="cases")
    p.add_argument("--alone", default="", help="cases: which cases run alone (default: all)")
    p.add_argument("--prompts", type=int, default=16, help="preemption: how many prompts")
    p.add_argument("--max-tokens", type=int, default=160, help="preemption: tokens per prompt")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # runner_module
    if args.mode == "cases":
        result = cases(args.ckpt, args.compiled, [n for n in args.alone.split(",") if n])
    elif args.mode == "preemption":
        result = preemption(args.ckpt, args.prompts, args.max_tokens)
    else:
        result = tensor_parallel(args.ckpt, args.compiled)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
