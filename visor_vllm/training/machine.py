"""What machine ran a phase of a recipe: the CPU (and GPU) behind a run's minutes.

What. `describe()` returns a small dict: the CPU's model name, its x86 family and model
numbers, the CPUs this process may use, the widest vector extension (``avx512``, ``avx2`` or
``other``), torch's version and intra-op threads, the GPU's name when torch sees one, and the
host allocator (``tcmalloc`` or ``glibc``, `visor_vllm.allocator.in_use`).
`label(d)` prints it in one line (``AMD EPYC (x86 family 23 model 1), 2 CPUs, AVX2``).
`visor_vllm.training.pipeline.WallLedger` records it with every invocation that ran a phase,
so a report (and `visor-vllm report`) says where its minutes and numbers came from.

Why. The synthetic recipe's minutes differ 4-5x between two 2-core hosts of this project
(first-generation EPYC with AVX2 against Zen 4 with AVX-512), and the same seed trains to
other numbers on another CPU (floating-point reduction order): a seed's row means little
without its host. A cloud VM's model name is often just "AMD EPYC"; the family and model
numbers tell the generations apart (AMD family 23 is Zen 1/Zen 2, 25 Zen 3/Zen 4, 26 Zen 5).

Footguns. Linux only reads ``/proc/cpuinfo``; elsewhere the name is `platform.processor()`
and the numbers are missing. Nothing here may fail a run: every field falls back to None.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from visor_vllm.allocator import in_use


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's ``key: value`` lines (empty where there is no such file)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def _int(x: str | None) -> int | None:
    try:
        return int(x) if x is not None else None
    except ValueError:
        return None


def usable_cpus() -> int | None:
    """The CPUs this process may run on (its affinity set), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """This machine, as `WallLedger` records it (module docstring)."""
    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    out = {"cpu": info.get("model name") or platform.processor() or None,
           "cpu_family": _int(info.get("cpu family")), "cpu_model": _int(info.get("model")),
           "cpus": usable_cpus(),
           "isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else
           "other" if flags else None,
           "torch": None, "threads": None, "gpu": None, "allocator": in_use()}
    try:
        import torch

        out["torch"], out["threads"] = torch.__version__, torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 -- a description never fails a run
        pass
    return out


def label(d: dict | None) -> str:
    """One line: ``AMD EPYC (x86 family 23 model 1), 2 CPUs, AVX2[, GPU name]``."""
    if not d:
        return "not recorded"
    cpu = d.get("cpu") or "unknown CPU"
    if d.get("cpu_family") is not None:
        cpu += f" (x86 family {d['cpu_family']} model {d.get('cpu_model')})"
    parts = [cpu]
    if d.get("cpus"):
        parts.append(f"{d['cpus']} CPUs")
    if d.get("isa"):
        parts.append(d["isa"].upper() if d["isa"] != "other" else "no AVX2")
    if d.get("gpu"):
        parts.append(d["gpu"])
    if d.get("allocator") == "tcmalloc":  # 3-10 % of a run's minutes (visor_vllm.allocator)
        parts.append("tcmalloc")
    return ", ".join(parts)


def distinct(hosts) -> list[dict]:
    """``hosts`` (descriptions, None skipped) with each machine once, by `label`, in order."""
    seen: dict[str, dict] = {}
    for h in hosts:
        if isinstance(h, dict):
            seen.setdefault(label(h), h)
    return list(seen.values())
