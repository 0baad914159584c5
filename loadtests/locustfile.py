"""User-level load on the OpenAI chat endpoint: one small image + one question per request.

    locust -f loadtests/locustfile.py --host http://localhost:8000 \\
        --headless --users 8 --spawn-rate 2 --run-time 2m

Environment: ``VISOR_MODEL`` (served model name; default: the first model the server lists at
``/v1/models``, e.g. ``visor-tiny`` behind ``make serve``), ``VISOR_MAX_TOKENS``
(default 32), ``VISOR_IMAGE_SIZE`` (square side in pixels, default 64), ``VISOR_BUDGETS``
(comma-separated ``visor_budget`` values cycled over requests, default ``auto,min,max``; locust
reports each budget under its own name). Every request is bounded: few output tokens,
temperature 0, a 120 s client timeout; a 200 with no choices, or (behind the VISOR middleware)
without the ``visor`` receipt, counts as a failure.
"""

from __future__ import annotations

import base64
import os
import struct
import zlib

try:
    from locust import HttpUser, between, task
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "loadtests/locustfile.py needs locust (the `test` extra): make setup, or pip install locust"
    ) from e

MODEL = os.environ.get("VISOR_MODEL")  # None: ask the server
MAX_TOKENS = int(os.environ.get("VISOR_MAX_TOKENS", "32"))
IMAGE_SIZE = int(os.environ.get("VISOR_IMAGE_SIZE", "64"))
BUDGETS = [b.strip() for b in os.environ.get("VISOR_BUDGETS", "auto,min,max").split(",") if b.strip()]
TIMEOUT_S = 120


def tiny_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB gradient PNG built with the standard library only (no PIL in the load generator)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in ((x * 4 + seed) % 256, (y * 4) % 256, 128))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


IMAGE_URL = "data:image/png;base64," + base64.b64encode(tiny_png(IMAGE_SIZE, IMAGE_SIZE)).decode()
QUESTIONS = ("What is in this image?", "Describe the colours.", "Is there any text in the image?")


class VisorChatUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.turn = 0
        self.model = MODEL
        if self.model is None:
            with self.client.get("/v1/models", name="models", catch_response=True) as resp:
                models = resp.json().get("data") if resp.status_code == 200 else None
                if not models:
                    resp.failure(f"cannot list /v1/models (HTTP {resp.status_code}); set VISOR_MODEL")
                    return
                self.model = models[0]["id"]

    @task
    def chat_with_image(self) -> None:
        if self.model is None:
            return
        question = QUESTIONS[self.turn % len(QUESTIONS)]
        budget = BUDGETS[self.turn % len(BUDGETS)]
        self.turn += 1
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                {"type": "text", "text": question},
            ]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "vllm_xargs": {"visor_budget": budget},
        }
        with self.client.post("/v1/chat/completions", json=body, timeout=TIMEOUT_S,
                              name=f"chat.completions+image budget={budget}",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif not resp.json().get("choices"):
                resp.failure("response has no choices")
            elif "visor" not in resp.json():
                resp.failure("no visor receipt: is the server running --middleware "
                             "visor_vllm.serving.middleware.VisorMiddleware?")
