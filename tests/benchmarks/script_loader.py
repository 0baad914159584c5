"""Load a benchmark script (``benchmarks/NAME.py``, not a package) as a module for its tests."""

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@contextlib.contextmanager
def load_script(name: str):
    """Import ``benchmarks/<name>.py``; afterwards drop it from ``sys.modules`` and restore
    ``os.environ`` (scripts such as decode_profile set VLLM_* variables at import)."""
    env = dict(os.environ)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        os.environ.clear()
        os.environ.update(env)
