"""visor-vllm: VISOR (VISion On Request, CVPR 2026) for LLaVA-OneVision as a vLLM plugin.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process (API
server, engine core, workers, the registry-inspection subprocess), so it must be cheap,
idempotent and import nothing heavy at module top level.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register `VisorConfig` with transformers' AutoConfig (idempotent).

    The vLLM model class is registered here too once `visor_vllm.vllm_model` exists.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig

    from visor_vllm.config import VisorConfig

    try:
        AutoConfig.register("visor", VisorConfig)
    except ValueError:  # already registered by an earlier import in this process
        pass
    _registered = True
