"""A Triton backend named ``cpu`` whose kernels run in Triton's own interpreter (tests only).

What. vLLM 0.32 runs Model Runner V2 only where ``vllm.triton_utils.HAS_TRITON`` is true, which
on its CPU build means "Triton has a backend called ``cpu``" (triton-cpu, not on this project's
package index). This package is such a backend, discovered through Triton's ``triton.backends``
entry point, and it compiles nothing: with ``TRITON_INTERPRET=1`` every ``@triton.jit`` kernel
is an ``InterpretedFunction`` that Triton executes in Python/NumPy on the CPU tensors. So the
engine runs vLLM's real MRV2 code (its input preparation, block tables and sampler kernels,
interpreted) around VISOR's model, which is what `tests/engine/test_model_runner_v2.py` proves.

Why not patch ``HAS_TRITON``: it is read at import in several vLLM modules and processes; a
backend plugin is the public extension point, needs no patch of vLLM and cannot leak into the
rest of the suite (only the subprocess that puts `install` 's folder on its path sees it).

Footguns.
* Without ``TRITON_INTERPRET=1`` vLLM would try to *compile* kernels with this backend and
  fail: `install` returns both environment variables together.
* Interpreted kernels are slow (Python per program instance): fine for the tiny test engine,
  meaningless for speed.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "visor_triton_interpreter"


def install(folder: Path) -> dict[str, str]:
    """Write the entry-point metadata under ``folder``; returns the env a subprocess needs."""
    info = Path(folder) / f"{NAME}-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[triton.backends]\ncpu = tests.engine.triton_interpreter\n")
    root = Path(__file__).resolve().parents[3]  # the repository: ``tests`` is importable from it
    path = os.pathsep.join([str(folder), str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "TRITON_INTERPRET": "1"}
