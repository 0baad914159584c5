"""Evaluation through the served model: an OpenAI client against a running ``vllm serve``.

Imports `visor_vllm.training` (the data format) and `visor_vllm.model`; never the engine or
serving modules: it talks to the server over HTTP only, as users do.
"""
