"""Where a decode step's time goes: VISOR's components vs LLaVA-OV's decoder, in-process.

    python benchmarks/decode_profile.py visor DIR [--budget min|auto|max] [-c 16] [--tokens 24]
    python benchmarks/decode_profile.py llava DIR [-c 16]
    python benchmarks/decode_profile.py visor DIR --compiled     # torch.compile: whole steps only
    python benchmarks/decode_profile.py visor DIR --compiled --torch-profile 8   # + per-op table

DIR: a checkpoint directory without weights is fine (``--load-format dummy`` is always used):
``checkpoints/visor-0.5b`` (``visor-vllm serve visor-0.5b`` builds it) or the LLaVA-OV one that
``benchmarks/bench_vs_llava.py`` builds under ``bench-results/``. ``c`` requests with fresh
384x384 images (``--image WxH``) run together (after a two-request warm-up); every full-batch
decode step is timed at the model's top-level forward, and (eager only) VISOR's pieces
(``_Step``, SA-capable layers and their attention, cross attention, the other decoder layers,
the side channels) are timed by wrapping them (nested wrappers: ``_sa_layer (all)`` includes
the ``sa_attention`` calls). Prints one JSON object: the median full-batch decode step and
milliseconds per step per piece.

A diagnostic, not a comparison of record (that is ``bench_vs_llava.py``): it runs the engine in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) to reach the model's functions, and
monkeypatches them. CPU timings on 2 cores: compare runs of one session only, and with
``--torch-profile`` compare ``forward_over_gemm`` (`profile_summary`), not milliseconds.

Host time outside the forward: every engine step (``EngineCore.step``: scheduling, input and
metadata preparation, the forward, sampling, output processing) is timed too, and for each
full-batch decode step ``host_ms_outside_forward`` is the step minus its forward (its median
is ``host_ms_outside_forward_p50``). VISOR's bridge (the V1 logits processor) and its side
channels after the decoder count on VISOR's side of the line: the side channels run inside the
top-level forward, the bridge outside it. Compare a VISOR and a LLaVA-OV run of one session.

``--torch-profile K`` runs torch's profiler over K full-batch decode steps (from the fourth on)
and adds its ops' self time per step (``ops_self_ms_per_step``), so the two models' compiled
graphs can be compared kernel by kernel: inductor's fused kernels are named
(``cpp.enable_kernel_profile``, compile cache off so they are regenerated). The profiler's own
overhead lands in every op: compare profiled runs with profiled runs only.
"""
import argparse
import contextlib
import functools
import base64
import io
import json
import os
import statistics
import sys
import time
from collections import defaultdict

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

import numpy as np
import torch

T = defaultdict(float)
N = defaultdict(int)
STEP = {"decode": False}
STEPS = []
ENGINE = {"forward_s": 0.0, "n": None}  # the engine step in flight: its forward time, batch
ENGINE_STEPS = []                      # (tokens, step s, forward s, parts) per decode step
PARTS: dict[str, float] = {}           # host-side parts of the engine step in flight (s)
# where the host time outside the forward goes: vLLM's scheduler and model-runner phases (they
# may nest: _build_attention_metadata runs inside execute_model's preparation)
HOST_PARTS = {
    "vllm.v1.core.sched.scheduler:Scheduler": ("schedule", "update_from_output"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": (
        "_update_states", "_prepare_inputs", "_build_attention_metadata", "_preprocess",
        "_sample", "_bookkeeping_sync"),
}


def engine_step_timer():
    """Time whole engine steps (``EngineCore.step``; in-process with multiprocessing off)."""
    from vllm.v1.engine.core import EngineCore

    for name in ("step", "step_with_batch_queue"):
        fn = getattr(EngineCore, name, None)
        if fn is None:
            continue

        def make(fn):
            @functools.wraps(fn)
            def wrap(self, *a, **k):
                ENGINE.update(forward_s=0.0, n=None)
                PARTS.clear()
                t = time.perf_counter()
                out = fn(self, *a, **k)
                if ENGINE["n"] is not None:  # a decode step ran a forward
                    ENGINE_STEPS.append((ENGINE["n"], time.perf_counter() - t, ENGINE["forward_s"],
                                         dict(PARTS)))
                return out
            return wrap
        setattr(EngineCore, name, make(fn))
    import importlib

    for where, names in HOST_PARTS.items():
        mod, cls = where.split(":")
        klass = getattr(importlib.import_module(mod), cls)
        for name in names:
            fn = getattr(klass, name, None)
            if fn is None:  # another vLLM version: that part is not reported
                continue

            setattr(klass, name, into_parts(fn, f"{cls}.{name}"))


