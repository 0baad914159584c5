"""VISOR's vLLM config hook: CUDA graphs off unless VISOR_CUDA_GRAPHS=1, logged; the model
runner left to vLLM.

The hook is ledger entry 5 (`visor_vllm.patches`); `register()` installs it, and vLLM calls it
while it builds a `VllmConfig`, i.e. before any engine process exists.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.vllm]


def fake_config(mode):
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode))


@pytest.mark.parametrize("mode", [None, "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", "PIECEWISE"])
def test_hook_turns_cuda_graphs_off_with_a_log_line(mode, monkeypatch, caplog):
    from vllm.config.compilation import CUDAGraphMode

    from visor_vllm.engine.config_hook import VisorConfigHook

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    cfg = fake_config(None if mode is None else CUDAGraphMode[mode])
    with caplog.at_level(logging.WARNING, logger="visor_vllm.engine"):
        VisorConfigHook.verify_and_update_config(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert "CUDA graphs off" in caplog.text and "only as a full graph" in caplog.text
    assert "VISOR_CUDA_GRAPHS=1" in caplog.text  # how to try them


@pytest.mark.parametrize("mode", [None, "FULL_DECODE_ONLY"])
def test_visor_cuda_graphs_1_keeps_vllms_graphs_with_a_log_line(mode, monkeypatch, caplog):
    from vllm.config.compilation import CUDAGraphMode

    from visor_vllm.engine.config_hook import VisorConfigHook

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.setenv("VISOR_CUDA_GRAPHS", "1")
    cfg = fake_config(None if mode is None else CUDAGraphMode[mode])
    with caplog.at_level(logging.WARNING, logger="visor_vllm.engine"):
        VisorConfigHook.verify_and_update_config(cfg)
    assert cfg.compilation_config.cudagraph_mode == (None if mode is None else CUDAGraphMode[mode])
    assert "CUDA graphs kept" in caplog.text and "not yet run on a GPU" in caplog.text


def test_hook_leaves_an_eager_config_alone(monkeypatch, caplog):
    from vllm.config.compilation import CUDAGraphMode

    from visor_vllm.engine.config_hook import VisorConfigHook

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    cfg = fake_config(CUDAGraphMode.NONE)
    with caplog.at_level(logging.WARNING, logger="visor_vllm.engine"):
        VisorConfigHook.verify_and_update_config(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE and not caplog.text


@pytest.mark.parametrize("v2", [False, True])
def test_hook_leaves_the_runner_to_vllm_and_says_which(v2, monkeypatch, caplog):
    import os

    from vllm.config.compilation import CUDAGraphMode

    from visor_vllm.engine.config_hook import VisorConfigHook

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    cfg = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.NONE),
                          use_v2_model_runner=v2)
    with caplog.at_level(logging.INFO, logger="visor_vllm.engine"):
        VisorConfigHook.verify_and_update_config(cfg)
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ  # engine processes see vLLM's choice
    assert ("Model Runner V2" if v2 else "V1 model runner") in caplog.text


def test_register_installs_the_hook_and_vllm_calls_it(visor_ckpt, monkeypatch):
    """Through vLLM's own config path: the map entry exists, graphs are off, the runner is vLLM's
    (V1 on this CPU build without triton-cpu; MRV2 where Triton has a backend)."""
    import os

    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from visor_vllm import patches, register

    register()
    assert patches.CONFIG_PATCHES[0].applied()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    cfg = EngineArgs(model=str(visor_ckpt), dtype="float32", max_model_len=2048,
                     compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}
                     ).create_engine_config()
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    from vllm.triton_utils import HAS_TRITON

    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    assert HAS_TRITON or not cfg.use_v2_model_runner  # vLLM's own fallback without Triton


def test_hook_refuses_pipeline_parallelism_with_the_reason():
    from visor_vllm.engine.config_hook import PipelineParallelUnsupported, VisorConfigHook

    cfg = fake_config(None)
    cfg.parallel_config = SimpleNamespace(pipeline_parallel_size=2)
    with pytest.raises(PipelineParallelUnsupported, match="pipeline-parallel-size 2.*SA layers"):
        VisorConfigHook.verify_and_update_config(cfg)
    cfg.parallel_config.pipeline_parallel_size = 1  # one stage: no refusal
    VisorConfigHook.verify_and_update_config(cfg)


def test_vllm_refuses_pipeline_parallel_visor_when_it_builds_the_config(visor_ckpt):
    """The hook runs where vLLM builds the config (`vllm serve` fails before any engine)."""
    from vllm.engine.arg_utils import EngineArgs

    from visor_vllm import register

    register()
    # pydantic may wrap the hook's error in its ValidationError (a ValueError too)
    with pytest.raises(ValueError, match="VISOR does not run under pipeline parallelism"):
        EngineArgs(model=str(visor_ckpt), dtype="float32", max_model_len=2048,
                   pipeline_parallel_size=2, distributed_executor_backend="mp"
                   ).create_engine_config()


@pytest.mark.parametrize("asked", ["PIECEWISE", "FULL_AND_PIECEWISE"])
def test_vllm_gives_encoder_decoder_models_full_decode_graphs_only(asked, visor_ckpt, monkeypatch):
    """The hook's named reason, pinned: on a platform with CUDA graphs, vLLM 0.32 turns any
    mode with piecewise graphs into FULL_DECODE_ONLY for an encoder-decoder model such as
    VISOR (without the hook). If a vLLM upgrade keeps PIECEWISE here, VISOR's ops can become
    splitting ops and graphs can be turned on: this test then fails, on purpose."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import config as model_configs
    from vllm.platforms import current_platform

    from visor_vllm import register

    register()
    monkeypatch.delitem(model_configs.MODELS_CONFIG_MAP, "VisorForConditionalGeneration")
    monkeypatch.setattr(type(current_platform), "support_static_graph_mode",
                        classmethod(lambda cls: True))
    cfg = EngineArgs(model=str(visor_ckpt), dtype="float32", max_model_len=2048,
                     compilation_config={"cudagraph_mode": asked}).create_engine_config()
    assert cfg.model_config.is_encoder_decoder
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY


def test_with_visor_cuda_graphs_1_vllm_resolves_full_decode_graphs(visor_ckpt, monkeypatch):
    """The opt-in through vLLM's own config path, hook installed, on a platform with graphs:
    what a GPU server started with VISOR_CUDA_GRAPHS=1 gets."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from visor_vllm import register

    register()
    monkeypatch.setenv("VISOR_CUDA_GRAPHS", "1")
    monkeypatch.setattr(type(current_platform), "support_static_graph_mode",
                        classmethod(lambda cls: True))
    cfg = EngineArgs(model=str(visor_ckpt), dtype="float32", max_model_len=2048,
                     compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}
                     ).create_engine_config()
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
