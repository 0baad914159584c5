"""Every environment variable visor-vllm reads, typed and documented, in one place (vLLM's pattern).

Read a variable as an attribute, ``envs.VISOR_TRAIN_ENGINE``: the value is parsed from the
environment at each access (no import-time caching, so a launcher or a test can set it late).
`environment_variables` maps each name to its parser; `describe` lists them for docs.

Footgun: variables that belong to other tools (Accelerate's launch variables below) are read
here too, so the project has one place that says what it takes from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _flag(name: str, default: bool = False) -> Callable[[], bool]:
    def read() -> bool:
        raw = os.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return read


def _int(name: str, default: int) -> Callable[[], int]:
    def read() -> int:
        raw = os.environ.get(name, "").strip()
        return int(raw) if raw else default
    return read


def _choice(name: str, values: dict[str, str]) -> Callable[[], str]:
    def read() -> str:
        raw = os.environ.get(name, "").strip().lower()
        if raw not in values:
            raise ValueError(f"{name}={raw!r}: one of {sorted(k for k in values if k)}")
        return values[raw]
    return read


def _str(name: str, default: str = "") -> Callable[[], str]:
    return lambda: os.environ.get(name, default).strip()


# name -> (parser, what it means)
_VARIABLES: dict[str, tuple[Callable[[], Any], str]] = {
    # --- training (visor_vllm.training.engines) ---
    "VISOR_TRAIN_ENGINE": (lambda: _str("VISOR_TRAIN_ENGINE")().lower(),
                           "'fsdp2' applies FSDP2 under any launcher (torchrun); 'accelerate' lets "
                           "Accelerate decide; unset: the launch decides"),
    "VISOR_CHECK_HOST_SYNC": (_choice("VISOR_CHECK_HOST_SYNC", {"": "off", "0": "off",
                                                                "1": "raise", "raise": "raise",
                                                                "count": "count"}),
                              "1: every training step runs under visor_vllm.host_sync and fails "
                              "on a host synchronisation; 'count': the steps count them instead "
                              "(metrics.jsonl 'host_syncs'); debugging, slow"),
    "VISOR_MALLOC_TUNING": (_flag("VISOR_MALLOC_TUNING", True),
                            "0: leave glibc malloc's thresholds alone in training processes "
                            "(visor_vllm.training.engines.tune_host_allocator)"),
    # --- set by `accelerate launch` from its config file (read, never set, here) ---
    "ACCELERATE_USE_FSDP": (_flag("ACCELERATE_USE_FSDP"),
                            "true when the accelerate config says distributed_type: FSDP"),
    "ACCELERATE_USE_DEEPSPEED": (_flag("ACCELERATE_USE_DEEPSPEED"),
                                 "true when the accelerate config says distributed_type: DEEPSPEED"),
    "FSDP_VERSION": (_int("FSDP_VERSION", 1), "fsdp_version of that config (2 is supported)"),
    "FSDP_RESHARD_AFTER_FORWARD": (_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                                   "fsdp_reshard_after_forward of that config"),
}

environment_variables: dict[str, Callable[[], Any]] = {k: v[0] for k, v in _VARIABLES.items()}


def describe() -> dict[str, str]:
    """Name -> what it means, for every variable read here."""
    return {k: v[1] for k, v in _VARIABLES.items()}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
