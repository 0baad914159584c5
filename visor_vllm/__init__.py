"""visor-vllm: VISOR (VISion On Request, CVPR 2026) for LLaVA-OneVision as a vLLM plugin.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process (API
server, engine core, workers, the registry-inspection subprocess), so it must be cheap,
idempotent and import nothing heavy at module top level.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register VISOR's config with transformers and its model with vLLM (idempotent).

    The model is registered by import string, so vLLM imports `visor_vllm.engine.vllm_model` only when
    a VISOR checkpoint is served. The transformers patches (`visor_vllm.patches`) are applied
    first because every vLLM process may load LLaVA-OV processors.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig

    from visor_vllm.engine.stats import claim_server_id

    claim_server_id()  # the key API servers and workers share for visor:* (engine/stats.py)

    from visor_vllm.model.config import VisorConfig
    from visor_vllm.patches import apply_transformers_patches

    apply_transformers_patches()
    try:
        AutoConfig.register("visor", VisorConfig)
    except ValueError:  # already registered by an earlier import in this process
        pass
    try:
        from vllm import ModelRegistry
    except ImportError:  # reference-only install
        pass
    else:
        from visor_vllm.patches import apply_config_patches

        apply_config_patches()  # cudagraphs off, logged (ledger entry 5)
        if "VisorForConditionalGeneration" not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model("VisorForConditionalGeneration",
                                         "visor_vllm.engine.vllm_model:VisorForConditionalGeneration")
    _registered = True
