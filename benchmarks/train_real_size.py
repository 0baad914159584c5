"""A few training steps at real size: visor-0.5b (stage 2) or dense LLaVA-OV-0.5B, random weights.

    python benchmarks/train_real_size.py --model visor --steps 3
    python benchmarks/train_real_size.py --model dense --steps 3

What it does. Builds LLaVA-OneVision-0.5B with random weights (transformers' init), and for
``--model visor`` runs it through the converter (`copy_weights`, the real conversion's init)
into `VisorForConditionalGeneration`; then trains ``--steps`` optimizer steps of the recipe's
stage 2 (whole LLM, frozen SigLIP, AdamW without weight decay, one sampled viable
configuration per step, gradient checkpointing) on a batch of ``--batch`` synthetic prompts
with one ``--image-size`` image each, encoded by the real-size processor and chat template.
Prints one JSON line: seconds per step (the first step is reported apart: allocation),
samples/s, and the process's peak resident memory.

Run each model in its own process (peak memory is per process). No weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["visor", "dense"], default="visor")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args(argv)

    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.checkpoints.build import build_tiny, build_tiny_llava_onevision, llava_onevision_config
    from visor_vllm.checkpoints.convert import copy_weights
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.reference import VisorForConditionalGeneration
    from visor_vllm.training.data import SampleEncoder, collate
    from visor_vllm.training.model import DenseTrainStep, VisorTrainStep, set_trainable
    from visor_vllm.training.trainer import ConfigSampler

    torch.manual_seed(0)
    cfg = get_preset("visor-0.5b")
    tmp = Path(tempfile.mkdtemp())
    t0 = time.time()
    dense = LlavaOnevisionForConditionalGeneration(llava_onevision_config(cfg)).float()
    if args.model == "visor":
        files = build_tiny(tmp / "visor", preset="visor-0.5b", weights=False)
        model = VisorForConditionalGeneration(cfg)
        missing, unexpected = model.load_state_dict(copy_weights(cfg, dense.state_dict()),
                                                    strict=False)
        assert not unexpected and set(missing) <= {"language_model.lm_head.weight"}, missing
        del dense
        step = VisorTrainStep(model, gradient_checkpointing=not args.no_checkpointing)
        kind = "stage2"
    else:
        files = build_tiny_llava_onevision(tmp / "dense", real_sizes=True)
        model = dense
        step = DenseTrainStep(model, gradient_checkpointing=not args.no_checkpointing)
        kind = "dense"
    build_s = time.time() - t0
    model.train()
    set_trainable(model, kind)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    enc = SampleEncoder(files, max_length=16384)
    rng = np.random.default_rng(0)
    folder = tmp / "img"
    folder.mkdir()
    samples = []
    for i in range(args.batch):
        arr = rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        samples.append(enc.encode({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in the picture, in one sentence?"},
            {"from": "gpt", "value": "A square of coloured noise on a plain background."}]},
            folder))
    batch = collate(samples, enc.tokenizer.pad_token_id)
    configs = ConfigSampler([list(c) for c in cfg.sa_configs], "uniform", 0)
    times, sa = [], []
    for s in range(args.steps):
        t = time.time()
        c = configs.at(s)
        loss, n = step(batch, c)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t)
        sa.append([i + 1 for i in c] if kind == "stage2" else "all")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    steady = times[1:] or times
    print(json.dumps({
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "tokens_per_sample": int(batch.input_ids.shape[1]),
        "image_tokens": int((batch.input_ids[0] == enc.image_token_id).sum()),
        "trainable_params": sum(q.numel() for q in params),
        "gradient_checkpointing": not args.no_checkpointing,
        "build_seconds": round(build_s, 1), "first_step_seconds": round(times[0], 2),
        "seconds_per_step": round(sum(steady) / len(steady), 2),
        "samples_per_second": round(args.batch * len(steady) / sum(steady), 4),
        "sa_layers_per_step": sa, "peak_rss_gb": round(peak_gb, 2),
        "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
