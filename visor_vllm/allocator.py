"""The host memory allocator of visor-vllm's CPU processes: tcmalloc where found, glibc tuned.

What.
* `find_tcmalloc()`: the tcmalloc library to preload, or None. ``VISOR_TCMALLOC`` names one
  (``0``: none); unset, the first that exists of ``<sys.prefix>/lib/libtcmalloc_minimal.so.4``
  (where ``scripts/setup.sh`` puts it) and the system's library directories.
* `preload_environment(env)`: ``env`` with that library first in ``LD_PRELOAD``: what the
  evaluation launcher and ``visor-vllm serve`` hand to ``vllm serve`` (its API server, engine
  core and workers all inherit it).
* `reexec_command(argv)`: the command that starts this CLI again with it preloaded, or None
  (found nowhere, already loaded, switched off). `visor_vllm.cli` execs it once, before any
  work, so training runs under it too.
* `tune_host_allocator()`: glibc's mmap and trim thresholds fixed for a training process (what
  helps where tcmalloc is not preloaded; harmless under it).
* `in_use()`: ``"tcmalloc"`` or ``"glibc"`` for this process (from its memory maps), recorded
  with a run's minutes (`visor_vllm.training.machine.describe`).

Why. A training step and a served request allocate and free megabytes of short-lived buffers.
vLLM's CPU worker warns when tcmalloc is not preloaded ("For best performance ..."), and it
pays here too. Measured 2026-12-07 on the 2-vCPU Xeon of the synthetic recipe, same bytes out:
the recipe's served pass (seed 9, 16,200 requests, both servers' start-up included) 143.8 s
-> 129.3 s; the dense training step, against glibc with `tune_host_allocator`'s thresholds,
3-5 % faster (whole process, 6 alternating pairs); seed 9 of the recipe from scratch, every
weight and every reported number the same, 30.2 minutes against 31.8
(docs/training.md#a-faster-pipeline-with-the-same-numbers).

Footguns.
* ``LD_PRELOAD`` is read by the dynamic linker when a process starts: setting it later changes
  nothing for the running process, hence the re-exec. A process started by a preloaded one
  inherits it (multiprocessing's spawned workers, the servers).
* The library must match the machine's C library; the one ``scripts/setup.sh`` fetches is the
  system's package (Debian's ``libtcmalloc-minimal4``). A ``VISOR_TCMALLOC`` that names no
  file is an `AllocatorError`, not a silent fallback.
* Only tcmalloc's arithmetic-free part changes: PyTorch aligns every CPU tensor to 64 bytes
  under either allocator, so kernels take the same paths and give the same bits (checked on
  weights and served answers, see Why).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from visor_vllm import envs

LIBRARY = "libtcmalloc_minimal.so.4"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
               "/usr/lib", "/usr/local/lib")
# set in the re-exec'd process so that it never execs again (also when the preload failed)
_REEXECED = "VISOR_TCMALLOC_REEXEC"


class AllocatorError(ValueError):
    """``VISOR_TCMALLOC`` names a library that does not exist."""


def find_tcmalloc(env: Mapping[str, str] | None = None) -> str | None:
    """The tcmalloc library to preload (module docstring), or None."""
    want = (envs.get("VISOR_TCMALLOC", env) or "").strip()
    if want == "0":
        return None
    if want:
        if not Path(want).is_file():
            raise AllocatorError(f"VISOR_TCMALLOC={want!r}: no such file (a path to "
                                 f"{LIBRARY}, or 0 for none)")
        return want
    for folder in (Path(sys.prefix) / "lib", *map(Path, SYSTEM_DIRS)):
        if (folder / LIBRARY).is_file():
            return str(folder / LIBRARY)
    return None


def _preloaded(env: Mapping[str, str] | None) -> str:
    return envs.get("LD_PRELOAD", env) or ""


def preload_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with tcmalloc first in ``LD_PRELOAD`` (unchanged when none is found or one is
    there already)."""
    out = dict(env)
    lib, have = find_tcmalloc(env), _preloaded(env)
    if lib and "libtcmalloc" not in have:
        out["LD_PRELOAD"] = f"{lib}:{have}" if have else lib
    return out


def reexec_command(argv: list[str], env: Mapping[str, str] | None = None):
    """``(executable, argv, env)`` that runs ``python -m visor_vllm.cli *argv`` with tcmalloc
    preloaded, or None where nothing would change (none found, already preloaded, already
    re-exec'd once, ``VISOR_TCMALLOC=0``)."""
    env = envs.snapshot() if env is None else dict(env)
    if (envs.get(_REEXECED, env) or "").strip() == "1":
        return None
    new = preload_environment(env)
    if new.get("LD_PRELOAD") == env.get("LD_PRELOAD"):
        return None
    new[_REEXECED] = "1"
    return sys.executable, [sys.executable, "-m", "visor_vllm.cli", *argv], new


def in_use(maps: Path = Path("/proc/self/maps")) -> str | None:
    """``"tcmalloc"`` when a tcmalloc library is mapped into this process, ``"glibc"`` on
    Linux otherwise, None where the maps cannot be read."""
    try:
        text = maps.read_text()
    except OSError:
        return None
    return "tcmalloc" if "libtcmalloc" in text else "glibc"


def tune_host_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process (and its forked workers).

    Why: a training step allocates and frees megabytes of activations; with glibc's dynamic
    thresholds they bounce between fresh mmaps and a heap whose top is trimmed and re-faulted
    every step. Measured on this 2-core CPU at the synthetic preset, 100 dense steps: 3.5M
    minor page faults and 6.3 s of system time, 1.2 s with fixed thresholds, the loop ~10 %
    faster (the speed of a87441f's trainer, which the same effect hit less). ``False`` where the
    C library is not glibc (nothing changed) or ``VISOR_MALLOC_TUNING=0``. Under a preloaded
    tcmalloc it tunes glibc's own heap, which then serves nothing: harmless.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or not envs.VISOR_MALLOC_TUNING:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
