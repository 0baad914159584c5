"""The training loop: one recipe (`visor_vllm.training.recipe`) on Hugging Face Accelerate.

What. `run(recipe)` trains the recipe's stages in order. Each stage: load the model (VISOR from
its checkpoint dir, or transformers' LLaVA-OneVision for ``dense``), `set_trainable`, AdamW
(no weight decay by default) with linear warm-up and cosine decay, ``accelerator.prepare`` (DDP
under ``accelerate launch``/torchrun; FSDP or DeepSpeed when the accelerate config says so),
then ``steps`` optimizer steps of ``batch_size`` samples. Outputs, per stage, in
``output_dir/<stage name>/``:

* ``model/`` -- an HF-format checkpoint directory (config, safetensors, tokenizer, processor,
  chat template) that ``vllm serve`` / ``visor-vllm serve`` load as it is;
* ``state/step-N/`` -- resumable state (model, optimizer, scheduler, RNG, the step; Accelerate's
  ``save_state``); a rerun of the same recipe resumes from the newest one and finishes stages
  that are done (``model/`` with ``trainer_state.json``) without touching them;
* ``metrics.jsonl`` (one line per logged step: loss, lr, configuration, samples/s, skipped
  samples), ``tb/`` (TensorBoard), ``skipped.json`` (bad samples by reason).

Determinism (what makes kill-and-resume reproduce the uninterrupted run): the samples of step
``s`` are a pure function of ``(seed, s)`` (`StepSampler`), so is its SA configuration
(`ConfigSampler`); no other randomness is used (no dropout). The global batch is split over
processes and micro-steps, and the loss is ``sum of answer-token losses / answer tokens of the
global batch``, so N processes with the same global batch compute the same gradient as one.

Footguns.
* `accelerate launch --cpu --num_processes 2` runs ONE process (measured, see
  ``shared/research/distributed-and-eval-on-cpu.md``); on CPU use ``--multi_gpu`` or torchrun.
  Accelerate's FSDP plugin is ignored on CPU (the model comes back as DDP).
* DeepSpeed is a GPU path: the shipped ``deploy/accelerate/deepspeed-zero*.yaml`` set the
  micro batch and accumulation to ``auto``; this loop accumulates by itself, so it runs
  DeepSpeed only with one micro-step per optimizer step (it says so otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from visor_vllm.training.data import (EncodedDataset, SampleEncoder, Skipped, collate,
                                      default_image_folder, load_records)
from visor_vllm.training.model import (DenseTrainStep, TrainingError, VisorTrainStep,
                                       set_trainable)
from visor_vllm.training.recipe import StageSpec, TrainRecipe


# ---------------------------------------------------------------------------------------------
# Deterministic schedules: samples, configurations, learning rate
# ---------------------------------------------------------------------------------------------

class StepSampler:
    """Sample indices of optimizer step ``s``: epoch permutations of ``range(n)`` seeded by epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise TrainingError("the training data has no samples")
        self.n, self.bs, self.seed = n, batch_size, seed
        self._perm: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perm = {e: torch.randperm(self.n, generator=g).tolist()}
        return self._perm[e]

    def indices(self, step: int) -> list[int]:
        start = step * self.bs
        return [self._epoch(i // self.n)[i % self.n] for i in range(start, start + self.bs)]


def resolve_configs(model_config, spec: StageSpec) -> list[list[int]]:
    """The SA configurations (0-based layer lists) a stage draws from."""
    if spec.kind == "dense":
        return [[]]
    viable = [list(c) for c in model_config.sa_configs]
    if spec.configs == "max":
        return [sorted(set().union(*map(set, viable)))]
    if spec.configs == "min":
        return [min(viable, key=len)]
    if spec.configs == "viable":
        return viable
    capable = set(model_config.sa_capable_layers)
    out = []
    for c in spec.configs:
        c = sorted(int(i) for i in c)
        if not set(c) <= capable or not set(model_config.always_on_sa_layers) <= set(c):
            raise TrainingError(f"configuration {c} is not runnable: SA-capable layers are "
                                f"{sorted(capable)}, always on {model_config.always_on_sa_layers}")
        out.append(c)
    return out


class ConfigSampler:
    """Configuration of step ``s``: uniform (the paper) or sandwich (max, min, random, random)."""

    def __init__(self, configs: list[list[int]], sampling: str, seed: int):
        self.configs, self.sampling, self.seed = configs, sampling, seed
        self.max = max(configs, key=len)
        self.min = min(configs, key=len)

    def at(self, step: int) -> list[int]:
        if len(self.configs) == 1:
            return self.configs[0]
        if self.sampling == "sandwich" and step % 4 < 2:
            return self.max if step % 4 == 0 else self.min
        return random.Random(self.seed * 7919 + step).choice(self.configs)


def lr_lambda(spec: StageSpec):
    warm = max(int(spec.steps * spec.warmup_ratio), 0)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(spec.steps - warm, 1)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


class _MicroBatches:
    """Batch sampler: this process's micro-batches of steps ``start..steps-1``, in order.

    Step ``s``'s global batch (`StepSampler`) is cut into ``processes`` equal shares, and each
    share into ``accum`` micro-batches of ``micro`` samples.
    """

    def __init__(self, sampler: StepSampler, start: int, steps: int, rank: int, world: int,
                 micro: int, accum: int):
        self.sampler, self.start, self.steps = sampler, start, steps
        self.rank, self.world, self.micro, self.accum = rank, world, micro, accum

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        share = self.micro * self.accum
        for step in range(self.start, self.steps):
            mine = self.sampler.indices(step)[self.rank * share:(self.rank + 1) * share]
            for j in range(self.accum):
                yield mine[j * self.micro:(j + 1) * self.micro]


class TrainerState:
    """The step counter, saved and restored with Accelerate's state."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, d):
        self.step = int(d["step"])


# ---------------------------------------------------------------------------------------------
# Models in and out
# ---------------------------------------------------------------------------------------------

def load_model(kind: str, path: str | Path):
    from visor_vllm.patches import apply_transformers_patches

    apply_transformers_patches()
    if kind == "dense":
        from transformers import LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32)
        if model.config.model_type != "llava_onevision":
            raise TrainingError(f"{path} is not a LLaVA-OneVision checkpoint (dense stage)")
    else:
        from visor_vllm import register
        from visor_vllm.model.reference import VisorForConditionalGeneration

        register()
        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("model_type") != "visor":
            raise TrainingError(f"{path} is not a VISOR checkpoint (model_type "
                                f"{cfg.get('model_type')!r}); convert it first: visor-vllm convert")
        model = VisorForConditionalGeneration.from_pretrained(str(path))
    return model.train()


def save_model(kind: str, model, like: str | Path, out: str | Path) -> Path:
    """Write ``model`` as an HF checkpoint dir with ``like``'s tokenizer and processor files."""
    from visor_vllm.checkpoints.convert import HUB_LM_HEAD, to_hub_names
    from visor_vllm.checkpoints.files import write_checkpoint

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if kind == "dense":
        state = to_hub_names(state)
    if model.config.tie_word_embeddings:
        state.pop(HUB_LM_HEAD, None)
    return write_checkpoint(out, model.config, state, like)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class Stopped(Exception):
    """Raised by ``stop_after`` (tests: a run killed after a saved state)."""


def run(recipe: TrainRecipe, stop_after: int | None = None, progress: bool = True) -> Path:
    """Train every stage of ``recipe``; returns the last stage's ``model/`` directory.

    ``stop_after``: raise `Stopped` once this run has taken that many optimizer steps (over all
    stages), as a kill would -- tests resume from the saved state afterwards.
    """
    out = Path(recipe.output_dir)
    init = Path(recipe.init)
    budget = [stop_after]
    for i, spec in enumerate(recipe.stages):
        # One Accelerator per stage: Accelerate saves every model, optimizer and registered
        # object it has prepared, so a shared one would save stage 1's model into stage 2's
        # state and load it back into stage 2's model on resume.
        acc = _accelerator(recipe)
        if i == 0 and acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            recipe.dump(out / "recipe.yaml")
        try:
            init = _train_stage(acc, recipe, spec, init, out / spec.name, budget, progress)
        finally:
            acc.wait_for_everyone()
            acc.free_memory()
    acc.end_training()  # gloo jobs abort at exit without it (shared/research)
    return init


def _accelerator(recipe: TrainRecipe):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=recipe.mixed_precision, cpu=not torch.cuda.is_available())


def _train_stage(acc, recipe: TrainRecipe, spec: StageSpec, init: Path, stage_dir: Path,
                 budget: list, progress: bool) -> Path:
    from tqdm.auto import tqdm

    final = stage_dir / "model"
    if (final / "trainer_state.json").exists():
        acc.print(f"[{spec.name}] done already: {final}")
        return final
    model = load_model(spec.kind, init)
    set_trainable(model, spec.kind, spec.train_vision_tower)
    step_module = (DenseTrainStep if spec.kind == "dense" else VisorTrainStep)(
        model, spec.gradient_checkpointing)
    params = [p for p in step_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))
    micro, accum = spec.accumulation(acc.num_processes)
    if acc.distributed_type.name == "DEEPSPEED" and accum > 1:
        raise TrainingError("this loop accumulates gradients itself; under DeepSpeed set "
                            "micro_batch_size = batch_size / processes")
    step_module, opt = acc.prepare(step_module, opt)
    state = TrainerState()
    acc.register_for_checkpointing(sched, state)
    states = stage_dir / "state"
    latest = _latest_state(states)
    if latest is not None:
        acc.load_state(str(latest))
        acc.print(f"[{spec.name}] resumed from {latest} at step {state.step}")

    records = load_records(recipe.data.train)
    folder = Path(recipe.data.image_folder or default_image_folder(recipe.data.train))
    encoder = SampleEncoder(init, max_length=recipe.data.max_length)
    ds = EncodedDataset(records, encoder, folder)
    pad = encoder.tokenizer.pad_token_id
    sampler = StepSampler(len(ds), spec.batch_size, recipe.seed)
    configs = ConfigSampler(resolve_configs(model.config, spec), spec.sampling, recipe.seed)
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process
    log = _Log(stage_dir, state.step, main)
    bar = tqdm(total=spec.steps, initial=state.step, desc=spec.name, disable=not (progress and main))
    skipped_total = {}
    t0, seen = time.time(), 0
    loader = iter(torch.utils.data.DataLoader(
        ds, batch_sampler=_MicroBatches(sampler, state.step, spec.steps, rank, world, micro, accum),
        collate_fn=lambda items: (collate(items, pad),
                                  [x.reason for x in items if isinstance(x, Skipped)]),
        num_workers=recipe.data.num_workers, prefetch_factor=2 * accum if recipe.data.num_workers else None))
    while state.step < spec.steps:
        step = state.step
        batches = []
        for _ in range(accum):
            b, reasons = next(loader)
            batches.append(b)
            for reason in reasons:
                skipped_total[reason] = skipped_total.get(reason, 0) + 1
        n_local = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches if b is not None)
        n_global = acc.reduce(torch.tensor(float(n_local), device=acc.device), "sum")
        cfg = configs.at(step)
        loss_total = torch.zeros((), device=acc.device)
        for j, b in enumerate(batches):
            ctx = contextlib.nullcontext() if j == accum - 1 else acc.no_sync(step_module)
            with ctx:
                if b is None:  # every sample bad: a zero loss keeps DDP's collectives aligned
                    loss = sum(p.sum() * 0.0 for p in params)
                else:
                    with acc.autocast():
                        loss_sum, _ = step_module(b.to(acc.device), cfg)
                    loss_total += loss_sum.detach().float()
                    loss = loss_sum * world / n_global.clamp(min=1)
                acc.backward(loss)
        grad_norm = (acc.clip_grad_norm_(params, spec.max_grad_norm)
                     if spec.max_grad_norm else None)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        seen += spec.batch_size
        loss_value = float(acc.reduce(loss_total, "sum") / n_global.clamp(min=1))
        if state.step % recipe.log_every == 0 or state.step == spec.steps or state.step == 1:
            skipped = acc.reduce(torch.tensor(float(sum(skipped_total.values())),
                                              device=acc.device), "sum")
            log.write({"stage": spec.name, "step": state.step, "loss": loss_value,
                       "lr": sched.get_last_lr()[0], "sa_layers": cfg,
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "answer_tokens": int(n_global), "skipped": int(skipped),
                       "processes": world,
                       "samples_per_s": seen / max(time.time() - t0, 1e-9)})
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if state.step % recipe.save_every == 0 or state.step == spec.steps:
            _save_state(acc, states, state.step)
        if budget[0] is not None:
            budget[0] -= 1
            if budget[0] <= 0:
                bar.close()
                log.close()
                raise Stopped(f"stopped at step {state.step} of {spec.name}")
    bar.close()
    log.close()
    if main:
        save_model(spec.kind, acc.unwrap_model(step_module).model, init, final)
        (stage_dir / "skipped.json").write_text(json.dumps(
            {"by_reason": skipped_total, "examples": ds.skipped.examples}, indent=2) + "\n")
        (final / "trainer_state.json").write_text(json.dumps(
            {"stage": spec.name, "kind": spec.kind, "steps": spec.steps, "init": str(init),
             "processes": world, "micro_batch_size": micro, "accumulation": accum,
             "seconds": time.time() - t0}, indent=2) + "\n")
    acc.wait_for_everyone()
    return final


