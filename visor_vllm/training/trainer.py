"""The training loop: one recipe (`visor_vllm.training.recipe`) on one engine (`engines`).

What. `run(recipe)` trains the recipe's stages in order. Each stage: load the model (VISOR from
its checkpoint dir, or transformers' LLaVA-OneVision for ``dense``), the stage's step module
(which freezes what the stage does not train), the engine's ``prepare`` (nothing, DDP, FSDP2
applied here, or DeepSpeed: `visor_vllm.training.engines`, chosen by the launch), AdamW (no
weight decay by default) with linear warm-up and cosine decay, then ``steps`` optimizer steps
of ``batch_size`` samples. Outputs, per stage, in ``output_dir/<stage name>/``:

* ``model/`` -- an HF-format checkpoint directory (config, safetensors, tokenizer, processor,
  chat template) that ``vllm serve`` / ``visor-vllm serve`` load as it is; one full checkpoint
  whatever the engine (FSDP2 and ZeRO-3 gather it on the main process);
* ``state/step-N/`` -- resumable state: the engine's (model and optimizer; sharded under FSDP2,
  ``torch.distributed.checkpoint``) and ``trainer.pt`` (step, LR schedule); a rerun of the same
  recipe resumes from the newest complete one and skips stages that are done (``model/`` with
  ``trainer_state.json``);
* ``metrics.jsonl`` (one line per logged step: loss, lr, configuration, gradient norm,
  samples/s, skipped samples, the engine and the process count), ``tb/`` (TensorBoard),
  ``skipped.json`` (bad samples by reason).

Determinism (what makes kill-and-resume reproduce the uninterrupted run): the samples of step
``s`` are a pure function of ``(seed, s)`` (`StepSampler`), so is its SA configuration
(`ConfigSampler`); no other randomness is used (no dropout). The global batch is split over
processes and micro-steps, and the loss is ``sum of answer-token losses / answer tokens of the
global batch``, so N processes with the same global batch compute the same gradient as one.

Samples are encoded before the stage's first step (`visor_vllm.training.data.pre_encode`, by
the node's CPUs, each sample once), up to ``data.pre_encode_gb`` per process: encoding beside
the step cost the synthetic dense phase ~18 %. The rest are encoded as drawn, by the DataLoader.
The processed images stay for the run's later stages (`visor_vllm.training.data.PixelStore`,
up to ``data.pre_encode_gb`` too), which then only tokenize.

A step without host round trips: the batch's layout is built in the DataLoader's collate, the
step (`_StepFn`) keeps loss, token count and gradient norm on the device, and the log reads a
step's values only after the next step was queued. ``VISOR_CHECK_HOST_SYNC=1`` runs every step
under `visor_vllm.host_sync.no_host_sync` and fails on a read-back; ``=count`` counts them into
``metrics.jsonl`` (``host_syncs``) instead.

Footguns.
* `accelerate launch --cpu --num_processes 2` runs ONE process (measured, see
  ``shared/research/distributed-and-eval-on-cpu.md``); on CPU use ``--multi_gpu`` or torchrun.
* DeepSpeed: the shipped ``deploy/accelerate/deepspeed-zero*.yaml`` leave the micro batch,
  accumulation and clipping to ``auto``; the engine fills them from the recipe. This loop
  accumulates by itself, so it runs DeepSpeed only with one micro-step per optimizer step (it
  says so otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from visor_vllm import envs
from visor_vllm.allocator import tune_host_allocator
from visor_vllm.host_sync import HostSyncDetector, no_host_sync
from visor_vllm.training.data import (EncodedDataset, PixelStore, PreEncoded, SampleEncoder,
                                      Skipped, collate, default_image_folder, load_records,
                                      pre_encode, teacher_batch, with_layout)
from visor_vllm.training.engines import compile_blocks, make_engine
from visor_vllm.training.machine import usable_cpus
from visor_vllm.training.model import DenseTrainStep, TrainingError, VisorTrainStep
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
    """The step counter and the LR schedule, saved beside the engine's state (``trainer.pt``)."""

    FILE = "trainer.pt"

    def __init__(self, sched):
        self.step, self.sched = 0, sched

    def save(self, folder: Path) -> None:
        torch.save({"step": self.step, "scheduler": self.sched.state_dict()}, folder / self.FILE)

    def load(self, folder: Path) -> None:
        d = torch.load(folder / self.FILE, weights_only=True)
        self.step = int(d["step"])
        self.sched.load_state_dict(d["scheduler"])


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
        from visor_vllm import register_transformers
        from visor_vllm.model.reference import VisorForConditionalGeneration

        register_transformers()
        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("model_type") != "visor":
            raise TrainingError(f"{path} is not a VISOR checkpoint (model_type "
                                f"{cfg.get('model_type')!r}); convert it first: visor-vllm convert")
        model = VisorForConditionalGeneration.from_pretrained(str(path))
    return model.train()


