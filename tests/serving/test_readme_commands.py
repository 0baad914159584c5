"""The README's client commands, as written, against a live server: locust and
``vllm bench serve`` with images (offline: ``--tokenizer DIR``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CHECKPOINTS, MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_locust_runs_clean_with_the_served_model_found_by_itself(server):
    env = {k: v for k, v in os.environ.items() if k != "VISOR_MODEL"}
    env.update(VISOR_MAX_TOKENS="4", VISOR_IMAGE_SIZE="32")
    out = subprocess.run([str(BIN / "locust"), "-f", str(ROOT / "loadtests/locustfile.py"),
                          "--host", server[0], "--headless", "--users", "2", "--spawn-rate", "2",
                          "--run-time", "8s", "--only-summary", "--stop-timeout", "30"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]  # 1 on any failure
    assert "budget=auto" in out.stdout + out.stderr


def test_vllm_bench_serve_with_images_offline(server, tmp_path):
    host, port = server[0].removeprefix("http://").split(":")
    cmd = [str(BIN / "vllm"), "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--host", host, "--port", port,
           "--model", MODEL, "--tokenizer", CHECKPOINTS[server[0]],
           "--dataset-name", "random-mm", "--num-prompts", "4", "--random-input-len", "16",
           "--random-output-len", "4", "--random-mm-base-items-per-request", "1",
           "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
           "--random-mm-bucket-config", "{(64, 64, 1): 1.0}",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 4 and result.get("failed", 0) == 0
