"""The OpenAI server side of VISOR: per-request receipts in responses.

What. `VisorMiddleware` is an ASGI middleware for vLLM's OpenAI server, installed with vLLM's own
flag ``--middleware visor_vllm.serving.middleware.VisorMiddleware`` (``visor-vllm serve`` adds it). For
``POST /v1/chat/completions`` and ``/v1/completions`` it

1. gives the request a receipt id (``vllm_xargs["visor_receipt"]``, see `visor_vllm.engine.receipts`);
   a client-supplied one is an HTTP 400;
2. after the response, reads the receipt the worker wrote at the request's first step and
   computes the request's LLM FLOPs (`visor_vllm.model.flops.request_flops`) from it and ``usage``;
3. adds a ``visor`` object to the response -- for a plain response at the top level of the JSON
   body plus ``x-visor-*`` headers; for a stream, to the chunk(s) that carry ``finish_reason``
   (the stream's shape is unchanged: no extra chunk, no usage chunk unless asked for);

The ``visor`` object: ``sa_layers`` (1-based), ``num_sa_layers``, ``config_index``,
``budget``, ``budget_source`` (router | default | override), ``flops_cap_met``,
``image_tokens``, ``text_tokens``, ``output_tokens``, ``visor_flops``, ``dense_flops``,
``savings`` and the prefill/decode split.

Why a middleware. vLLM 0.32 offers no response field a model can fill, and its stat loggers
receive no per-request model data (`visor_vllm.engine.receipts` explains the channel). ``--middleware``
is vLLM's supported hook, so nothing in vLLM is patched. The ``visor:*`` series do not come from
here: the stat-logger plugin (`visor_vllm.serving.stat_logger`) exports what the engine executed,
with or without this middleware.

Footguns.
* Streams: to count output tokens the middleware asks vLLM for the usage chunk
  (``stream_options.include_usage``) and drops it again if the client did not ask for it. A
  client that disconnects mid-stream gets nothing.
* ``n > 1``: ``output_tokens`` is the sum over choices and the receipt describes one prefill,
  so its FLOPs are an estimate; ``/metrics`` counts every sample's prefill as executed.
* Requests served without this middleware (offline ``LLM``, plain ``vllm serve``) still run
  VISOR and are in ``visor:*``, but carry no receipt.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

from visor_vllm.engine import receipts

logger = logging.getLogger(__name__)

PATHS = ("/v1/chat/completions", "/v1/completions")


# ---------------------------------------------------------------------------------------------
# What a receipt says about a request, with FLOPs
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _config(model_path: str):
    from visor_vllm.model.config import VisorConfig

    return VisorConfig.from_pretrained(model_path)


def summarize(receipt: dict, output_tokens: int) -> dict:
    """The client-facing ``visor`` object: the receipt plus the request's LLM FLOPs."""
    from visor_vllm.model.flops import request_flops

    cfg = _config(receipt["model"])
    f = request_flops(cfg, receipt["n_image"], receipt["n_text"], output_tokens,
                      [n - 1 for n in receipt["sa_layers"]],
                      n_routing=min(receipt["n_routing"], receipt["n_text"]),
                      routed=receipt["routed"])
    return dict(
        sa_layers=receipt["sa_layers"], num_sa_layers=len(receipt["sa_layers"]),
        config_index=receipt["config_index"], budget=receipt["budget"],
        budget_source=receipt["budget_source"], max_flops=receipt["max_flops"],
        flops_cap_met=receipt["flops_cap_met"], image_tokens=receipt["n_image"],
        text_tokens=receipt["n_text"], output_tokens=output_tokens,
        visor_flops=f["visor_flops"], dense_flops=f["dense_flops"], savings=f["savings"],
        visor_prefill_flops=f["visor_prefill_flops"], visor_decode_flops=f["visor_decode_flops"],
        dense_prefill_flops=f["dense_prefill_flops"], dense_decode_flops=f["dense_decode_flops"],
    )


# ---------------------------------------------------------------------------------------------
# The middleware
# ---------------------------------------------------------------------------------------------