def save_state(kind: str, config, state: dict, like: str | Path, out: str | Path) -> Path:
    """Write a full ``state`` dict as an HF checkpoint dir with ``like``'s tokenizer/processor."""
    from visor_vllm.checkpoints.convert import HUB_LM_HEAD, to_hub_names
    from visor_vllm.checkpoints.files import write_checkpoint

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if kind == "dense":
        state = to_hub_names(state)
    if config.tie_word_embeddings:
        state.pop(HUB_LM_HEAD, None)
    return write_checkpoint(out, config, state, like)


def save_model(kind: str, model, like: str | Path, out: str | Path) -> Path:
    """Write ``model`` as an HF checkpoint dir with ``like``'s tokenizer and processor files."""
    return save_state(kind, model.config, model.state_dict(), like, out)


def step_module_for(model, spec: StageSpec):
    """The stage's `VisorTrainStep` / `DenseTrainStep` (it freezes what the stage won't train)."""
    if spec.kind == "dense":
        return DenseTrainStep(model, spec.train_vision_tower, spec.gradient_checkpointing)
    teacher = load_model("dense", spec.teacher) if spec.distill else None
    return VisorTrainStep(model, spec.kind, spec.train_vision_tower, spec.gradient_checkpointing,
                          spec.train_language_model, teacher, spec.distill)


