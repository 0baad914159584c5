"""Bad input never hurts the server: a live `vllm serve` of a tiny VISOR checkpoint answers each
bad request with a 4xx and a message a user can act on (a disconnect: a clean abort), and stays
healthy -- ``/health`` is 200, a normal image request still succeeds, and the server log gets no
traceback, no 5xx and no engine death (checked after every test by `stays_healthy`).

The fixture server allows 2 images per prompt and 4096 tokens of context.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from .conftest import MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

# What a hurt server leaves in its log (a 5xx, an unhandled exception, a dead engine).
HURT = re.compile(r"Traceback|Internal Server Error|EngineDeadError|EngineCore encountered|"
                  r"Engine core .*died|\" 5\d\d ")


# -- images ---------------------------------------------------------------------------------------

def png(h: int = 50, w: int = 70, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg(h: int = 64, w: int = 64, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(w: int, h: int, bit_depth: int = 8, colour_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG from its chunks: any header size (PIL cannot save 0x0 or a bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b""))
            + _chunk(b"IEND", b""))


def bomb_png(side: int = 30000) -> bytes:
    """A real decompression bomb: a ~110 kB 1-bit PNG of side x side black pixels (900 MB as a
    decoded 'L'/'1' image, 2.7 GB once converted to RGB). Compressed row by row."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(side // 1000))
    idat += z.compress(row * (side % 1000))
    return raw_png(side, side, bit_depth=1, colour_type=0, idat=idat + z.flush())


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_messages(*urls: str, text: str = "What is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


# -- clients and health -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, msgs, **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, **kw)


def rejected(call, status: int, *fragments: str) -> str:
    """Run ``call``; it must fail with exactly ``status`` and a message holding ``fragments``."""
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    body = err.body if isinstance(err.body, dict) else {}
    message = str(body.get("message", err.message))
    assert err.status_code == status, f"HTTP {err.status_code} (wanted {status}): {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the error message {message!r}"
    return message


def post(server, path: str, body: dict, timeout: float = 60):
    import httpx

    r = httpx.post(server[0] + path, json=body, timeout=timeout)
    try:
        message = r.json().get("error", {}).get("message", "")
    except ValueError:
        message = r.text
    return r.status_code, message


def metric(server, name: str) -> float:
    import httpx

    text = httpx.get(server[0] + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def server_pid(server) -> int | None:
    """The API server's pid (the `vllm serve` process itself, which decodes the images)."""
    import psutil

    port = server[0].rsplit(":", 1)[1]
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return p.pid
    return None


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(autouse=True)
def stays_healthy(server, client):
    """After every test: /health 200, a normal image request works, the log shows no hurt."""
    import httpx

    log: Path = server[1]
    start = log.stat().st_size
    yield
    assert httpx.get(server[0] + "/health", timeout=10).status_code == 200
    ok = chat(client, image_messages(data_url(png(seed=1))))
    assert ok.choices[0].message.content and ok.usage.completion_tokens == 4
    with open(log, errors="replace") as f:
        f.seek(start)
        new = f.read()
    hurt = HURT.search(new)
    assert hurt is None, f"server log after this test shows {hurt.group(0)!r}:\n{new[-4000:]}"


# -- broken images -------------------------------------------------------------------------------

def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BROKEN_IMAGES = {
    # case: (data URL, message fragments)
    "corrupt-base64": ("data:image/png;base64,iVBORw0KGgo!!not*base64@@", ["base64"]),
    "non-image-bytes": (data_url(b"this is plain text, not a picture\n" * 8),
                        ["Failed to load image", "cannot identify image file"]),
    "truncated-png": (data_url(_truncated(png())), ["Failed to load image", "truncated"]),
    "truncated-jpeg": (data_url(_truncated(jpeg()), "image/jpeg"),
                       ["Failed to load image", "truncated"]),
    "0x0-png": (data_url(raw_png(0, 0)), ["Failed to load image", "cannot identify image file"]),
}


@pytest.mark.parametrize("case", list(BROKEN_IMAGES))
def test_broken_image_is_400(client, case):
    url, fragments = BROKEN_IMAGES[case]
    rejected(lambda: chat(client, image_messages(url)), 400, *fragments)


def test_decompression_bomb_is_400_from_the_header_without_decoding(client, server):
    bomb = bomb_png()
    assert len(bomb) < 200_000  # small on the wire, 900 Mpixel in the header
    pid = server_pid(server)
    before = peak_rss_mib(pid) if pid else None
    message = rejected(lambda: chat(client, image_messages(data_url(bomb))), 400,
                       "30000x30000", "exceed the maximum", "VLLM_MAX_IMAGE_PIXELS")
    assert "decompression bomb" not in message  # PIL's 500 path (see visor_vllm.engine.inputs)
    if before is not None:  # decoding would need >= 900 MiB (2.7 GiB as RGB)
        assert peak_rss_mib(pid) - before < 256, "the API server's peak RSS grew on a bomb"


@pytest.mark.parametrize("h,w", [(1, 1), (1, 500), (500, 1)])
def test_one_pixel_wide_images_are_served(client, h, w):
    """Degenerate but valid images: LLaVA-OV's processor pads them; VISOR answers normally."""
    reply = chat(client, image_messages(data_url(png(h, w))))
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 4


# -- wrong shape of request ----------------------------------------------------------------------

def test_too_many_images_is_400(client):
    urls = [data_url(png(seed=s)) for s in range(3)]  # the server allows 2
    rejected(lambda: chat(client, image_messages(*urls)), 400, "At most 2 image(s)")


def test_image_part_in_text_only_completions_is_400(server):
    """/v1/completions takes text or token ids only: an image part is a schema error."""
    status, message = post(server, "/v1/completions", {
        "model": MODEL, "max_tokens": 4,
        "prompt": [{"type": "image_url", "image_url": {"url": data_url(png())}}]})
    assert status == 400, message
    assert "prompt" in message and "Input should be a valid" in message, message


@pytest.mark.parametrize("part", [
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
], ids=["video", "audio"])
def test_modality_visor_does_not_serve_is_400(client, part):
    kind = "video" if part["type"] == "video_url" else "audio"
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
    rejected(lambda: chat(client, msgs), 400, f"At most 0 {kind}(s)")


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "text+image"])
def test_prompt_over_context_length_is_400(client, with_image):
    urls = [data_url(png())] if with_image else []
    msgs = image_messages(*urls, text="word " * 5000)
    rejected(lambda: chat(client, msgs), 400, "maximum context length is 4096 tokens")


