"""VISOR inside vLLM's engine: the vLLM model, the per-request worker bridge, receipts.

* `vllm_model` -- the model vLLM loads (registered by `visor_vllm.register`), its multimodal
  processor and attention paths;
* `bridge` -- per-request budgets and chosen configurations in the workers (a no-op V1 logits
  processor, entry point ``vllm.logits_processors``);
* `receipts` -- the per-request record the worker writes at a request's first step and the
  server's middleware reads (vLLM-free, so `visor_vllm.serving` may import it);
* `stats` -- executed FLOPs and request events, from the rank-0 worker to the API server's
  stat-logger plugin (the ``visor:*`` series; vLLM-free, like `receipts`);
* `inputs` -- image checks that turn bad images into HTTP 400s.

Imports `visor_vllm.model` and the patch ledger `visor_vllm.patches`; never serving or training.
Nothing here is imported at package import time, so importing `visor_vllm.engine` needs no vLLM.
"""