def param_groups(step_module, spec: StageSpec) -> list[dict]:
    """AdamW groups by name: the recipe's weight decay, none on the stage-1 embedding (a decayed
    row would move without a gradient; stage 1 trains only the routing token's row, unless
    ``train_language_model``)."""
    rows_only = bool(getattr(step_module, "trainable_rows", ()))
    decay, keep = [], []
    for name, p in step_module.named_parameters():
        if p.requires_grad:
            (keep if rows_only and "embed_tokens" in name else decay).append((name, p))
    return [{"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd}
            for g, wd in ((decay, spec.weight_decay), (keep, 0.0)) if g]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class Stopped(Exception):
    """Raised by ``stop_after`` (tests: a run killed after a saved state)."""


def run(recipe: TrainRecipe, stop_after: int | None = None, progress: bool = True,
        pixels: PixelStore | None = None) -> Path:
    """Train every stage of ``recipe``; returns the last stage's ``model/`` directory.

    ``stop_after``: raise `Stopped` once this run has taken that many optimizer steps (over all
    stages), as a kill would -- tests resume from the saved state afterwards.
    ``pixels``: processed images to reuse and add to (the recipe passes one store to its dense
    and VISOR runs); by default one for this run's stages, bounded by ``data.pre_encode_gb``.
    """
    out = Path(recipe.output_dir)
    init = Path(recipe.init)
    budget = [stop_after]
    if pixels is None:
        pixels = PixelStore(recipe.data.pre_encode_gb * 2 ** 30)
    engine = None
    tune_host_allocator()
    try:
        for i, spec in enumerate(recipe.stages):
            # One engine per stage: Accelerate saves every model, optimizer and registered
            # object it has prepared, so a shared one would save stage 1's model into stage 2's
            # state and load it back into stage 2's model on resume.
            engine = make_engine(recipe.mixed_precision)
            if i == 0 and engine.is_main:
                out.mkdir(parents=True, exist_ok=True)
                recipe.dump(out / "recipe.yaml")
            try:
                init = _train_stage(engine, recipe, spec, init, out / spec.name, budget, progress,
                                    pixels)
            finally:
                engine.barrier()
                engine.free()
    finally:
        if engine is not None:
            engine.close()
    return init


def _train_stage(engine, recipe: TrainRecipe, spec: StageSpec, init: Path, stage_dir: Path,
                 budget: list, progress: bool, pixels: PixelStore) -> Path:
    from tqdm.auto import tqdm

    final = stage_dir / "model"
    if (final / "trainer_state.json").exists():
        if engine.is_main:
            print(f"[{spec.name}] done already: {final}")
        return final
    model = load_model(spec.kind, init)
    model_config = model.config
    step_module = step_module_for(model, spec)
    if recipe.compile:
        compile_blocks(step_module)  # before the engine wraps it, as torchtitan does
    micro, accum = spec.accumulation(engine.world)
    module = engine.prepare(step_module, param_groups(step_module, spec), spec.lr, micro, accum,
                            spec.max_grad_norm)
    if getattr(step_module, "teacher", None) is not None:
        step_module.teacher.to(engine.device)  # frozen, whole on every rank (not prepared)
    params = engine.params
    sched = torch.optim.lr_scheduler.LambdaLR(engine.raw_opt, lr_lambda(spec))
    state = TrainerState(sched)
    states = stage_dir / "state"
    latest = _latest_state(states)
    if latest is not None:
        engine.load(latest)
        state.load(latest)
        if engine.is_main:
            print(f"[{spec.name}] resumed from {latest} at step {state.step}")

    records = load_records(recipe.data.train)
    folder = Path(recipe.data.image_folder or default_image_folder(recipe.data.train))
    encoder = SampleEncoder(init, max_length=recipe.data.max_length, pixels=pixels)
    ds = EncodedDataset(records, encoder, folder)
    pad = encoder.tokenizer.pad_token_id
    layout_config = None if spec.kind == "dense" else model_config
    sampler = StepSampler(len(ds), spec.batch_size, recipe.seed)
    configs = ConfigSampler(resolve_configs(model_config, spec), spec.sampling, recipe.seed)
    rank, world, main = engine.rank, engine.world, engine.is_main
    ds = _maybe_pre_encode(ds, _MicroBatches(sampler, state.step, spec.steps, rank, world, micro,
                                             accum), recipe.data, spec.name, world, main)
    workers = loader_workers(recipe.data.num_workers, ds, engine.device)
    summary = engine.summary()
    log = _Log(stage_dir, state.step, main, engine.name, world)
    bar = tqdm(total=spec.steps, initial=state.step, desc=spec.name,
               disable=not (progress and main))
    skipped_total: dict[str, int] = {}
    check_sync = envs.VISOR_CHECK_HOST_SYNC  # off | raise | count
    host_syncs = 0
    loader = iter(torch.utils.data.DataLoader(
        ds, batch_sampler=_MicroBatches(sampler, state.step, spec.steps, rank, world, micro, accum),
        collate_fn=functools.partial(_collate, pad=pad, layout_config=layout_config,
                                     teacher_token=model_config.routing_token_id
                                     if spec.distill else None),
        num_workers=workers,
        pin_memory=engine.device.type == "cuda",  # Batch.pin_memory: non_blocking copies
        prefetch_factor=2 * accum if workers else None))
    step_fn = _StepFn(engine, module, params, spec, accum)
    while state.step < spec.steps:
        step = state.step
        batches = []
        for _ in range(accum):
            b, reasons = next(loader)
            batches.append(b)
            for reason in reasons:
                skipped_total[reason] = skipped_total.get(reason, 0) + 1
        cfg = configs.at(step)
        watch = (no_host_sync(f"training step {step + 1}") if check_sync == "raise" else
                 HostSyncDetector() if check_sync == "count" else contextlib.nullcontext())
        with watch as det:
            loss_total, n_global, grad_norm = step_fn(batches, cfg)
        host_syncs += len(det.found) if check_sync == "count" else 0
        sched.step()
        state.step += 1
        log.flush()  # the previous step's values (their own event): this step stays queued
        if state.step % recipe.log_every == 0 or state.step == spec.steps or state.step == 1:
            skipped = engine.all_sum(_scalar(sum(skipped_total.values()), engine.device))
            log.defer({"stage": spec.name, "step": state.step,
                       "loss": engine.all_sum(loss_total) / n_global.clamp(min=1),
                       "lr": sched.get_last_lr()[0], "sa_layers": cfg, "grad_norm": grad_norm,
                       "answer_tokens": n_global, "skipped": skipped,
                       **({"host_syncs": host_syncs} if check_sync == "count" else {})},
                      samples=spec.batch_size * (state.step - log.resumed_step))
        bar.update()
        if log.last_loss is not None:
            bar.set_postfix(loss=f"{log.last_loss:.3f}")
        if state.step % recipe.save_every == 0 or state.step == spec.steps:
            log.flush()
            _save_state(engine, state, states, state.step)
        if budget[0] is not None:
            budget[0] -= 1
            if budget[0] <= 0:
                bar.close()
                log.close()
                raise Stopped(f"stopped at step {state.step} of {spec.name}")
    bar.close()
    log.close()
    full = engine.full_state_dict()  # a collective under FSDP2 / ZeRO-3: every rank calls it
    if main:
        full = {k.removeprefix("model."): v for k, v in full.items()}
        save_state(spec.kind, model_config, full, init, final)
        (stage_dir / "skipped.json").write_text(json.dumps(
            {"by_reason": skipped_total, "examples": ds.skipped.examples}, indent=2) + "\n")
        (final / "trainer_state.json").write_text(json.dumps(
            {"stage": spec.name, "kind": spec.kind, "steps": spec.steps, "init": str(init),
             **summary, "micro_batch_size": micro, "accumulation": accum,
             "mixed_precision": recipe.mixed_precision, "seconds": log.elapsed()},
            indent=2) + "\n")
    engine.barrier()
    return final


def _maybe_pre_encode(ds: EncodedDataset, batches, data, name: str, world: int, main: bool):
    """The samples this process will draw, encoded up front (`data.pre_encode`) by its share of
    the node's CPUs (at most 8), up to ``data.pre_encode_gb`` of tensors per process; the rest
    (or all, at 0) encoded as drawn. The main process says how many."""
    if data.pre_encode_gb <= 0:
        return ds
    indices = sorted({i for b in batches for i in b})
    if not indices:
        return ds
    local = envs.LOCAL_WORLD_SIZE or world  # processes on this node
    processes = max(1, min(8, (usable_cpus() or 1) // max(local, 1)))
    t = time.time()
    out = pre_encode(ds, indices, processes, limit_bytes=data.pre_encode_gb * 2 ** 30)
    if main:
        rest = ("" if len(out.cache) == len(indices) else
                f"; data.pre_encode_gb {data.pre_encode_gb} reached, the other "
                f"{len(indices) - len(out.cache)} encoded as drawn")
        if out.reused:
            rest += f"; the images of {out.reused} processed by an earlier stage"
        print(f"[{name}] pre-encoded {len(out.cache)} of {len(indices)} samples "
              f"({out.nbytes / 2 ** 30:.2f} GB) in {time.time() - t:.0f} s with {processes} "
              f"process(es){rest}")
    return out


def loader_workers(configured: int | None, ds, device: torch.device) -> int:
    """The DataLoader's workers: ``data.num_workers`` as set, or (None) 0 on a CPU when every
    sample of ``ds`` this process draws is pre-encoded, else 1.

    Why. With the samples encoded up front a worker only pads and lays out batches (2-5 ms a
    step), and on a CPU it does so on the cores the step's threads use: a 400-step dense stage
    of the synthetic recipe ran 8 % faster end to end with the batches made in the step's
    process (3 alternating pairs, 2-vCPU Xeon, 2026-12-07), the same losses. On a GPU the
    worker overlaps the device's work, so it stays. Same batches either way (the loader draws
    its seed from the global generator with or without workers).
    """
    if configured is not None:
        return configured
    done = isinstance(ds, PreEncoded) and ds.complete
    return 0 if device.type == "cpu" and done else 1


def _scalar(x: float, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor on ``device`` made by a fill kernel: ``torch.tensor(x, device=cuda)``
    copies from pageable host memory, which waits for the device's queue to drain."""
    return torch.full((), float(x), dtype=torch.float32, device=device)


def _collate(items, pad: int, layout_config, teacher_token: int | None = None):
    """DataLoader collate: the padded batch, VISOR's layout built here (off the step), the
    teacher's view of it where the stage distils, and the reasons of the samples dropped."""
    batch = collate(items, pad)
    if batch is not None and teacher_token is not None:
        batch = dataclasses.replace(batch, teacher=teacher_batch(batch, teacher_token, pad))
    if layout_config is not None:
        batch = with_layout(batch, layout_config)
    return batch, [x.reason for x in items if isinstance(x, Skipped)]


class _StepFn:
    """One optimizer step: forward/backward over the micro-batches, clip, AdamW.

    Reads nothing back from the device (sizes are the collate's Python ints; the loss, the
    token count and the gradient norm stay device tensors until the log reads them a step
    later), so a GPU never waits on the host inside it.
    """

    def __init__(self, engine, module, params, spec: StageSpec, accum: int):
        self.engine, self.module, self.params = engine, module, params
        self.spec, self.accum = spec, accum
        self.spare = None  # a good batch, run with weight 0 when a rank's micro-batch is empty

    def __call__(self, batches, cfg):
        engine, world = self.engine, self.engine.world
        n_local = sum(b.answer_tokens for b in batches if b is not None)
        n_global = engine.all_sum(_scalar(n_local, engine.device))
        loss_total = torch.zeros((), device=engine.device)
        for j, b in enumerate(batches):
            ctx = contextlib.nullcontext() if j == self.accum - 1 else engine.no_sync()
            with ctx:
                if b is not None:
                    self.spare = b
                    with engine.autocast():
                        loss_sum, _ = self.module(b.to(engine.device, non_blocking=True), cfg)
                    loss_total += loss_sum.detach().float()
                    loss = loss_sum * world / n_global.clamp(min=1)
                elif self.spare is not None:  # every sample bad: the same collectives, no signal
                    with engine.autocast():
                        loss_sum, _ = self.module(self.spare.to(engine.device), cfg)
                    loss = loss_sum * 0.0
                elif engine.name == "fsdp2":
                    raise TrainingError("every sample of this process's first micro-batch was "
                                        "skipped (see skipped.json's reasons)")
                else:  # a zero loss over every parameter keeps DDP's collectives aligned
                    loss = sum(p.sum() * 0.0 for p in self.params)
                engine.backward(loss)
        max_norm = self.spec.max_grad_norm
        grad_norm = engine.clip_grad_norm(self.params, max_norm) if max_norm else None
        engine.optimizer_step()
        return loss_total, n_global, grad_norm


def _latest_state(states: Path) -> Path | None:
    if not states.exists():
        return None
    done = sorted((p for p in states.glob("step-*") if (p / "DONE").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def _save_state(engine, state: TrainerState, states: Path, step: int, keep: int = 2) -> None:
    path = states / f"step-{step}"
    if engine.is_main:
        path.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    engine.save(path)
    engine.barrier()
    if engine.is_main:
        state.save(path)
        (path / "DONE").write_text(str(step))  # a state is complete only with this marker
        old = sorted((p for p in states.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    engine.barrier()


class _Log:
    """metrics.jsonl (truncated to the resumed step) and TensorBoard, main process only.

    `defer` takes a record whose values may be device tensors; `flush` reads them (one host
    sync per logged step, after the next step was queued) and writes the line. Every line says
    which engine and how many processes ran it.
    """

    def __init__(self, stage_dir: Path, resumed_step: int, main: bool, engine: str,
                 processes: int):
        self.main, self.tb, self.pending, self.last_loss = main, None, None, None
        self.resumed_step, self.engine, self.processes = resumed_step, engine, processes
        self.t0 = time.time()
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

    def elapsed(self) -> float:
        return time.time() - self.t0

    def defer(self, rec: dict, samples: int) -> None:
        """Queue ``rec``'s device values for reading: on a GPU one non-blocking copy into pinned
        memory and an event, so `flush` waits for these values only, not for the next step."""
        self.flush()
        keys = [k for k, v in rec.items() if isinstance(v, torch.Tensor)]
        vals = ready = None
        if keys:
            vals = torch.stack([rec[k].detach().float().reshape(()) for k in keys])  # [K]
            if vals.device.type == "cuda":
                host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
                host.copy_(vals, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                vals = host
        self.pending = (rec, samples, keys, vals, ready)

    def flush(self) -> None:
        if self.pending is None:
            return
        rec, samples, keys, vals, ready = self.pending
        self.pending = None
        if ready is not None:
            ready.synchronize()  # this record's copy only: later steps keep running
        if keys:
            rec = {**rec, **dict(zip(keys, vals.tolist()))}
        for k in ("answer_tokens", "skipped"):
            rec[k] = int(rec[k])
        rec.update(engine=self.engine, processes=self.processes,
                   samples_per_s=samples / max(self.elapsed(), 1e-9))
        self.last_loss = rec["loss"]
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k in ("loss", "lr", "grad_norm", "samples_per_s"):
            if rec.get(k) is not None:
                self.tb.add_scalar(f"{rec['stage']}/{k}", rec[k], rec["step"])

    def close(self) -> None:
        self.flush()
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
