"""The project's GPU check: training at real size under DDP and FSDP2, export, resume, speed.

    bash scripts/gpu_check.sh                        # a GPU machine: visor-0.5b, bf16 (< 8 min)
    bash scripts/gpu_check.sh --cpu --preset tiny    # the same plumbing on a CPU (default tests)

Needs torch, transformers, accelerate, safetensors, tokenizers, pillow, pyyaml and tensorboard;
not vLLM (the package runs from this checkout, ``PYTHONPATH`` is set by the .sh). Steps, each
printing one JSON line ``{"check": ..., "ok": ..., "seconds": ...}`` (and `--out`/check.jsonl):

1. ``build``: LLaVA-OneVision of the preset with random weights, converted by ``visor-vllm
   convert`` (the real converter) into a VISOR checkpoint; a small synthetic dataset.
2. ``train-ddp``: stage 1 + stage 2 under ``deploy/accelerate/ddp.yaml``, one process.
3. ``train-fsdp2``: the same under ``deploy/accelerate/fsdp2.yaml``, killed after stage 1 and two
   stage-2 steps (``--stop-after``) and relaunched: it must resume from the saved sharded state;
   a third launch must find both stages done.
4. ``export``: the FSDP2 run's exported checkpoint loads into the reference model, and the
   reference's logits equal the trainer's batched forward on the same prompts (fp32); the DDP
   and FSDP2 exports agree to 1e-3 on a CPU (fp32); on a GPU (bf16: DDP's autocast and FSDP2's
   policy round differently) their difference is reported, not checked.
5. ``speed``: `benchmarks/train_throughput.py` (prefill and training step, VISOR min/max vs
   dense) at the preset's shapes, its JSON lines passed through.
6. ``speed-compiled`` (GPU only): the training step again with every block compiled (the
   recipe's ``compile: true``), at the preset's second shape.

The last line is ``{"gpu_check": "passed" | "failed", "failed": [...], "seconds": ...}``; exit
status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# preset -> (batch, steps per stage, throughput shapes)
PLANS = {"visor-0.5b": (8, 4, "1x384,8x384,1x1152,4x1152"),
         "tiny": (4, 3, "1x40,4x40")}


class Check:
    """Runs the checks, prints and records one JSON line each."""

    def __init__(self, out: Path):
        self.out, self.failed, self.t0 = out, [], time.time()
        self.log = open(out / "check.jsonl", "a")

    def emit(self, rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, fn) -> object:
        t = time.time()
        try:
            info = fn() or {}
            ok = True
        except Exception as e:  # a failed check is reported, and the others still run
            info, ok = {"error": f"{type(e).__name__}: {e}"[-3000:]}, False
            self.failed.append(name)
        self.emit({"check": name, "ok": ok, "seconds": round(time.time() - t, 1), **info})
        return info if ok else None


def sh(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **(env or {})}
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def must(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: {done.stderr[-2500:]}")
    return done


def build(out: Path, preset: str) -> dict:
    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.training.synthetic import write_dataset

    real = preset != "tiny"
    dense = build_tiny_llava_onevision(out / "llava", real_sizes=real, random_weights=real)
    convert(dense, out / "visor", preset=preset, init="converter" if real else "random",
            progress=False)
    write_dataset(out / "data", seed=0, n_train=64, n_val=4, n_test=4, turns=2, progress=False)
    return {"preset": preset, "checkpoint": str(out / "visor")}


def recipe(out: Path, name: str, batch: int, steps: int, bf16: bool) -> Path:
    import yaml

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "recipe_version": 1, "seed": 0, "init": str(out / "visor"),
        "data": {"train": str(out / "data" / "train.jsonl"), "max_length": 8192,
                 "num_workers": 1},
        "output_dir": str(out / name), "save_every": 2, "log_every": 1,
        "mixed_precision": "bf16" if bf16 else "no",
        "stages": [{"kind": "stage1", "steps": steps, "lr": 1e-4, "batch_size": batch,
                    "configs": "max"},
                   {"kind": "stage2", "steps": steps, "lr": 1e-5, "batch_size": batch,
                    "configs": "viable"}]}, sort_keys=False))
    return path


def launch(config: str, recipe_path: Path, *extra: str, cpu: bool) -> subprocess.CompletedProcess:
    env = {"VISOR_CHECK_HOST_SYNC": "count"}  # reported (a GPU may find what a CPU cannot)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return sh([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               ROOT / "deploy" / "accelerate" / f"{config}.yaml", "--num_processes", "1",
               "--main_process_port", "0", "-m", "visor_vllm.training", recipe_path,
               "--no-progress", *extra], env)


def trained(out: Path, name: str) -> dict:
    state = json.loads((out / name / "stage2" / "model" / "trainer_state.json").read_text())
    lines = [json.loads(x) for x in (out / name / "stage2" / "metrics.jsonl").read_text()
             .splitlines()]
    return {"engine": state["engine"], "wrapper": state["wrapper"],
            "processes": state["processes"], "mixed_precision": state["mixed_precision"],
            "losses": [round(x["loss"], 4) for x in lines],
            "samples_per_s": round(lines[-1]["samples_per_s"], 2),
            "host_syncs_in_steps": lines[-1].get("host_syncs"),
            **{k: state[k] for k in ("dtensor_parameters", "parameters") if k in state}}


def train_ddp(out: Path, batch: int, steps: int, bf16: bool, cpu: bool) -> dict:
    must(launch("ddp", recipe(out, "ddp", batch, steps, bf16), cpu=cpu), "the DDP launch")
    return trained(out, "ddp")


def train_fsdp2(out: Path, batch: int, steps: int, bf16: bool, cpu: bool) -> dict:
    r = recipe(out, "fsdp2", batch, steps, bf16)
    killed = launch("fsdp2", r, "--stop-after", str(steps + 2), cpu=cpu)
    if killed.returncode == 0 or "stopped at step 2 of stage2" not in killed.stderr:
        raise RuntimeError(f"the killed launch did not stop as asked: {killed.stderr[-2500:]}")
    resumed = must(launch("fsdp2", r, cpu=cpu), "the resumed launch")
    if "resumed from" not in resumed.stdout:
        raise RuntimeError(f"the relaunch did not resume: {resumed.stdout[-1500:]}")
    again = must(launch("fsdp2", r, cpu=cpu), "the third launch")
    if again.stdout.count("done already") < 2:
        raise RuntimeError(f"the third launch retrained: {again.stdout[-1500:]}")
    return {**trained(out, "fsdp2"), "resumed": True, "rerun_done_already": True}


def export(out: Path, cpu: bool) -> dict:
    import torch
    from safetensors.torch import load_file

    from visor_vllm.model.reference import VisorForConditionalGeneration
    from visor_vllm.training.data import (EncodedDataset, SampleEncoder, collate, load_records,
                                          with_layout)
    from visor_vllm.training.model import visor_hidden

    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = out / "fsdp2" / "stage2" / "model"
    model = VisorForConditionalGeneration.from_pretrained(str(path)).to(device)
    init = load_file(str(out / "visor" / "model.safetensors"))
    mine = load_file(str(path / "model.safetensors"))
    changed = sum(not torch.equal(init[k], mine[k].to(init[k].dtype)) for k in mine if k in init)
    nan = any(bool(torch.isnan(v.float()).any()) for v in mine.values())
    enc = SampleEncoder(path)
    ds = EncodedDataset(load_records(out / "data" / "train.jsonl"), enc, out / "data")
    items = [ds[i] for i in range(2)]
    cfg = list(model.config.sa_configs[-1])
    batch = with_layout(collate(items, enc.tokenizer.pad_token_id), model.config).to(device)
    with torch.no_grad():
        hidden, lay = visor_hidden(model, batch, cfg)
        got = model.language_model.lm_head(hidden)
        diff = 0.0
        for b, s in enumerate(items):
            ref = model(s.input_ids.to(device), s.pixel_values.to(device), s.image_sizes,
                        sa_layers=cfg).logits
            diff = max(diff, float((got[b, :ref.shape[0]] - ref).abs().max()))
    ddp = load_file(str(out / "ddp" / "stage2" / "model" / "model.safetensors"))
    engines = max(float((ddp[k].float() - mine[k].float()).abs().max()) for k in mine)
    tol = 5e-3 if device == "cuda" else 1e-4
    if nan or not changed or diff > tol:
        raise RuntimeError(f"export: nan={nan}, changed tensors={changed}, logits max |diff| "
                           f"{diff:.2e} (tolerance {tol:g})")
    if device == "cpu" and engines > 1e-3:
        raise RuntimeError(f"export: DDP and FSDP2 weights differ by {engines:.2e} (fp32, 1e-3)")
    return {"device": device, "changed_tensors": changed, "tensors": len(mine),
            "logits_max_abs_diff": diff, "ddp_vs_fsdp2_weights_max_abs_diff": engines}


def speed(check: Check, preset: str, shapes: str, cpu: bool, *extra: str) -> dict:
    args = [sys.executable, ROOT / "benchmarks" / "train_throughput.py", "--preset", preset,
            "--shapes", shapes, *extra]
    if cpu:
        args += ["--device", "cpu", "--steps", "2", "--warmup", "1"]
    done = must(sh(args, {"CUDA_VISIBLE_DEVICES": ""} if cpu else None), "train_throughput.py")
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    for r in rows:
        check.emit({"speed": r})
    return {"rows": sum("phase" in r for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (fp32), even with a GPU")
    p.add_argument("--preset", default="visor-0.5b", choices=sorted(PLANS))
    p.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--skip", default="", help="comma-separated checks to skip (e.g. speed)")
    args = p.parse_args(argv)
    import tempfile

    import torch

    out = Path(args.out or tempfile.mkdtemp(prefix="visor-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu or not torch.cuda.is_available()
    bf16 = not cpu
    batch, steps, shapes = PLANS[args.preset]
    check = Check(out)
    import accelerate
    import transformers

    check.emit({"device": "cpu" if cpu else torch.cuda.get_device_name(0),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "preset": args.preset, "out": str(out),
                "precision": "bf16" if bf16 else "fp32"})
    skip = set(filter(None, args.skip.split(",")))
    if check.run("build", lambda: build(out, args.preset)) is not None:
        check.run("train-ddp", lambda: train_ddp(out, batch, steps, bf16, cpu))
        check.run("train-fsdp2", lambda: train_fsdp2(out, batch, steps, bf16, cpu))
        if not {"train-ddp", "train-fsdp2"} & set(check.failed):
            check.run("export", lambda: export(out, cpu))
    if "speed" not in skip:
        check.run("speed", lambda: speed(check, args.preset, shapes, cpu))
    if "speed-compiled" not in skip and not cpu:  # the recipe's `compile: true`, one shape
        check.run("speed-compiled", lambda: speed(check, args.preset, shapes.split(",")[1],
                                                  cpu, "--phases", "train", "--compile",
                                                  "--warmup", "4"))
    check.emit({"gpu_check": "failed" if check.failed else "passed", "failed": check.failed,
                "seconds": round(time.time() - check.t0, 1)})
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
