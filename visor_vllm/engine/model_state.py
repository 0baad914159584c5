"""VISOR's per-request state on vLLM's Model Runner V2 (``get_model_state_cls``).

What. `VisorModelState` is the MRV2 counterpart of the V1 logits-processor channel
(`visor_vllm.engine.bridge`): MRV2 hands each new request's ``NewRequestData`` (sampling params
with the budget in ``extra_args``, prompt ids, request id) to the model state, which writes it
into `bridge.RowState` at the request's fixed state index (``req_index``) and clears it when
the request leaves. Each step it passes ``visor_slots`` -- the batch's ``idx_mapping``, batch
row -> state index -- to the model, which reads and writes per-request state through it (on V1
the slot *is* the persistent-batch row, so the decoder code is one path for both runners).
Everything else (encoder outputs in batch order, encoder sequence lengths for cross-attention
metadata) is vLLM's own `EncoderDecoderModelState`.

Why. MRV2 does not run V1-interface logits processors, and has no persistent batch whose rows
move: state indices are stable for a request's lifetime, which is simpler than V1's moves.

Footguns.
* A preempted request is removed and later re-added with its outputs so far
  (``prefill_token_ids`` longer than the prompt): it is marked ``resumed`` (no second request
  event in `visor_vllm.engine.stats`) and its first step re-runs the router on the prompt.
* ``visor_slots`` lives in one buffer for the model state's lifetime (``_slots``): MRV2 makes
  ``idx_mapping`` anew every step, but a captured CUDA graph reads its inputs at the addresses
  it captured, so every step copies the mapping into the buffer, and the capture's dummy batch
  (``prepare_dummy_inputs``) reads the same buffer. A padded graph row reads a stale slot there:
  harmless, a row with no query token writes nothing and counts nothing.
* Imports vLLM's MRV2 modules at top level: import this module only from
  ``get_model_state_cls`` (MRV2 is optional; V1 never loads it).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.model_states.encoder_decoder import EncoderDecoderModelState

from visor_vllm.engine import bridge, receipts
from visor_vllm.model.budget import default_budget, parse_budget


class VisorModelState(EncoderDecoderModelState):
    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        hf = vllm_config.model_config.hf_config
        self.default = default_budget(hf)  # a bad VISOR_DEFAULT_BUDGET stops the engine here
        receipts.runtime_dir()  # so does a runtime dir others could write (RuntimeDirError)
        bridge.STATE = bridge.RowState(hf, self.max_num_reqs, device, vllm_config.model_config.model)
        self._index: dict[str, int] = {}  # req_id -> state index
        self._slots = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)  # [R]

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        extra = (getattr(params, "extra_args", None) if params is not None else None) or {}
        prompt = list(new_req_data.prompt_token_ids or ())
        prefill = new_req_data.prefill_token_ids
        state = bridge.STATE
        state.set_row(req_index, parse_budget(extra, state.cfg, self.default), prompt,
                      extra.get(receipts.KEY), resumed=prefill is not None and len(prefill) > len(prompt))
        self._index[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        index = self._index.pop(req_id, None)
        if index is not None:
            bridge.STATE.clear_row(index)
            bridge.STATE.flush()  # its decode FLOPs so far, into the stats file

    def prepare_inputs(self, input_batch, req_states) -> dict:
        inputs = super().prepare_inputs(input_batch, req_states)
        n = input_batch.num_reqs
        self._slots[:n].copy_(input_batch.idx_mapping[:n], non_blocking=True)
        inputs["visor_slots"] = self._slots[:n]
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict:
        """A dummy or graph-capture batch: the same slots buffer (module docstring)."""
        return {**super().prepare_dummy_inputs(num_reqs, num_tokens),
                "visor_slots": self._slots[:num_reqs]}
