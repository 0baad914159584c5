"""A real `vllm serve` subprocess on a tiny VISOR checkpoint, shared by the serve tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MODEL = "visor-tiny"
STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tmp_path_factory, *extra: str, ckpt=None):
    """``(base_url, log_path)`` of a ready ``vllm serve`` on ``ckpt`` (default: a fresh tiny one)."""
    from visor_vllm.testing import write_random_tiny_checkpoint

    if ckpt is None:
        ckpt = write_random_tiny_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))
    port = free_port()
    log = Path(tmp_path_factory.mktemp("serve-log")) / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", MODEL, "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "4096", "--max-num-batched-tokens", "8192",
           "--limit-mm-per-prompt", '{"image": 2}', "--max-num-seqs", "8",
           "--middleware", "visor_vllm.serving.middleware.VisorMiddleware", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not ready in {STARTUP_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with serving(tmp_path_factory) as s:
        yield s
