"""How a training run is spread over processes: one of five engines, chosen by the launch.

* ``single``: ``visor-vllm train R.yaml`` or ``python -m visor_vllm.training R.yaml``; nothing
  wraps the model.
* ``ddp``: ``accelerate launch --config_file deploy/accelerate/ddp.yaml -m visor_vllm.training
  R.yaml`` (or torchrun); Accelerate's DDP.
* ``fsdp2``: the same with ``deploy/accelerate/fsdp2.yaml`` (or ``VISOR_TRAIN_ENGINE=fsdp2
  torchrun ...``); ``fully_shard`` per layer, then the root, applied here as torchtitan does.
* ``deepspeed-zero2`` / ``deepspeed-zero3``: the same with
  ``deploy/accelerate/deepspeed-zero{2,3}.yaml``; Accelerate's DeepSpeed engine.

What the trainer (`visor_vllm.training.trainer`) asks of an engine: `prepare` (wrap the step
module, build AdamW over its trainable parameters; then ``params`` are those parameters as the
wrapped module holds them and ``raw_opt`` the torch optimizer the LR schedule drives), `autocast`, `no_sync`, `backward`,
`clip_grad_norm` (a device tensor, never read back), `optimizer_step`, `all_sum`, `save` /
`load` (resumable state), `full_state_dict` (the export), `barrier`, `close`.

FSDP2, applied here and not by Accelerate: Accelerate ignores its FSDP plugin on CPU (the model
comes back as DDP, ``shared/research/distributed-and-eval-on-cpu.md``), so a test through the
plugin would test DDP, and its wrap policy sees modules, not how the trainer calls them. Here:
every ``DecoderLayer`` (VISOR) or ``Qwen2DecoderLayer`` (dense) and every ``SiglipEncoderLayer``
is a unit, then the root; the recipe's precision becomes FSDP2's ``MixedPrecisionPolicy``
(bf16 parameters in compute, fp32 gradient reduction, fp32 master weights); optimizer,
clipping and the stage-1 gradient stop act on the sharded parameters; resumable state is
sharded (``torch.distributed.checkpoint``); the export gathers one full state dict on rank 0.
Runs with gloo on CPU and NCCL on GPUs, and with one process.

Footguns.
* A parameter of an FSDP2 unit is a DTensor outside its unit's forward: call a layer's module
  (``layer(...)``), never its submodules from outside (the batched forward does;
  `visor_vllm.model.layers`).
* DeepSpeed clips inside its own step (``gradient_clipping`` from the recipe), accumulates
  nothing here (one micro-step per optimizer step), keeps bf16 weights in the module (its
  export is what ZeRO gathers: bf16 under ``mixed_precision: bf16``), and reads its gradient
  norm back to the host inside its step (measured: 3 syncs a step), which this code cannot
  remove.
* On a CPU (``DS_ACCELERATOR=cpu``), Accelerate must be given the gloo backend by name, or
  each rank counts itself a job of one process (measured with Accelerate 1.15).
* The optimizer is AdamW, fused where torch has the kernel (CUDA and CPU, plain and DTensor
  parameters): the non-fused forms read their step counter on the host every step.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import torch
from torch import nn

from visor_vllm import envs

ENGINES = ("single", "ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3")
# modules that become FSDP2 units (the reference's layer, transformers' Qwen2 and SigLIP layers)
UNIT_CLASSES = ("DecoderLayer", "Qwen2DecoderLayer", "SiglipEncoderLayer")


class EngineError(ValueError):
    """A launch this trainer cannot run (FSDP1, an unknown VISOR_TRAIN_ENGINE, ...)."""


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to ``max_norm``; the total norm, a device tensor.

    Works on plain and DTensor (FSDP2) gradients alike: the norm of sharded gradients is
    reduced over the shards (``full_tensor``), as torchtitan does. No host read.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, True if grads else None)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, True if grads else None)
    return total


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW over ``groups``; fused where this torch has the kernel for their device."""
    device = next(p for g in groups for p in g["params"]).device
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    except (RuntimeError, ValueError):  # e.g. a dtype the fused kernel does not take
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP2 units (`UNIT_CLASSES`), in forward order."""
    return [m for m in module.modules() if type(m).__name__ in UNIT_CLASSES]


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` every transformer block of ``module`` in place (the `shard_units`:
    VISOR's and Qwen2's decoder layers, SigLIP's encoder layers), as torchtitan does; the
    number compiled.

    Why per block and not the model: the blocks are where the time goes and they trace whole
    (one graph a block, shapes dynamic: batches are padded to their longest prompt), while the
    code around them (transformers' mask building and image splitting, VISOR's packing) breaks
    graphs and recompiles on every new batch layout. Compiled blocks are the same modules, so
    FSDP2's ``fully_shard`` and the state dict see the same names (torchtitan compiles before
    sharding, as the trainer does). Measured on the synthetic recipe's dense step (2-vCPU Xeon,
    batch 32): 248 ms eager, 185 ms per-block compiled, 213 ms with the whole language model
    compiled (docs/training.md, "A compiled trainer").

    Footguns. The first steps compile (~15 s for the synthetic preset on 2 cores, each new
    variant of a block again: VISOR's SA/CA layers with and without SA); a CPU needs a C++
    compiler (inductor's), a GPU Triton. Fused kernels round differently from eager ones
    (~1e-7 relative), so a compiled run is not bit-identical to an eager one.
    """
    from torch._dynamo import config as dynamo_config

    units = shard_units(module)
    # one code object serves every block, and a VISOR block's variants (SA or CA layer, run
    # with or without SA, each layer's own guards) share its cache: past dynamo's default
    # limit of 8 the rest would silently run eager
    limit = max(dynamo_config.recompile_limit, 4 * len(units))
    dynamo_config.recompile_limit = limit
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * limit)
    for unit in units:
        unit.compile(dynamic=True)
    return len(units)


