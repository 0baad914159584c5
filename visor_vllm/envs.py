"""Every environment variable visor-vllm reads or sets, typed and documented, in one place.

vLLM's pattern: read a variable as an attribute, ``envs.VISOR_TRAIN_ENGINE``; the value is
parsed from the environment at each access (no import-time caching, so a launcher or a test can
set it late). `describe()` lists every name with what it means; `export` / `export_default` are
the only writers (a server hands values to the processes it starts through the environment).
`tests/test_envs.py` fails when a module outside this one touches ``os.environ``/``os.getenv``
(copying the whole environment for a child process, ``{**os.environ}``, is allowed).

Footguns.
* Variables that belong to other tools are read here too (Accelerate's launch variables,
  torchrun's ranks, vLLM's image limit), so the project has one place that says what it takes
  from the environment. vLLM's own are read through ``vllm.envs`` (its defaults), lazily.
* Import nothing from visor_vllm here: every layer may import this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any


def _raw(name: str, env: Mapping[str, str] | None = None) -> str | None:
    return (os.environ if env is None else env).get(name)


def _only_one(name: str) -> Callable[[], bool]:
    """A security switch: on only for exactly ``1`` (no ``true``/``yes`` guessing)."""
    return lambda: (_raw(name) or "").strip() == "1"


def _flag(name: str, default: bool = False) -> Callable[[], bool]:
    def read() -> bool:
        raw = _raw(name)
        if raw is None or raw.strip() == "":
            return default
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return read


def _int(name: str, default: int | None) -> Callable[[], int | None]:
    def read() -> int | None:
        raw = (_raw(name) or "").strip()
        return int(raw) if raw else default
    return read


def _str(name: str, default: str = "") -> Callable[[], str]:
    return lambda: (_raw(name) or default).strip()


def _choice(name: str, values: dict[str, str]) -> Callable[[], str]:
    def read() -> str:
        raw = (_raw(name) or "").strip().lower()
        if raw not in values:
            raise ValueError(f"{name}={raw!r}: one of {sorted(k for k in values if k)}")
        return values[raw]
    return read


def _vllm(name: str) -> Callable[[], Any]:
    def read():
        import vllm.envs

        return getattr(vllm.envs, name)
    return read


# name -> (parser, what it means)
_VARIABLES: dict[str, tuple[Callable[[], Any], str]] = {
    # --- serving (read by the server's processes) ---
    "VISOR_DEFAULT_BUDGET": (_str("VISOR_DEFAULT_BUDGET"),
                             "the server's default budget when a request sets none: a word "
                             "(auto|min|max), a number, or a JSON object of budget keys "
                             "(visor_vllm.model.budget); `visor-vllm serve --default-budget` "
                             "sets it"),
    "VISOR_VISION_CACHE_MB": (_str("VISOR_VISION_CACHE_MB"),
                              "the worker's vision-feature cache bound in MB, 0 = off (default "
                              "256; visor_vllm.engine.vision_cache)"),
    "VISOR_PROCESSOR_CACHE_MB": (_str("VISOR_PROCESSOR_CACHE_MB"),
                                 "the front end's (API server's) processed-image cache bound in "
                                 "MB, 0 = off (default 1024; vLLM turns its own off for "
                                 "encoder-decoder models; visor_vllm.engine.vision_cache)"),
    "VISOR_CUDA_GRAPHS": (_only_one("VISOR_CUDA_GRAPHS"),
                          "exactly 1: leave vLLM's CUDA graphs on for VISOR (FULL_DECODE_ONLY on "
                          "a GPU; unproven there, visor_vllm.engine.config_hook); default off"),
    "VISOR_ALLOW_LOOPBACK_MEDIA": (_only_one("VISOR_ALLOW_LOOPBACK_MEDIA"),
                                   "exactly 1: image URLs may point at this host (tests; off by "
                                   "default, see SECURITY.md)"),
    "VISOR_RECEIPT_DIR": (_str("VISOR_RECEIPT_DIR"),
                          "the private directory receipts and executed-FLOP stats share "
                          "(default <tmp>/visor-<uid>, mode 0700)"),
    "VISOR_SERVER_ID": (_str("VISOR_SERVER_ID"),
                        "names one server for its processes (set by register() in the "
                        "top-level process; never set it yourself)"),
    "VISOR_RECEIPT_KEY": (_str("VISOR_RECEIPT_KEY"),
                          "per-server HMAC key of receipt ids (set with the server id; secret)"),
    "VLLM_MAX_IMAGE_PIXELS": (_vllm("VLLM_MAX_IMAGE_PIXELS"),
                              "vLLM's limit on an image's width x height (<= 0: none); read "
                              "through vllm.envs"),
    # --- training (visor_vllm.training) ---
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
                            "(visor_vllm.allocator.tune_host_allocator)"),
    # --- the host allocator (visor_vllm.allocator) ---
    "VISOR_TCMALLOC": (_str("VISOR_TCMALLOC"),
                       "the tcmalloc library the CLI and the vLLM servers it starts preload: a "
                       "path, 0 for none; unset: <venv>/lib/libtcmalloc_minimal.so.4 (made by "
                       "scripts/setup.sh) or the system's, where found"),
    "VISOR_TCMALLOC_REEXEC": (_only_one("VISOR_TCMALLOC_REEXEC"),
                              "1 in a CLI process that re-exec'd itself to preload tcmalloc, so "
                              "it never does again (set by visor_vllm.cli; never set it yourself)"),
    "LD_PRELOAD": (_str("LD_PRELOAD"),
                   "the dynamic linker's preloads: read to see whether tcmalloc is in; set, "
                   "tcmalloc first, for vLLM servers and the re-exec'd CLI (visor_vllm.allocator)"),
    # --- set by `accelerate launch` / torchrun (read, never set by the project's users) ---
    "ACCELERATE_USE_FSDP": (_flag("ACCELERATE_USE_FSDP"),
                            "true when the accelerate config says distributed_type: FSDP"),
    "ACCELERATE_USE_DEEPSPEED": (_flag("ACCELERATE_USE_DEEPSPEED"),
                                 "true when the accelerate config says distributed_type: DEEPSPEED"),
    "FSDP_VERSION": (_int("FSDP_VERSION", 1), "fsdp_version of that config (2 is supported)"),
    "FSDP_RESHARD_AFTER_FORWARD": (_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                                   "fsdp_reshard_after_forward of that config"),
    "RANK": (_int("RANK", None), "this process's rank (torchrun; unset: one process)"),
    "LOCAL_RANK": (_int("LOCAL_RANK", 0), "this process's rank on its node (its GPU)"),
    "LOCAL_WORLD_SIZE": (_int("LOCAL_WORLD_SIZE", None),
                         "processes on this node (torchrun; unset: the world size is used)"),
}

environment_variables: dict[str, Callable[[], Any]] = {k: v[0] for k, v in _VARIABLES.items()}

# vLLM environment defaults for media fetching, set by `visor-vllm serve` and the evaluation
# launcher (setdefault: the user's own values win). vLLM's defaults retry a URL that never
# answers for about two minutes and follow redirects, which would let a public URL bounce the
# fetch to this host or cloud metadata.
MEDIA_FETCH_ENV = {"VLLM_IMAGE_FETCH_TIMEOUT": "5",
                   "VLLM_MEDIA_FETCH_MAX_RETRIES": "1",   # attempts, not retries
                   "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
# what `visor-vllm serve` sets for vLLM unless the user did (`apply_server_defaults`)
SERVER_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "4",             # GB of KV cache on a CPU (vLLM needs a number)
    # LLaVA-OV shrinks every image to <= 2304 px anyway; a lower cap keeps a 0.5 MB PNG that
    # decodes to 179 M pixels (vLLM's default limit) from costing the server GBs of RAM
    "VLLM_MAX_IMAGE_PIXELS": str(4096 * 4096),
    "HF_HUB_OFFLINE": "1",                     # checkpoints are local directories
    **MEDIA_FETCH_ENV,
}


def describe() -> dict[str, str]:
    """Name -> what it means, for every variable read here."""
    return {k: v[1] for k, v in _VARIABLES.items()}


def get(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The raw value of a documented variable, from ``env`` (a mapping) or the environment."""
    if name not in _VARIABLES:
        raise KeyError(f"{name} is not a documented visor-vllm variable (visor_vllm/envs.py)")
    return _raw(name, env)


