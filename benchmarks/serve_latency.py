"""TTFT and decode latency of one `vllm serve` model on fresh random images (one run, one model).

    python benchmarks/serve_latency.py MODEL_DIR [--requests 3] [--image 384x384] [--max-tokens 32]
        [--turns 2] [--xargs '{"visor_budget": "max"}'] [--port 8123] [--json out.json]
        [-- extra vllm serve args]

Starts the server (dtype bfloat16, eager, 2 OMP threads, dummy weights when the dir has none),
waits for /health, sends each request alone and streaming with a *fresh* random image (so no
cache hides the encoder), prints one JSON line per request and a summary. ``--turns 2`` makes
each request a conversation: turn 2 re-sends turn 1's image, question and answer plus a new
question, as chat clients do, and its TTFT is reported apart (``median_ttft_turn2_s``): with
VISOR's vision cache on (the default) turn 2 skips SigLIP; ``VISOR_VISION_CACHE_MB=0`` in the
environment measures the same without it. Not a test: timings
on a 2-core box vary run to run; compare models only within one machine and session.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def data_url(rng, w: int, h: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start(model: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "HF_HUB_OFFLINE": "1"}
    dummy = [] if any(model.glob("*.safetensors")) else ["--load-format", "dummy"]
    # LLaVA-OV also declares videos, whose processor needs torchvision: switch them off
    llava = json.loads((model / "config.json").read_text())["model_type"] == "llava_onevision"
    limits = '{"image": 1, "video": 0}' if llava else '{"image": 1}'
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(model), "--port", str(port),
           "--served-model-name", "m", "--dtype", "bfloat16", "--enforce-eager",
           "--max-model-len", "10000", "--max-num-batched-tokens", "10000",
           "--limit-mm-per-prompt", limits, *dummy, *extra]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return time.time() - t0
        except OSError:
            time.sleep(1)
    raise SystemExit("server not ready")


QUESTIONS = ["Describe the image in detail.", "What is in its top left corner?",
             "Which colour covers most of it?", "Is anything written on it?"]


def conversation(url: str, answers: list[str]) -> list[dict]:
    """Turn ``len(answers) + 1`` of a chat about one image: the image rides in the first turn."""
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTIONS[0]}]}]
    for i, a in enumerate(answers):
        msgs += [{"role": "assistant", "content": a},
                 {"role": "user", "content": QUESTIONS[(i + 1) % len(QUESTIONS)]}]
    return msgs


def one_request(client, url: str, max_tokens: int, xargs: dict | None,
                answers: list[str] = ()) -> dict:
    msgs = conversation(url, list(answers))
    t0 = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True,
                                                            **({"vllm_xargs": xargs} if xargs else {})})
    usage, text = None, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    ttft = stamps[0] - t0
    itl = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return {"ttft_s": round(ttft, 3), "itl_ms": round(1000 * itl, 1),
            "prompt_tokens": usage.prompt_tokens if usage else None, "chunks": len(stamps),
            "text": "".join(text)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--image", default="384x384")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--turns", type=int, default=1, help="turns per conversation (same image)")
    ap.add_argument("--xargs", type=json.loads, default=None)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("serve_args", nargs="*")
    args = ap.parse_args()
    from openai import OpenAI

    port = args.port or _free_port()
    log = Path(f"/tmp/serve_latency_{port}.log")
    proc = start(args.model, port, args.serve_args, log)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(base, proc)
        client = OpenAI(base_url=base + "/v1", api_key="none", timeout=1800, max_retries=0)
        w, h = map(int, args.image.split("x"))
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.requests):
            url, answers = data_url(rng, w, h), []
            for turn in range(1, args.turns + 1):
                row = one_request(client, url, args.max_tokens, args.xargs, answers)
                answers.append(row.pop("text"))
                rows.append({"request": i, "turn": turn, **row})
                print(json.dumps(rows[-1]), flush=True)
        first = [r for r in rows if r["turn"] == 1]
        summary = {"model": str(args.model), "server_ready_s": round(ready, 1), "requests": rows,
                   "vision_cache_mb": os.environ.get("VISOR_VISION_CACHE_MB", "default"),
                   "median_ttft_s": float(np.median([r["ttft_s"] for r in first])),
                   "median_itl_ms": float(np.median([r["itl_ms"] for r in rows]))}
        for turn in range(2, args.turns + 1):
            summary[f"median_ttft_turn{turn}_s"] = float(np.median(
                [r["ttft_s"] for r in rows if r["turn"] == turn]))
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
