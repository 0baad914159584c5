"""Training VISOR (paper Sec. 4.2.3, 5.1): empty until the training issue lands.

Imports `visor_vllm.model` and `visor_vllm.checkpoints`; never vLLM, the engine or serving, so
it runs on machines without vLLM.
"""