class VisorMiddleware:
    """ASGI middleware; see the module docstring. ``--middleware visor_vllm.serving.middleware.VisorMiddleware``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = None
        if not isinstance(request, dict):  # vLLM answers malformed bodies itself
            return await self.app(scope, _replay(body, receive), send)
        xargs = request.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return await self.app(scope, _replay(body, receive), send)
        if xargs and receipts.KEY in xargs:
            return await _json_error(send, 400, f"vllm_xargs.{receipts.KEY} is set by the server; "
                                                "remove it from the request")
        rid = receipts.new_id()
        request["vllm_xargs"] = {**(xargs or {}), receipts.KEY: rid}
        stream = bool(request.get("stream"))
        wants_usage = False
        if stream:
            opts = request.get("stream_options")
            opts = opts if isinstance(opts, dict) else {}
            wants_usage = bool(opts.get("include_usage"))
            request["stream_options"] = {**opts, "include_usage": True}
        new_body = json.dumps(request).encode()
        scope = dict(scope, headers=_with_length(scope["headers"], len(new_body)))
        try:
            if stream:
                await self._stream(scope, _replay(new_body, receive), send, rid, wants_usage)
            else:
                await self._plain(scope, _replay(new_body, receive), send, rid)
        finally:
            receipts.discard(rid)  # whatever happened, leave no file behind

    # -- a plain JSON response: buffer it, add ``visor`` and headers ------------------------------
    async def _plain(self, scope, receive, send, rid):
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._finish_plain(start, b"".join(chunks), send, rid)
            else:
                await send(message)

        await self.app(scope, receive, capture)

    def _account(self, rid: str, output_tokens: int) -> dict | None:
        """The request's ``visor`` object; None without a receipt.

        Never raises: a broken receipt must not turn a served request into an error.
        """
        receipt = receipts.take(rid)
        if receipt is None:
            return None
        try:
            return summarize(receipt, output_tokens)
        except Exception:  # noqa: BLE001 - logged, and the response goes out unchanged
            logger.exception("VISOR: could not account receipt %s", rid)
            return None

    async def _finish_plain(self, start, body, send, rid):
        visor = None
        if start.get("status") == 200:
            try:
                response = json.loads(body)
                usage = response.get("usage") or {}
                visor = self._account(rid, int(usage.get("completion_tokens") or 0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                visor = None
            if visor is not None:
                response["visor"] = visor
                body = json.dumps(response).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        if visor is not None:
            headers += [(b"x-visor-sa-layers", ",".join(map(str, visor["sa_layers"])).encode()),
                        (b"x-visor-flops", str(visor["visor_flops"]).encode()),
                        (b"x-visor-dense-flops", str(visor["dense_flops"]).encode())]
        await send(dict(start, headers=headers))
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- a server-sent-event stream: hold back finishing chunks until usage is known --------------
    async def _stream(self, scope, receive, send, rid, wants_usage):
        state = dict(buffer=b"", held=[], chunks=0, done=False, ok=False)

        async def emit(events: list[bytes], more: bool = True):
            if events or not more:
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": more})

        async def relay(message):
            if message["type"] == "http.response.start":
                state["ok"] = message.get("status") == 200
                return await send(message)
            if message["type"] != "http.response.body" or not state["ok"]:
                return await send(message)
            state["buffer"] += message.get("body", b"")
            *events, state["buffer"] = state["buffer"].split(b"\n\n")
            out = []
            for raw in events:
                out += self._on_event(raw + b"\n\n", state, rid, wants_usage)
            if not message.get("more_body"):
                out += state["held"] + ([state["buffer"]] if state["buffer"] else [])
                state["held"], state["buffer"] = [], b""
            await emit(out, more=bool(message.get("more_body")))

        try:
            await self.app(scope, receive, relay)
        finally:
            if state["ok"] and not state["done"]:  # aborted: count what ran
                self._account(rid, state["chunks"])

    def _on_event(self, raw: bytes, state: dict, rid: str, wants_usage: bool) -> list[bytes]:
        """One SSE event in, the events to send now out."""
        data = raw.strip()
        if not data.startswith(b"data:"):
            return [raw]
        payload = data[5:].strip()
        if payload == b"[DONE]":
            held, state["held"] = state["held"], []
            return held + [raw]
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            return [raw]
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        if not choices and usage is not None:  # the usage chunk: now the request is complete
            held, state["held"] = state["held"], []
            state["done"] = True
            visor = self._account(rid, int(usage.get("completion_tokens") or 0))
            if visor is not None:
                held = [_sse(dict(json.loads(h.strip()[5:]), visor=visor)) for h in held]
                if wants_usage:
                    chunk["visor"] = visor
                    return held + [_sse(chunk)]
            return held + ([raw] if wants_usage else [])
        state["chunks"] += sum(1 for c in choices if (c.get("delta") or {}).get("content")
                               or c.get("text"))
        if any(c.get("finish_reason") for c in choices):
            state["held"].append(raw)  # sent with ``visor`` once the usage chunk arrives
            return []
        return [raw]


# ---------------------------------------------------------------------------------------------
# ASGI helpers
# ---------------------------------------------------------------------------------------------

async def _read_body(receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _replay(body: bytes, receive):
    """A ``receive`` that yields ``body`` once, then the real connection's messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_length(headers, length: int):
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return kept + [(b"content-length", str(length).encode())]


def _sse(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _json_error(send, status: int, message: str):
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