def into_parts(fn, label: str):
    """``fn`` adding its time to ``PARTS[label]`` (the engine step in flight)."""
    @functools.wraps(fn)
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PARTS[label] = PARTS.get(label, 0.0) + time.perf_counter() - t
    return wrap


def timed(name, fn):
    @functools.wraps(fn)  # vLLM's compile decorator reads forward signatures
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if STEP["decode"]:
                T[name] += time.perf_counter() - t
                N[name] += 1
    return wrap


FORWARD_EVENT = "decode_profile: model forward"
GEMM_OP, ATTENTION_OP = "_C::onednn_mm", "_C::cpu_attention_with_kv_cache"  # vLLM's CPU kernels
# where vLLM's CPU build runs its linears on torch instead of oneDNN (measured on an AVX2-only
# Zen 1 host, 2026-12-05), the GEMMs are these ops; used only when GEMM_OP is absent
FALLBACK_GEMM_OPS = ("aten::mm", "aten::addmm")


def profile_summary(events, k: int, top: int = 60) -> dict:
    """torch profiler ``key_averages()`` of ``k`` profiled decode steps -> per-step numbers.

    ``profiled_forward_ms_per_step`` is the model's top-level forward (the `FORWARD_EVENT`
    range); the ops' self times also hold what runs between the forwards (sampling, input and
    metadata preparation). Whole steps drift by up to ~35% between runs on this shared CPU,
    GEMMs and all, so two models are compared by ``forward_over_gemm``: the forward over the
    same run's oneDNN GEMM time (the weights both read).
    """
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)
    by = {e.key: e.self_cpu_time_total / 1000 / k for e in ops}
    fwd = next((e for e in ops if e.key == FORWARD_EVENT), None)
    fwd_ms = fwd.cpu_time_total / 1000 / fwd.count if fwd is not None and fwd.count else None
    gemm = by.get(GEMM_OP) or sum(by.get(op, 0.0) for op in FALLBACK_GEMM_OPS)
    attn = by.get(ATTENTION_OP, 0.0)
    return {"profiled_steps": k,
            "profiled_forward_ms_per_step": round(fwd_ms, 2) if fwd_ms else None,
            "gemm_ms_per_step": round(gemm, 2), "attention_ms_per_step": round(attn, 2),
            "forward_over_gemm": round(fwd_ms / gemm, 3) if fwd_ms and gemm else None,
            "ops_self_ms_per_step": {e.key[:90]: [round(by[e.key], 3), round(e.count / k, 1)]
                                     for e in ops[:top]},
            "ops_self_ms_per_step_total": round(sum(by.values()), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("model")
    ap.add_argument("--budget", default=None)
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--image", default="384x384", metavar="WxH", help="image size (fresh noise)")
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's default path (torch.compile) instead of --enforce-eager; "
                         "whole steps only")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="K",
                    help="profile K full-batch decode steps with torch.profiler; per-op table")
    args = ap.parse_args()
    from PIL import Image

    prof, PROF = None, {}
    if args.torch_profile:
        import torch._inductor.config as inductor_config

        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # regenerate kernels with their names
        inductor_config.cpp.enable_kernel_profile = True
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        PROF = {"full": 0, "on": False}

    def step_timer(cls):
        """Time whole decode steps at the model's top-level forward (never compiled)."""
        fwd = cls.forward

        @functools.wraps(fwd)
        def wrap(self, input_ids, positions, *a, **k):
            n = (input_ids if input_ids is not None else k["inputs_embeds"]).shape[0]
            STEP["decode"] = n <= args.c and not k.get("encoder_outputs")
            full = STEP["decode"] and n == args.c
            if prof is not None and full:  # profile full-batch steps 4 .. 3 + K
                PROF["full"] += 1
                if PROF["full"] == 4:
                    prof.start(); PROF["on"] = True
            t = time.perf_counter()
            with (torch.profiler.record_function(FORWARD_EVENT) if PROF.get("on")
                  else contextlib.nullcontext()):
                out = fwd(self, input_ids, positions, *a, **k)
            if STEP["decode"]:
                dt = time.perf_counter() - t
                STEPS.append((n, dt))
                ENGINE["forward_s"] += dt
                ENGINE["n"] = n
            if prof is not None and PROF["on"] and PROF["full"] == 3 + args.torch_profile:
                prof.stop(); PROF["on"] = False
            STEP["decode"] = False
            return out
        cls.forward = wrap
        # outside the forward: the LM head over the batch
        cls.compute_logits = into_parts(cls.compute_logits, "compute_logits")

    if args.kind == "visor":
        from visor_vllm.engine import vllm_model as vm

        step_timer(vm.VisorForConditionalGeneration)
        if not args.compiled:  # pieces: wrappers inside a compiled graph would time the trace
            from visor_vllm.engine import sa_attention as sa
            sa.attend = timed("sa_attention.attend", sa.attend)
            sa.write = timed("sa_attention.write", sa.write)
            sa.with_prefix = timed("sa_attention.with_prefix", sa.with_prefix)
            vm._Step.__init__ = timed("_Step", vm._Step.__init__)
            vm.VisorDecoder._sa_layer = timed("_sa_layer (all)", vm.VisorDecoder._sa_layer)
            vm.VisorDecoder.side_channels = timed("side_channels", vm.VisorDecoder.side_channels)
            vm.VisorCrossAttention.forward = timed("cross_attn module", vm.VisorCrossAttention.forward)
            from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
            Qwen2DecoderLayer.forward = timed("Qwen2DecoderLayer.forward (non-SA layers)",
                                              Qwen2DecoderLayer.forward)
    else:
        from visor_vllm.patches import apply_transformers_patches

        apply_transformers_patches()  # vLLM's llava.py imports a torchvision-only module
        from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
        step_timer(LlavaOnevisionForConditionalGeneration)
        if not args.compiled:
            from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
            Qwen2DecoderLayer.forward = timed("Qwen2DecoderLayer.forward", Qwen2DecoderLayer.forward)

    engine_step_timer()
    from vllm import LLM, SamplingParams

    llava = args.kind == "llava"
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=not args.compiled, load_format="dummy",
              max_model_len=10000, max_num_batched_tokens=10000, max_num_seqs=args.c,
              limit_mm_per_prompt={"image": 1, "video": 0} if llava else {"image": 1}, seed=0,
              mm_processor_cache_gb=0, enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    msgs = []
    for i in range(args.c):
        w, h = (int(x) for x in args.image.lower().split("x"))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO(); img.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": f"Describe picture {i}."}]}])
    extra = {"visor_budget": args.budget} if args.budget else None
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra)
    llm.chat(msgs[:2], sp, use_tqdm=False)  # warm-up
    T.clear(); N.clear(); STEPS.clear(); ENGINE_STEPS.clear()
    t0 = time.perf_counter()
    llm.chat(msgs, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    full = [t for n, t in STEPS if n == args.c]
    host = [step - fwd for n, step, fwd, _ in ENGINE_STEPS if n == args.c]
    parts = [p for n, _, _, p in ENGINE_STEPS if n == args.c]
    out = {"kind": args.kind, "budget": args.budget, "c": args.c, "image": args.image,
           "compiled": args.compiled,
           "wall_s": round(wall, 2),
           "decode_steps_full_batch": len(full),
           "decode_step_ms_p50": round(1000 * statistics.median(full), 2) if full else None,
           "engine_steps_full_batch": len(host),
           "host_ms_outside_forward_p50": round(1000 * statistics.median(host), 3) if host else None,
           "host_ms_outside_forward_p90": (round(1000 * sorted(host)[int(0.9 * (len(host) - 1))], 3)
                                           if host else None),
           "host_parts_ms_p50": {k: round(1000 * statistics.median(p.get(k, 0.0) for p in parts), 3)
                                 for k in sorted({k for p in parts for k in p})},
           "per_step_ms": {k: round(1000 * v / max(len(STEPS), 1), 3) for k, v in
                           sorted(T.items(), key=lambda kv: -kv[1])},
           "calls_per_step": {k: round(N[k] / max(len(STEPS), 1), 1) for k in N}}
    if prof is not None:
        if PROF["on"]:
            prof.stop()
        out.update(profile_summary(prof.key_averages(),
                                   max(min(PROF["full"] - 3, args.torch_profile), 1)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
