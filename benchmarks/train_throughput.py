"""VISOR (cheapest and costliest configuration) vs dense LLaVA-OV: prefill and training step.

    python benchmarks/train_throughput.py                          # visor-0.5b, the issue's table
    python benchmarks/train_throughput.py --preset synthetic --shapes 32x32 --phases train
    python benchmarks/train_throughput.py --preset tiny --shapes 2x40 --steps 2   # plumbing
    python benchmarks/train_throughput.py --phases train --compile --warmup 4    # compiled blocks

What it does. Builds dense LLaVA-OneVision of ``--preset`` with random weights (transformers'
init) and converts it in memory (`copy_weights`, the converter's) into VISOR, then, in one
process and one run, for every shape ``BxS`` (B prompts, one ``S x S``-pixel image each):

* ``prefill``: one forward of the trainer's batched model (`visor_hidden`: vision tower, packing,
  LLM) vs transformers' `dense_hidden`, no gradients, weights in ``--precision``;
* ``train``: one optimizer step as the trainer takes it (fp32 master weights, bf16 autocast
  with ``--precision bf16``, the collate's host-built layout, fused AdamW, clipping), stage 2
  (frozen vision tower) for VISOR, the dense stage for LLaVA-OV.

Prints one JSON line per phase and shape: the median milliseconds of ``--steps`` runs after
``--warmup``, samples/s, peak device memory (CUDA only), and ``speedup_min``/``speedup_max`` =
dense time / VISOR time (above 1: VISOR is faster), all measured in the same run. The issue's
targets (GPU): train speedup >= 1.2 at 8x384 (1,485 visual tokens), >= 2 at 4x1152 (7,371), and
prefill speedup >= 1 at >= 1,485 tokens, batch 1 included.

Runs without vLLM (a GPU image with torch, transformers and accelerate is enough);
`scripts/gpu_check.sh` runs it. Downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = {"from": "human", "value": "<image>\nWhat is shown in the picture, in one sentence?"}
ANSWER = {"from": "gpt", "value": "A square of coloured noise on a plain background."}


def build(preset: str, tmp: Path):
    """(dense model, VISOR model, dense dir, VISOR dir): random weights, the same LLaVA-OV ones.

    Real sizes are converted in memory (a 0.9B checkpoint on disk would take a minute); small
    presets through ``visor-vllm convert`` (their compact vocabularies need the converter's
    tokenizer).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm import register_transformers
    from visor_vllm.checkpoints.build import (build_tiny, build_tiny_llava_onevision,
                                              llava_onevision_config)
    from visor_vllm.checkpoints.convert import convert, copy_weights
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.reference import VisorForConditionalGeneration
    from visor_vllm.patches import apply_transformers_patches

    register_transformers()
    apply_transformers_patches()
    torch.manual_seed(0)
    if not preset.startswith("visor-"):
        from visor_vllm.training.synthetic import corpus

        files_d = build_tiny_llava_onevision(tmp / "dense", preset=preset, extra_corpus=corpus())
        files_v = convert(files_d, tmp / "visor", preset=preset, init="random", progress=False)
        dense = LlavaOnevisionForConditionalGeneration.from_pretrained(
            str(files_d), local_files_only=True, dtype=torch.float32)
        return dense, VisorForConditionalGeneration.from_pretrained(str(files_v)), files_d, files_v
    cfg = get_preset(preset)
    dense = LlavaOnevisionForConditionalGeneration(llava_onevision_config(cfg)).float()
    visor = VisorForConditionalGeneration(cfg)
    missing, unexpected = visor.load_state_dict(copy_weights(cfg, dense.state_dict(),
                                                             init="random"), strict=False)
    assert not unexpected and set(missing) <= {"language_model.lm_head.weight"}, missing
    files_v = build_tiny(tmp / "visor", preset=preset, weights=False)
    files_d = build_tiny_llava_onevision(tmp / "dense", real_sizes=True)
    return dense, visor, files_d, files_v


