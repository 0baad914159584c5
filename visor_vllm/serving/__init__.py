"""The OpenAI-compatible server around the engine: middleware, metrics, `visor-vllm serve`.

* `middleware` -- ``--middleware visor_vllm.serving.middleware.VisorMiddleware``: per-response
  ``visor`` receipts and the ``visor:*`` Prometheus series;
* `serve` -- ``visor-vllm serve``: ``vllm serve`` with VISOR's middleware and defaults.

Imports `visor_vllm.model`, `visor_vllm.checkpoints` and `visor_vllm.engine.receipts`; never
`visor_vllm.training`.
"""
