"""Suite-wide settings: offline Hugging Face, and skips for tests whose hardware or vLLM is absent.

Fixtures for checkpoints live elsewhere; anything added here is named ``pkg_*``.
"""

import os

import pytest

# Tests never reach the Hub: set before any test module imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    from visor_vllm._compat import is_vllm_available

    skips = {}
    if not is_vllm_available():
        skips["vllm"] = pytest.mark.skip(reason="vLLM is not installed (make setup)")
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():  # ROCm builds report through torch.cuda too
            skips["gpu"] = pytest.mark.skip(reason="no GPU visible to torch")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)