def _latest_state(states: Path) -> Path | None:
    if not states.exists():
        return None
    done = sorted((p for p in states.glob("step-*") if (p / "DONE").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def _save_state(acc, states: Path, step: int, keep: int = 2) -> None:
    path = states / f"step-{step}"
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (path / "DONE").write_text(str(step))  # a state is complete only with this marker
        old = sorted((p for p in states.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()


class _Log:
    """metrics.jsonl (truncated to the resumed step) and TensorBoard, main process only."""

    def __init__(self, stage_dir: Path, resumed_step: int, main: bool):
        self.main, self.tb = main, None
        if not main:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.path = stage_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=resumed_step + 1)

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k in ("loss", "lr", "grad_norm", "samples_per_s"):
            if rec.get(k) is not None:
                self.tb.add_scalar(f"{rec['stage']}/{k}", rec[k], rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# CLI: visor-vllm train RECIPE.yaml  (multi-process: accelerate launch -m visor_vllm.training)
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the stages of a recipe file (resumes)")
    _train_args(p)
    p.set_defaults(func=_cli_train)


def _train_args(p) -> None:
    p.add_argument("recipe", help="recipe YAML (see visor_vllm/training/recipe.py)")
    p.add_argument("--output-dir", help="override the recipe's output_dir")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many optimizer steps of a stage (tests, debugging)")
    p.add_argument("--no-progress", action="store_true")


def _cli_train(args) -> int:
    import sys

    from visor_vllm.training.data import DataError
    from visor_vllm.training.recipe import RecipeError

    try:
        recipe = TrainRecipe.load(args.recipe)
        if args.output_dir:
            recipe.output_dir = args.output_dir
        out = run(recipe, stop_after=args.stop_after, progress=not args.no_progress)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return 3
    except (RecipeError, TrainingError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