def launch_engine() -> str:
    """The engine this process was launched for: `envs` (VISOR_TRAIN_ENGINE, then Accelerate's
    launch variables), with ``single``/``ddp`` decided by the process count later."""
    forced = envs.VISOR_TRAIN_ENGINE
    if forced:
        if forced not in ("fsdp2", "accelerate"):
            raise EngineError(f"VISOR_TRAIN_ENGINE={forced!r}: set 'fsdp2', 'accelerate' or "
                              "nothing (the launch decides)")
        return forced
    if envs.ACCELERATE_USE_FSDP:
        if envs.FSDP_VERSION != 2:
            raise EngineError("FSDP1 is not supported: launch with deploy/accelerate/fsdp2.yaml "
                              "(fsdp_version: 2)")
        return "fsdp2"
    return "accelerate"


def make_engine(mixed_precision: str):
    """The engine for this launch and the recipe's precision (``no`` | ``bf16``)."""
    if launch_engine() == "fsdp2":
        return FSDP2Engine(mixed_precision)
    return AccelerateEngine(mixed_precision)


class AccelerateEngine:
    """``single``, ``ddp`` and ``deepspeed-zero{2,3}``: Hugging Face Accelerate drives them."""

    def __init__(self, mixed_precision: str):
        from accelerate import Accelerator, InitProcessGroupKwargs

        handlers = []
        cpu = not torch.cuda.is_available()
        if cpu and envs.ACCELERATE_USE_DEEPSPEED:
            # DeepSpeed on a CPU (DS_ACCELERATOR=cpu): cpu=True would run one plain process, and
            # without a named backend Accelerate counts each rank as a job of one (measured).
            cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
        self.acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)
        kind = self.acc.distributed_type.name
        if kind == "DEEPSPEED":
            self.name = f"deepspeed-zero{self.acc.state.deepspeed_plugin.zero_stage}"
        elif kind == "FSDP":  # only reachable with VISOR_TRAIN_ENGINE=accelerate
            raise EngineError("Accelerate's FSDP plugin is not used by this trainer: unset "
                              "VISOR_TRAIN_ENGINE so the trainer applies FSDP2 itself")
        else:  # MULTI_GPU / MULTI_CPU wrap the model in DDP, one process included
            self.name = "single" if kind == "NO" else "ddp"
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device, self.is_main = self.acc.device, self.acc.is_main_process
        self.module = self.opt = None

    @property
    def deepspeed(self) -> bool:
        return self.name.startswith("deepspeed")

    def prepare(self, step_module: nn.Module, groups: list[dict], lr: float,
                micro_batch: int, accum: int, max_grad_norm: float | None):
        if self.deepspeed:
            if accum > 1:
                from visor_vllm.training.model import TrainingError

                raise TrainingError("this loop accumulates gradients itself; under DeepSpeed "
                                    "set micro_batch_size = batch_size / processes")
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = micro_batch
            ds["train_batch_size"] = micro_batch * self.world
            ds["gradient_accumulation_steps"] = 1
            ds["gradient_clipping"] = float(max_grad_norm or 0.0)
        step_module = step_module.to(self.device)
        self.raw_opt = adamw(groups, lr)
        self.params = [p for g in groups for p in g["params"]]
        self.module, self.opt = self.acc.prepare(step_module, self.raw_opt)
        return self.module

    def summary(self) -> dict:
        """What wraps the model, for ``trainer_state.json``."""
        return {"engine": self.name, "processes": self.world,
                "wrapper": type(self.module).__name__}

    def autocast(self):
        return self.acc.autocast()

    def no_sync(self):
        return self.acc.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor | None:
        if self.deepspeed:  # DeepSpeed clipped inside its step (backward ran it): its norm
            norm = self.module.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)
        return clip_grad_norm(params, max_norm)

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t, "sum") if self.world > 1 else t

    def save(self, path: Path) -> None:
        self.acc.save_state(str(path))

    def load(self, path: Path) -> None:
        self.acc.load_state(str(path))

    def full_state_dict(self) -> dict | None:
        """The unwrapped step module's full state dict on the main process (ZeRO-3 gathers)."""
        state = self.acc.get_state_dict(self.module)
        return state if self.is_main else None

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def free(self) -> None:
        self.acc.free_memory()

    def close(self) -> None:
        self.acc.end_training()  # gloo jobs abort at exit without it (shared/research)


