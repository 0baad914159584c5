"""Per-request VISOR state inside a vLLM worker, carried by a no-op V1 logits processor.

Why a logits processor. On the V1 model runner (the one vLLM-CPU uses) no request id or
``SamplingParams`` reaches ``model.forward``. V1 logits processors, however, see every request
join, leave and move in the persistent batch (``BatchUpdate``), in the worker process, *before*
the forward pass, with the same row order as the forward pass (``gpu_model_runner.py``
``_update_states -> input_batch.refresh_metadata``). `VisorBudgetBridge` mirrors each row's
budget (parsed from ``extra_args`` = the OpenAI ``vllm_xargs``) into `RowState` tensors, and
keeps the SA configuration the model chose for the row at its first step aligned with the row
as vLLM moves it, until the request leaves. A preempted request leaves and re-joins: its
state is rebuilt and its first step re-runs the router on the same prompt, so it re-derives
the same configuration.

It never changes logits (``is_argmax_invariant``). It is loaded for every model through the
``vllm.logits_processors`` entry point and is inert unless the served model is VISOR.

Footguns.
* `RowState` is process-global (one per worker process: each tensor-parallel rank has its own
  persistent batch).
* The entry point is read by *both* model runners. Model Runner V2 (vLLM's GPU default) rejects
  V1-interface classes and would then refuse to start *any* model, so the bridge also
  implements the V2 interface -- there it only validates budgets. VISOR itself needs the V1
  runner in vLLM 0.32 (the model says so at load); on MRV2 the channel would be a model state
  class (``get_model_state_cls``) -- see the README.
"""

from __future__ import annotations

import torch

from visor_vllm.budget import Budget, BudgetError, allowed_configs, parse_budget

try:  # vllm is an optional dependency of the package as a whole
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsProcessor as LogitsProcessorV2,
    )
except ImportError:  # pragma: no cover - reference-only installs
    LogitsProcessor = LogitsProcessorV2 = object  # type: ignore[misc,assignment]

STATE: RowState | None = None
# The checkpoint's VisorConfig in the API-server process, set by the multimodal processing
# info when vLLM builds it, so budget validation can check layer numbers at admission.
FRONTEND_CONFIG = None


class RowState:
    """Row-indexed tensors (row = position in vLLM's persistent batch)."""

    def __init__(self, cfg, max_rows: int, device: torch.device | str = "cpu"):
        L, C = cfg.num_layers, len(cfg.sa_configs)
        self.cfg = cfg
        kw = dict(dtype=torch.bool, device=device)
        self.config_masks = torch.zeros(C, L, **kw)                      # [C, L]
        for c, layers in enumerate(cfg.sa_configs):
            self.config_masks[c, layers] = True
        self.always_on = torch.zeros(L, **kw)
        self.always_on[cfg.always_on_sa_layers] = True
        self.prompt_len = torch.zeros(max_rows, dtype=torch.long, device=device)  # [R]
        self.allowed = torch.ones(max_rows, C, **kw)                    # [R, C] router choices
        self.explicit = torch.zeros(max_rows, L, **kw)                  # [R, L] visor_sa_layers
        self.has_explicit = torch.zeros(max_rows, **kw)                 # [R]
        self.sa_mask = torch.zeros(max_rows, L, **kw)                   # [R, L] decided at step 1
        self.config_index = torch.full((max_rows,), -1, dtype=torch.long, device=device)  # [R]
        self.budget_source = ["auto"] * max_rows

    _ROW_TENSORS = ("prompt_len", "allowed", "explicit", "has_explicit", "sa_mask", "config_index")

    def set_row(self, row: int, budget: Budget, prompt_len: int) -> None:
        self.prompt_len[row] = prompt_len
        self.has_explicit[row] = budget.mode == "layers"
        self.explicit[row] = False
        if budget.sa_layers is not None:
            self.explicit[row, list(budget.sa_layers)] = True
        self.allowed[row] = torch.tensor(allowed_configs(self.cfg, budget), device=self.allowed.device)
        self.sa_mask[row] = False
        self.config_index[row] = -1
        self.budget_source[row] = budget.mode

    def clear_row(self, row: int) -> None:
        self.set_row(row, Budget(), 0)

    def move(self, src: int, dst: int, swap: bool) -> None:
        for name in self._ROW_TENSORS:
            t = getattr(self, name)
            if swap:
                t[[src, dst]] = t[[dst, src]]
            else:
                t[dst] = t[src]
        s = self.budget_source
        s[src], s[dst] = (s[dst], s[src]) if swap else (s[src], s[src])


class VisorBudgetBridge(LogitsProcessor, LogitsProcessorV2):
    """V1: tracks rows (see module docstring). V2: budget validation only (see footguns)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            parse_budget(sampling_params.extra_args, FRONTEND_CONFIG)
        except BudgetError as e:
            raise ValueError(str(e)) from None

    def __init__(self, vllm_config, *args):
        """V1: ``(vllm_config, device, is_pin_memory)``; V2: ``(vllm_config, req_states)``."""
        global STATE
        hf = vllm_config.model_config.hf_config
        self.active = getattr(hf, "model_type", None) == "visor" and len(args) == 2
        if self.active:
            STATE = RowState(hf, vllm_config.scheduler_config.max_num_seqs, args[0])

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.active or batch_update is None:
            return
        for row in batch_update.removed:
            STATE.clear_row(row)
        for row, params, prompt_ids, _out in batch_update.added:
            extra = getattr(params, "extra_args", None) if params is not None else None
            STATE.set_row(row, parse_budget(extra, STATE.cfg), len(prompt_ids or ()))
        for src, dst, direction in batch_update.moved:
            STATE.move(src, dst, swap=direction == MoveDirectionality.SWAP)
