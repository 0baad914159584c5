"""The OpenAI-compatible server around the engine: metrics, receipts, `visor-vllm serve`.

* `stat_logger` -- the ``visor:*`` Prometheus series, a vLLM stat-logger plugin (entry point
  ``vllm.stat_logger_plugins``): plain ``vllm serve`` exports them, no flag;
* `middleware` -- ``--middleware visor_vllm.serving.middleware.VisorMiddleware``: per-response
  ``visor`` receipts;
* `serve` -- ``visor-vllm serve``: ``vllm serve`` with VISOR's middleware and defaults.

Imports `visor_vllm.model`, `visor_vllm.checkpoints` and `visor_vllm.engine.receipts` /
`visor_vllm.engine.stats`; never `visor_vllm.training`.
"""
