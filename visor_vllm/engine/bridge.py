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

At a request's first step the model also asks `RowState` to narrow FLOP-capped budgets to what
fits the request's token counts (`apply_flops_caps`) and to write the request's receipt
(`emit_receipts`, `visor_vllm.engine.receipts`) once the router has decided.

No host synchronisation in a steady decode step (a captured graph can replay it). Which rows
are new is known on the host: `set_row` puts a joining row in ``joined``, and the step's side
channels do per-row work (receipts, prefill FLOPs, request events; reads of device state)
only when ``joined`` is not empty, then `step_done` empties it. Decode FLOPs are added on the
device (``decode_flops``) every step and read into the stats file (`flush`) when the batch
changes: a row joins, or vLLM's batch update (V1) or ``remove_request`` (MRV2) runs -- host
events outside the forward. A V1 update may show a finished request only as a move (vLLM
reuses or condenses freed slots before processors see them), so every update flushes; a
steady decode step has no update. vLLM runs one more step after the last request finishes,
to free it, so nothing stays unflushed when the engine goes idle.

It never changes logits (``is_argmax_invariant``). It is loaded for every model through the
``vllm.logits_processors`` entry point and is inert unless the served model is VISOR.

Footguns.
* `RowState` is process-global (one per worker process: each tensor-parallel rank has its own
  persistent batch).