def _documented(name: str) -> str:
    if name not in _VARIABLES and name not in SERVER_DEFAULTS and name not in _RUNTIME:
        raise KeyError(f"{name} is not a documented visor-vllm variable (visor_vllm/envs.py)")
    return name


# set for torch.distributed when one process runs without torchrun (training/engines.py)
_RUNTIME = ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def export(name: str, value: str) -> None:
    """Set a documented variable for this process and the processes it starts."""
    os.environ[_documented(name)] = str(value)


def export_default(name: str, value: str) -> None:
    """Set a documented variable unless the user already did."""
    os.environ.setdefault(_documented(name), str(value))


def apply_server_defaults() -> None:
    """`SERVER_DEFAULTS`, each unless already set (`visor-vllm serve`, before exec'ing vLLM)."""
    for key, value in SERVER_DEFAULTS.items():
        export_default(key, value)


def snapshot() -> dict[str, str]:
    """A copy of this process's environment (to start a process with it, changed)."""
    return {**os.environ}


def child_environment(**overrides: str) -> dict[str, str]:
    """This environment with `MEDIA_FETCH_ENV` defaults under it and ``overrides`` over it, for
    a child server process (the evaluation launcher)."""
    return {**MEDIA_FETCH_ENV, **os.environ, **overrides}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