def test_max_tokens_over_context_length_is_400(client):
    rejected(lambda: chat(client, image_messages(data_url(png())), max_tokens=5000), 400,
             "max_tokens", "max_model_len=4096")


@pytest.mark.parametrize("xargs,fragments", [
    ({"visor_budget": [1]}, ["visor_budget must be", "integer >= 0"]),
    ({"visor_budget": -1}, ["visor_budget must be", "integer >= 0"]),
    ({"visor_budget": 1.5}, ["visor_budget must be", "integer >= 0"]),
    ({"visor_budget": None}, ["visor_budget must be"]),            # checked raw, before vLLM
    ({"visor_sa_layers": "a,b"}, ["visor_sa_layers", "integer layer numbers"]),
    ({"visor_sa_layers": [99]}, ["visor_sa_layers", "not SA-capable", "choose from"]),
    ({"visor_sa_layers": [0]}, ["visor_sa_layers", "not SA-capable"]),  # numbers are 1-based
    ({"visor_sa_layers": [[1]]}, ["visor_sa_layers", "integer layer numbers"]),
    ({"visor_colour": "red"}, ["unknown VISOR argument", "visor_colour"]),
    ({"VISOR_BUDGET": "min"}, ["unknown VISOR argument", "VISOR_BUDGET", "visor_budget"]),
    ({"visor_budget": 10 ** 30}, ["integers must be between"]),    # vLLM's own range check
], ids=["budget-list", "budget-negative", "budget-float", "budget-null", "layers-string",
        "layers-99", "layers-0", "layers-nested", "unknown-key", "upper-case-key", "budget-huge"])
def test_bad_budget_field_is_400(client, xargs, fragments):
    rejected(lambda: chat(client, image_messages(data_url(png())), extra_body={"vllm_xargs": xargs}),
             400, *fragments)


# -- a client that goes away ---------------------------------------------------------------------

def _wait_idle(server, timeout: float = 10) -> float:
    deadline = time.time() + timeout
    while (running := metric(server, "vllm:num_requests_running")) > 0 and time.time() < deadline:
        time.sleep(0.05)
    return running


def test_client_disconnect_mid_stream_aborts_the_request(server):
    import httpx

    body = {"model": MODEL, "messages": image_messages(data_url(png())), "stream": True,
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0}  # ~1 min if never aborted
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server[0] + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data:"))
            assert "chat.completion.chunk" in first
        # leaving the block closes the connection with the stream unfinished
    assert _wait_idle(server) == 0, "the abandoned request is still running"


def test_client_timeout_on_non_streaming_request_aborts_it(server):
    import httpx

    body = {"model": MODEL, "messages": image_messages(data_url(png())), "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=1.0)
    assert _wait_idle(server) == 0, "the abandoned request is still running"