* The entry point is read by *both* model runners. Model Runner V2 (vLLM's GPU default) rejects
  V1-interface classes and would then refuse to start *any* model, so the bridge also
  implements the V2 interface -- there it only validates budgets. On MRV2 the channel is
  `visor_vllm.engine.model_state.VisorModelState` instead, writing the same `RowState` at the
  request's state index ("slot"); every `RowState` method that the model calls takes the
  batch's row -> slot map (on V1, the identity).
"""

from __future__ import annotations

import torch

from visor_vllm.engine import receipts, stats
from visor_vllm.model.budget import (Budget, BudgetError, allowed_configs, default_budget, flops_fit,
                                     parse_budget)

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
    """Slot-indexed tensors (slot = the persistent-batch row on V1, the state index on MRV2)."""

    def __init__(self, cfg, max_rows: int, device: torch.device | str = "cpu", model_path: str = ""):
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
        self.cap_met = torch.ones(max_rows, **kw)                       # [R] FLOP cap met
        # [R] a request holds the slot: a row of a warm-up, capture or padded batch that no
        # request joined counts no FLOPs (read on the device, so a replayed graph obeys it)
        self.live = torch.zeros(max_rows, **kw)
        # Python-side, per row: read once per request (first step), never per token
        self.budgets: list[Budget] = [Budget()] * max_rows
        self.receipts: list[str | None] = [None] * max_rows
        self.n_routing: list[int] = [0] * max_rows
        self.resumed: list[bool] = [False] * max_rows  # re-joined after preemption
        # executed-FLOP accounting (`visor_vllm.engine.stats`): a decode step of row r at text
        # context c costs decode_a[r] + b*c (VISOR) and dense_a[r] + b*c (dense), set at step 1
        self.decode_a = torch.zeros(max_rows, dtype=torch.float64, device=device)  # [R]
        self.dense_a = torch.zeros(max_rows, dtype=torch.float64, device=device)   # [R]
        self.model_path = model_path  # the checkpoint, named in receipts
        from visor_vllm.model.flops import decode_step_affine

        self.decode_slope = float(decode_step_affine(cfg, 0, [])[2])  # b: the same for every row
        # decode FLOPs [visor, dense] added on the device each step, not yet in the stats file
        self.decode_flops = torch.zeros(2, dtype=torch.float64, device=device)
        self.writer = None         # the engine's stats.StatsWriter, once `account` has one
        self.joined: set[int] = set()  # host: slots that joined since the last step's side channels

    _ROW_TENSORS = ("prompt_len", "allowed", "explicit", "has_explicit", "sa_mask", "config_index",
                    "cap_met", "live", "decode_a", "dense_a")
    _ROW_LISTS = ("budgets", "receipts", "n_routing", "resumed")

    def set_row(self, row: int, budget: Budget, prompt_ids=(), receipt: str | None = None,
                resumed: bool = False, join: bool = True) -> None:
        """A request joins at ``row`` (its first step is this step: enc-dec mode prefills a
        prompt in one step); ``join=False``: the row is emptied (`clear_row`)."""
        prompt_ids = list(prompt_ids or ())
        if join:
            self.joined.add(row)
        else:
            self.joined.discard(row)
        self.prompt_len[row] = len(prompt_ids)
        self.has_explicit[row] = budget.mode == "layers"
        self.explicit[row] = False
        if budget.sa_layers is not None:
            self.explicit[row, list(budget.sa_layers)] = True
        self.allowed[row] = torch.tensor(allowed_configs(self.cfg, budget), device=self.allowed.device)
        self.sa_mask[row] = False
        self.config_index[row] = -1
        self.cap_met[row] = True
        self.live[row] = join
        self.budgets[row] = budget
        self.receipts[row] = receipt if receipts.valid_id(receipt) else None
        self.n_routing[row] = prompt_ids.count(self.cfg.routing_token_id)
        self.resumed[row] = resumed
        self.decode_a[row] = 0
        self.dense_a[row] = 0

    def clear_row(self, row: int) -> None:
        """The request at ``row`` leaves. Its decode FLOPs so far reach the stats file with the
        caller's one `flush` after the batch change (V1: `VisorBudgetBridge.update_state`; MRV2:
        ``remove_request``), not one device read per row."""
        self.set_row(row, Budget(), join=False)

    def flush(self) -> None:
        """Move the device-side decode FLOPs into the stats file: one device-to-host read, only
        at host events (a row joins or leaves), never in a steady decode step. Never raises.

        It reads whenever a writer exists, never on a host-side "something was added" flag: a
        replayed CUDA graph adds to ``decode_flops`` without running the Python that would set
        the flag (`tests/engine/test_graph_replay.py` lost decode FLOPs that way)."""
        if self.writer is None:
            return
        try:
            visor, dense = self.decode_flops.tolist()
            if not (visor or dense):
                return
            self.decode_flops.zero_()
            self.writer.add(visor_decode=visor, dense_decode=dense)
        except Exception:  # noqa: BLE001 - a side channel never fails a step
            import logging

            logging.getLogger(__name__).exception("VISOR: could not flush decode FLOPs")

    def step_done(self) -> None:
        """The step's side channels ran: its joined rows have had their first step."""
        self.joined.clear()

    def move(self, src: int, dst: int, swap: bool) -> None:
        for name in self._ROW_TENSORS:
            t = getattr(self, name)
            if swap:
                t[[src, dst]] = t[[dst, src]]
            else:
                t[dst] = t[src]
        for name in self._ROW_LISTS:
            s = getattr(self, name)
            s[src], s[dst] = (s[dst], s[src]) if swap else (s[src], s[src])
        was = {src: src in self.joined, dst: dst in self.joined}
        self.joined -= {src, dst}
        if was[src]:
            self.joined.add(dst)
        if swap and was[dst]:
            self.joined.add(src)

    def apply_flops_caps(self, first: torch.Tensor, n_vision: torch.Tensor,
                         slots: torch.Tensor, n_dense: torch.Tensor | None = None) -> None:
        """Narrow ``allowed`` of first-step rows [R] with a FLOP cap to what fits their counts.

        ``slots`` [R]: each batch row's slot here; ``n_dense`` [R]: dense LLaVA-OV's visual
        tokens (VISOR-TR's full count; default ``n_vision``). A Python loop over *capped
        first-step* rows only: once per such request, not per token.
        """
        n_dense = n_vision if n_dense is None else n_dense
        rows = first.nonzero().flatten().tolist()
        for r, k in zip(rows, slots[rows].tolist() if rows else []):
            budget = self.budgets[k]
            if budget.max_flops is None:
                continue
            mask, met = flops_fit(self.cfg, self.allowed[k].tolist(), budget.max_flops,
                                  int(n_vision[r]), int(self.prompt_len[k]), int(n_dense[r]))
            self.allowed[k] = torch.tensor(mask, device=self.allowed.device)
            self.cap_met[k] = met

    def emit_receipts(self, first: torch.Tensor, n_vision: torch.Tensor, has_router: bool,
                      slots: torch.Tensor, n_dense: torch.Tensor | None = None) -> None:
        """Write the receipt of every first-step row [R] that asked for one (`visor_vllm.engine.receipts`)."""
        if not self.joined:  # no row joined (host-side): no per-row work, no device read
            return
        rows = first.nonzero().flatten().tolist()
        pairs = [(r, k) for r, k in zip(rows, slots[rows].tolist()) if self.receipts[k]]
        if not pairs:
            return
        ks = [k for _, k in pairs]
        sa = self.sa_mask[ks].cpu()
        allowed = self.allowed[ks].sum(-1).tolist()
        n_dense = n_vision if n_dense is None else n_dense
        for j, (r, k) in enumerate(pairs):
            budget, nv = self.budgets[k], int(n_vision[r])
            layers = sa[j].nonzero().flatten().tolist() if nv else []
            receipts.write(self.receipts[k], dict(
                sa_layers=[i + 1 for i in layers], config_index=int(self.config_index[k]),
                n_image=nv, n_image_dense=int(n_dense[r]), n_text=int(self.prompt_len[k]),
                n_routing=self.n_routing[k],
                routed=self._routed(k, nv, has_router, allowed[j]),
                budget=budget.mode, budget_source=budget.source, max_flops=budget.max_flops,
                flops_cap_met=bool(self.cap_met[k]), model=self.model_path))


    def _routed(self, r: int, nv: int, has_router: bool, n_allowed: int) -> bool:
        return bool(has_router and nv and self.budgets[r].uses_router and n_allowed > 1)

    def account(self, s, writer, has_router: bool) -> None:
        """Add what this step executed to `visor_vllm.engine.stats` (see there).

        ``s`` is the model's step (`_Step`: ``computed``, ``seq_lens``, ``qsl``, ``n_vision``,
        ``n_dense_vision`` per row). First-step rows: prefill FLOPs on the text tokens the step ran, and one
        request event unless the row resumed after preemption; other rows: ``q`` decode tokens
        ending at text context ``seq_len``, added to ``decode_flops`` on the device (no host
        read: see `flush`). Per-row work and reads happen only when a row joined (``joined``).
        """
        from visor_vllm.model.flops import decode_step_affine, dense_prefill_flops, prefill_flops

        sl = s.slots                                                     # [R] row -> slot
        q = (s.qsl[1:] - s.qsl[:-1]).to(torch.float64)                   # [R] tokens this step
        first = (s.computed == 0) & (q > 0)      # [R] (q == 0: a padded row, e.g. under graphs)
        vp = dp = 0.0
        events = []
        self.writer = writer
        if self.joined:  # host-side: per-row work only in steps where rows join
            rows = first.nonzero().flatten().tolist()
            ks = sl[rows].tolist()
            sa = self.sa_mask[ks].cpu()
            n_allowed = self.allowed[ks].sum(-1).tolist()
            counts = torch.stack([s.n_vision[rows], q[rows].long(), self.prompt_len[ks],
                                  s.n_dense_vision[rows]]).tolist()
            for j, k in enumerate(ks):
                nv, nt_run, nt, nd = counts[0][j], counts[1][j], counts[2][j], counts[3][j]
                layers = sa[j].nonzero().flatten().tolist() if nv else []
                routed = self._routed(k, nv, has_router, n_allowed[j])
                vp += prefill_flops(self.cfg, nv, nt_run, layers,
                                    min(self.n_routing[k], nt_run), routed)
                dp += dense_prefill_flops(self.cfg, nd, nt_run)
                a_visor, a_dense, _ = decode_step_affine(self.cfg, nv, layers, nd)
                self.decode_a[k], self.dense_a[k] = float(a_visor), float(a_dense)
                if not self.resumed[k]:
                    events.append((sum(1 << i for i in layers),
                                   stats.SOURCES.index(self.budgets[k].source), nv, nt,
                                   int(bool(self.cap_met[k]))))
        dec = (~first & (q > 0) & self.live[sl]).to(torch.float64)        # [R]
        c = s.seq_lens.to(torch.float64)                                 # [R] context after step
        ctx = self.decode_slope * (dec * (q * c - q * (q - 1) / 2)).sum()  # b * sum of contexts
        self.decode_flops += torch.stack([(dec * q * self.decode_a[sl]).sum() + ctx,
                                          (dec * q * self.dense_a[sl]).sum() + ctx])
        if self.joined:  # this step reads the device anyway
            writer.add(vp, 0.0, dp, 0.0, events)
            self.flush()


