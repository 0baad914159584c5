"""What VISOR changes in a `VllmConfig` before the engine starts, and why (one place, logged).

What. `VisorConfigHook` is vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``, ledger
entry 5 in `visor_vllm.patches`): vLLM calls it from ``VllmConfig.__post_init__`` in the
process that builds the config (``vllm serve``, ``LLM(...)``), before compilation and
CUDA-graph defaults are resolved.

* **CUDA graphs off unless asked for, for a named reason.** vLLM 0.32 gives an
  encoder-decoder model one graph mode on GPU: full decode-only graphs (``FULL_DECODE_ONLY``;
  ``VllmConfig.__post_init__`` overrides ``PIECEWISE`` and ``FULL_AND_PIECEWISE`` with it for
  ``is_encoder_decoder``, after this hook; ``tests/engine/test_config_hook.py`` pins that), so
  piecewise graphs with VISOR's ops between the pieces are closed to this model class. A full
  graph captures the whole forward, side channels included, and replays its kernels only.
  What is proven, on CPU: VISOR's steady decode step has no host synchronisation, side
  channels included (``tests/engine/test_graph_safety.py``), and a decode step recorded op by
  op and replayed without its Python, for other batches (budgets, images, lengths, a batch
  padded to the recorded size), gives the eager step's tokens, receipts and executed FLOPs
  (``tests/engine/test_graph_replay.py``, `visor_vllm.graph_replay`). What is not: no GPU
  build of vLLM has run VISOR, so neither vLLM's graph capture of this model (its dummy
  capture batches, Model Runner V2's graph inputs such as ``visor_slots``) nor a GPU attention
  backend on VISOR's ``[V ; T]`` SA metadata (`visor_vllm.engine.sa_attention`) has run. So
  the hook sets ``cudagraph_mode = NONE`` with one log line naming this, unless
  ``VISOR_CUDA_GRAPHS=1`` (`visor_vllm.envs`) asks to keep vLLM's graphs, to try them on a GPU;
  ``--enforce-eager`` or ``cudagraph_mode`` NONE need no change. Compilation stays on: vLLM
  compiles the VISOR decoder (``support_torch_compile``) unless ``--enforce-eager``.
* **The model runner is vLLM's choice.** VISOR runs on both: on V1, per-request state reaches
  the model through a V1 logits processor (`visor_vllm.engine.bridge`); on Model Runner V2
  (vLLM's default where Triton has a backend: GPU installs) through
  `visor_vllm.engine.model_state.VisorModelState` (``get_model_state_cls``). MRV2 is proven on
  this project's CPU machines with vLLM's own MRV2 kernels run by Triton's interpreter
  (``tests/engine/test_model_runner_v2.py``); without Triton vLLM itself falls back to V1.
  The hook logs which runner the config resolves to.

* **No pipeline parallelism.** VISOR's SA layers update the visual tokens, so a pipeline stage
  would have to hand the next one the visual hidden states and the CA layers' static vision
  K/V besides the text's intermediate tensors, and the router's choice made on the first
  stage; the model implements none of that (it inherits LLaVA-OV's `SupportsPP` marker, so
  vLLM would start and fail later). ``--pipeline-parallel-size N > 1`` is refused here, with
  that reason (`PipelineParallelUnsupported`); tensor parallelism is supported and tested.

Footguns. The hook runs once per config (vLLM's ``config_updated`` flag) and only in processes
that build one, before any engine process starts; whatever it changes must live in the config
(engine processes receive it), not in this process. Import nothing heavy at module top level
(`register()` imports this module in every vLLM process).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("visor_vllm.engine")

class PipelineParallelUnsupported(ValueError):
    """``--pipeline-parallel-size`` > 1 for a VISOR model (see the module docstring)."""


def check_parallelism(vllm_config) -> None:
    """Refuse what VISOR cannot run, naming why (`PipelineParallelUnsupported`)."""
    pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1)
    if pp and pp > 1:
        raise PipelineParallelUnsupported(
            f"VISOR does not run under pipeline parallelism (--pipeline-parallel-size {pp}): "
            "its SA layers update the visual tokens, which a stage would have to pass on with "
            "the text hidden states, the CA layers' vision K/V and the router's choice, and "
            "the VISOR model implements none of that. Use --tensor-parallel-size instead "
            "(supported and tested), or run more servers behind a load balancer.")


class VisorConfigHook:
    """Duck-typed `vllm.model_executor.models.config.VerifyAndUpdateConfig` for VISOR."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config.compilation import CUDAGraphMode

        from visor_vllm import envs

        check_parallelism(vllm_config)
        cc = vllm_config.compilation_config
        if cc.cudagraph_mode is None or cc.cudagraph_mode != CUDAGraphMode.NONE:
            was = "default" if cc.cudagraph_mode is None else cc.cudagraph_mode.name
            if envs.VISOR_CUDA_GRAPHS:
                logger.warning("VISOR: CUDA graphs kept (cudagraph_mode %s; vLLM makes it "
                               "FULL_DECODE_ONLY for an encoder-decoder model) because "
                               "VISOR_CUDA_GRAPHS=1: replay-safe on CPU, not yet run on a GPU "
                               "build of vLLM", was)
            else:
                cc.cudagraph_mode = CUDAGraphMode.NONE
                logger.warning("VISOR: CUDA graphs off (cudagraph_mode %s -> NONE): vLLM runs "
                               "an encoder-decoder model's decode only as a full graph, and "
                               "VISOR's decode step, replay-safe on CPU, has not run under one "
                               "on a GPU build of vLLM; VISOR_CUDA_GRAPHS=1 keeps them to try; "
                               "decode runs compiled, without graphs", was)
        try:  # vLLM's own resolution (env, Triton, unsupported features); logs nothing new
            v2 = bool(vllm_config.use_v2_model_runner)
        except AttributeError:  # a partial config (tests) or a vLLM that moved the property
            return
        logger.info("VISOR: %s", "Model Runner V2 (VisorModelState)" if v2 else
                    "the V1 model runner (VISOR's logits-processor bridge)")
