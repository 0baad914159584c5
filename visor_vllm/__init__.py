"""visor-vllm: VISOR (VISion On Request, CVPR 2026) for LLaVA-OneVision as a vLLM plugin.

Two registrations, one job each:

* `register_transformers()` -- the ``visor`` model type for transformers' ``AutoConfig`` and the
  transformers patches (`visor_vllm.patches`): what loading a VISOR checkpoint, training and
  converting need. No vLLM.
* `register()` -- the ``vllm.general_plugins`` entry point: `register_transformers()`, then
  VISOR's model, its config hook and the server id its processes share. It runs in every vLLM
  process (API server, engine core, workers, the registry-inspection subprocess), so it must be
  cheap, idempotent and import nothing heavy at module top level.
"""

__version__ = "0.1.0"

_registered: set[str] = set()


def register_transformers() -> None:
    """Register VISOR's config with transformers and apply the transformers patches (idempotent)."""
    if "transformers" in _registered:
        return
    from transformers import AutoConfig

    from visor_vllm.model.config import VisorConfig
    from visor_vllm.patches import apply_transformers_patches

    apply_transformers_patches()
    try:
        AutoConfig.register("visor", VisorConfig)
    except ValueError:  # already registered by an earlier import in this process
        pass
    _registered.add("transformers")


def register() -> None:
    """The vLLM plugin: transformers' registration, then VISOR's model in vLLM (idempotent).

    The model is registered by import string, so vLLM imports `visor_vllm.engine.vllm_model` only
    when a VISOR checkpoint is served. The transformers patches come first because every vLLM
    process may load LLaVA-OV processors.
    """
    if "vllm" in _registered:
        return
    from visor_vllm.engine.stats import claim_server_id

    claim_server_id()  # the key API servers and workers share for visor:* (engine/stats.py)
    register_transformers()
    try:
        from vllm import ModelRegistry
    except ImportError:  # reference-only install
        pass
    else:
        from visor_vllm.engine.config_hook import VisorConfigHook
        from visor_vllm.patches import apply_config_patches

        apply_config_patches(VisorConfigHook)  # cudagraphs off, logged (ledger entry 5)
        if "VisorForConditionalGeneration" not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model("VisorForConditionalGeneration",
                                         "visor_vllm.engine.vllm_model:VisorForConditionalGeneration")
    _registered.add("vllm")