def batch(files: Path, side: int, n: int, tmp: Path, visor_config=None):
    """``n`` one-image prompts (random pixels, ``side`` px), collated as the trainer does."""
    import numpy as np
    from PIL import Image

    from visor_vllm.training.data import SampleEncoder, collate, with_layout

    enc = SampleEncoder(files, max_length=65536)
    folder = tmp / f"img{side}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        if not (folder / f"{i}.png").exists():
            arr = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.png")
        samples.append(enc.encode({"image": f"{i}.png", "conversations": [PROMPT, ANSWER]},
                                  folder))
    b = collate(samples, enc.tokenizer.pad_token_id)
    tokens = int((b.input_ids[0] == enc.image_token_id).sum())
    return (with_layout(b, visor_config) if visor_config is not None else b), tokens


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``steps`` runs after ``warmup`` (device-synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def peak_reset(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="visor-0.5b")
    p.add_argument("--shapes", default="1x384,8x384,1x1152,4x1152",
                   help="BxS: B prompts with one S x S image each (384: 1,485 visual tokens "
                        "and 1152: 7,371 at visor-0.5b)")
    p.add_argument("--phases", default="prefill,train")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every block of the training step, as the recipe key "
                        "`compile: true` does (engines.compile_blocks); --warmup must cover "
                        "the compilations")
    args = p.parse_args(argv)

    from visor_vllm.training.engines import adamw, clip_grad_norm, compile_blocks
    from visor_vllm.training.model import (DenseTrainStep, VisorTrainStep, dense_hidden,
                                           visor_hidden)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    phases = args.phases.split(",")
    print(json.dumps({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                      "torch": torch.__version__, "preset": args.preset,
                      "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads()}),
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="visor-throughput-"))
    t0 = time.time()
    dense, visor, files_d, files_v = build(args.preset, tmp)
    cfg = visor.config
    cheap, costly = list(cfg.sa_configs[0]), list(cfg.sa_configs[-1])
    print(json.dumps({"build_s": round(time.time() - t0, 1), "visor_min": [i + 1 for i in cheap],
                      "visor_max": [i + 1 for i in costly]}), flush=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else \
        (lambda: torch.autocast(device, enabled=False))

    def row(phase, n, side, tokens, times, mems):
        d = times["dense"]
        out = {"phase": phase, "batch": n, "image": side, "visual_tokens": tokens}
        for k, v in times.items():
            out[f"{k}_ms"] = round(v * 1e3, 2)
            out[f"{k}_samples_per_s"] = round(n / v, 2)
            if mems.get(k) is not None:
                out[f"{k}_peak_gb"] = mems[k]
        out["speedup_min"] = round(d / times["visor_min"], 3)
        out["speedup_max"] = round(d / times["visor_max"], 3)
        print(json.dumps(out), flush=True)

    if "prefill" in phases:
        vi, di = visor.to(device, dtype).eval(), dense.to(device, dtype).eval()
        for n, side in shapes:
            bv, tokens = batch(files_v, side, n, tmp, cfg)
            bd, _ = batch(files_d, side, n, tmp)
            bv, bd = bv.to(device), bd.to(device)  # the models cast the pixels themselves
            times, mems = {}, {}
            with torch.no_grad():
                for name, fn in (("dense", lambda: dense_hidden(di, bd)),
                                 ("visor_min", lambda: visor_hidden(vi, bv, cheap)),
                                 ("visor_max", lambda: visor_hidden(vi, bv, costly))):
                    peak_reset(device)
                    times[name] = timed(fn, args.steps, args.warmup, device)
                    mems[name] = peak_gb(device)
            row("prefill", n, side, tokens, times, mems)
            del bv, bd
        visor, dense = vi.float().cpu(), di.float().cpu()
        if device == "cuda":
            torch.cuda.empty_cache()

    if "train" in phases:
        for n, side in shapes:
            times, mems = {}, {}
            for name, model, kind in (("dense", dense, "dense"), ("visor_min", visor, cheap),
                                      ("visor_max", visor, costly)):
                model.to(device, torch.float32).train()
                if kind == "dense":
                    step = DenseTrainStep(model, gradient_checkpointing=args.checkpointing)
                    b, tokens = batch(files_d, side, n, tmp)
                else:
                    step = VisorTrainStep(model, "stage2",
                                          gradient_checkpointing=args.checkpointing)
                    b, tokens = batch(files_v, side, n, tmp, cfg)
                if args.compile:
                    compile_blocks(step)
                params = [q for q in model.parameters() if q.requires_grad]
                opt = adamw([{"params": params}], 1e-5)

                def one(step=step, b=b, kind=kind, params=params, opt=opt):
                    with autocast():
                        loss, k = step(b.to(device, non_blocking=True),
                                       None if kind == "dense" else kind)
                    (loss / k).backward()
                    clip_grad_norm(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                peak_reset(device)
                times[name] = timed(one, args.steps, args.warmup, device)
                mems[name] = peak_gb(device)
                del opt
                model.cpu()
                if device == "cuda":
                    torch.cuda.empty_cache()
            row("train", n, side, tokens, times, mems)
    return 0


if __name__ == "__main__":
    sys.exit(main())
