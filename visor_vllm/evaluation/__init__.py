"""Evaluation through the served model: an OpenAI client against a running ``vllm serve``.

* `served` -- ``visor-vllm eval``: accuracy per family and budget, FLOPs from the receipts;
* `launch` -- a ``vllm serve`` subprocess of a checkpoint, ready on ``/health`` (recipe, tests);
* `recipe` -- ``visor-vllm recipe synthetic``: the training pipeline, then serve and evaluate.

Imports `visor_vllm.training` (the data format, the training pipeline) and `visor_vllm.model`;
never the engine or serving modules: it talks to the server over HTTP only, as users do.
"""
