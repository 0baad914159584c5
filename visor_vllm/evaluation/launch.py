"""A ``vllm serve`` subprocess for a checkpoint directory, ready when its ``/health`` answers.

What. `served(model_dir)` starts ``vllm serve`` (the CLI of the current environment, never an
import of vLLM: evaluation talks to the server over HTTP, as users do), waits until
``/health`` answers 200, yields ``(base_url, log_path)`` and terminates it afterwards. VISOR
checkpoints get ``--middleware visor_vllm.serving.middleware.VisorMiddleware`` (the ``visor``
receipts evaluation reads FLOPs from); any other model (vLLM's own LLaVA-OneVision, the dense
baseline) is served plain. `served_together` starts several at once and yields when all are
ready (the recipe's VISOR and dense servers: their start-ups overlap).

Why here. The recipe serves what it trained and evaluates it the way users reach it; the tests
start their servers through the same function, so both use one set of flags.

Footguns. CPU defaults (``--enforce-eager``, float32, a 1 GiB KV cache, tcmalloc preloaded where
`visor_vllm.allocator` finds it): fine for the tiny presets, not a production configuration --
pass ``extra`` flags for anything else. A server
that exits or is not ready within ``startup_s`` raises `ServerError` with the log's tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MIDDLEWARE = "visor_vllm.serving.middleware.VisorMiddleware"


class ServerError(RuntimeError):
    """``vllm serve`` exited or did not become ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_visor(model_dir: str | os.PathLike) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("model_type") == "visor"


def serve_command(model_dir: str | os.PathLike, port: int, name: str,
                  extra: list[str] = (), middleware: bool = True) -> list[str]:
    """``middleware=False``: plain ``vllm serve`` (``visor:*`` metrics still, no receipts)."""
    visor = is_visor(model_dir)
    middleware = ["--middleware", MIDDLEWARE] if visor and middleware else []
    # LLaVA-OV's processor also profiles video, whose processor needs torchvision: off
    limit = '{"image": 2}' if visor else '{"image": 2, "video": 0}'
    return [str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name,
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
            "--max-num-batched-tokens", "8192", "--limit-mm-per-prompt", limit,
            "--max-num-seqs", "16", *middleware, *extra]


@contextlib.contextmanager
def served(model_dir: str | os.PathLike, name: str = "model", extra: list[str] = (),
           log: str | os.PathLike | None = None, startup_s: float = 300.0,
           env: dict | None = None, middleware: bool = True):
    """``(base_url, log_path)`` of a ready ``vllm serve`` of ``model_dir``.

    ``extra`` flags come last (vLLM keeps the last occurrence, so they override the defaults);
    ``env`` entries override the inherited environment.
    """
    with served_together([dict(model_dir=model_dir, name=name, extra=extra, log=log, env=env,
                               middleware=middleware)], startup_s) as [one]:
        yield one


@contextlib.contextmanager
def served_together(servers: list[dict], startup_s: float = 300.0):
    """``[(base_url, log_path)]`` of several ready servers, each ``servers`` entry the keyword
    arguments of `served` (``model_dir`` and ``name`` required).

    Why. A start-up is mostly one CPU's work (imports, loading, vLLM's profiling run): started
    at once, two servers are ready in about the time of one on two cores. Every server
    started is stopped on the way out, also when another fails to start (`ServerError`).
    """
    deadline = time.time() + startup_s
    running = []
    try:
        for kw in servers:
            running.append(_start(**kw))
        for proc, base, log in running:
            _wait_ready(proc, base, log, deadline, startup_s)
        yield [(base, log) for _, base, log in running]
    finally:
        for proc, _, _ in running:
            proc.terminate()
        for proc, _, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(model_dir, name: str = "model", extra=(), log=None, env: dict | None = None,
           middleware: bool = True):
    port = free_port()
    log = Path(log) if log else Path(tempfile.mkdtemp(prefix="visor-serve-")) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    from visor_vllm import allocator, envs  # media fetching as `visor-vllm serve` sets it

    env = allocator.preload_environment(  # tcmalloc, as vLLM's CPU worker asks
        {"VLLM_CPU_KVCACHE_SPACE": "1",
         **envs.child_environment(HF_HUB_OFFLINE="1", **(env or {}))})
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(model_dir, port, name, list(extra), middleware),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", log


def _wait_ready(proc, base: str, log: Path, deadline: float, startup_s: float) -> None:
    while True:
        if proc.poll() is not None:
            raise ServerError(f"vllm serve exited with {proc.returncode}:\n"
                              f"{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise ServerError(f"vllm serve not ready in {startup_s:.0f}s:\n"
                              f"{log.read_text()[-4000:]}")
        time.sleep(0.25)