class FSDP2Engine:
    """``fsdp2``: ``fully_shard`` per layer and on the root, applied by the trainer itself."""

    name = "fsdp2"

    def __init__(self, mixed_precision: str):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            if envs.RANK is None:  # one process, launched without torchrun
                for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
                    envs.export(k, v)
        local = envs.LOCAL_RANK
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:  # before the process group: NCCL binds this rank's GPU, not GPU 0
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo",
                                    **({"device_id": self.device} if cuda else {}))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                   if mixed_precision == "bf16" else MixedPrecisionPolicy())
        self.reshard_after_forward = envs.FSDP_RESHARD_AFTER_FORWARD
        self.module = self.opt = None

    def prepare(self, step_module: nn.Module, groups: list[dict], lr: float,
                micro_batch: int, accum: int, max_grad_norm: float | None):
        from torch.distributed.fsdp import fully_shard

        self.units = shard_units(step_module)
        for unit in self.units:
            fully_shard(unit, mesh=self.mesh, mp_policy=self.mp,
                        reshard_after_forward=self.reshard_after_forward)
        fully_shard(step_module, mesh=self.mesh, mp_policy=self.mp,
                    reshard_after_forward=self.reshard_after_forward)
        # the groups hold the parameter objects fully_shard replaced: rebuild them by name
        by_name = dict(step_module.named_parameters())
        groups = [{**g, "params": [by_name[n] for n in g["names"]]} for g in groups]
        self.module, self.opt = step_module, adamw(groups, lr)
        self.raw_opt, self.params = self.opt, [p for g in groups for p in g["params"]]
        return self.module

    def summary(self) -> dict:
        """What wraps the model, for ``trainer_state.json``: every parameter a dim-0 DTensor shard."""
        from torch.distributed.tensor import DTensor, Shard

        params = list(self.module.parameters())
        sharded = [p for p in params if isinstance(p, DTensor) and p.placements == (Shard(0),)]
        return {"engine": self.name, "processes": self.world, "wrapper": "fully_shard",
                "fsdp_units": len(self.units) + 1, "parameters": len(params),
                "dtensor_parameters": len(sharded),
                "param_dtype": str(self.mp.param_dtype or "float32").removeprefix("torch.")}

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy casts the parameters

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(params, max_norm)

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def _states(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.opt)
        return {"model": model, "optim": optim}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(), checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._states()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def free(self) -> None:
        self.module = self.opt = None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