class VisorBudgetBridge(LogitsProcessor, LogitsProcessorV2):
    """V1: tracks rows (see module docstring). V2: budget validation only (see footguns)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if receipts.KEY in extra and not receipts.valid_id(extra[receipts.KEY]):
            # on every endpoint: only the server's middleware makes receipt ids
            raise ValueError(f"vllm_xargs.{receipts.KEY} is set by the server; remove it from "
                             "the request")
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
            self.default = default_budget(hf)  # a bad VISOR_DEFAULT_BUDGET stops the engine here
            receipts.runtime_dir()  # so does a runtime dir others could write (RuntimeDirError)
            STATE = RowState(hf, vllm_config.scheduler_config.max_num_seqs, args[0],
                             vllm_config.model_config.model)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.active or batch_update is None:
            return
        for row in batch_update.removed:
            STATE.clear_row(row)
        for row, params, prompt_ids, out_ids in batch_update.added:
            extra = (getattr(params, "extra_args", None) if params is not None else None) or {}
            STATE.set_row(row, parse_budget(extra, STATE.cfg, self.default), prompt_ids,
                          extra.get(receipts.KEY), resumed=bool(out_ids))
        for src, dst, direction in batch_update.moved:
            STATE.move(src, dst, swap=direction == MoveDirectionality.SWAP)
        # any batch change: vLLM hands processors only the freed slots that no add reused and
        # no condense filled, so a request that left may show here as a move, or not at all
        STATE.flush()
