"""The OpenAI server side of VISOR: per-request receipts in responses, and the request checks.

What. `VisorMiddleware` is an ASGI middleware for vLLM's OpenAI server, installed with vLLM's own
flag ``--middleware visor_vllm.serving.middleware.VisorMiddleware`` (``visor-vllm serve`` adds it).
It is the outermost layer, so it first does what must come before anything else:

* ``--api-key``: every POST but ``/health`` and ``/ping`` needs the key *before its body is
  read* (vLLM's own check runs later and leaves ``/invocations`` open);
* on every endpoint that runs the model (chat, completions, responses, messages, invocations):
  VISOR arguments are validated from the raw JSON (vLLM would coerce ``true`` to 1, and check
  a stream's budget only after the 200 went out), a client's ``visor_receipt`` is refused,
  ``stream`` must be a boolean, ``echo`` is refused, routing tokens typed into messages are
  removed, and image URLs that are local files, this host, link-local or unresolvable are
  refused (`_media_problem`, `_resolve_problem`); a media fetch vLLM answers with 500 becomes a
  400 -- all as 400s with a message.

Then, for ``POST /v1/chat/completions`` and ``/v1/completions``, it

1. gives the request a receipt id (``vllm_xargs["visor_receipt"]``, an HMAC'd id only the
   server can make, see `visor_vllm.engine.receipts`);
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

import asyncio
import json
import logging
import time
from functools import lru_cache

from visor_vllm import envs
from visor_vllm.engine import receipts

logger = logging.getLogger(__name__)

PATHS = ("/v1/chat/completions", "/v1/completions")  # receipts in the response
# every endpoint that runs the model: VISOR arguments checked before vLLM parses them
JSON_PATHS = PATHS + ("/v1/responses", "/v1/messages", "/invocations",
                      "/v1/chat/completions/batch", "/v1/messages/count_tokens", "/tokenize")
UNGUARDED = ("/health", "/ping")  # vLLM leaves these open with --api-key too
SWEEP_EVERY_S = 600
MAX_MEDIA_HOSTS = 16
LOOPBACK_ENV = "VISOR_ALLOW_LOOPBACK_MEDIA"  # 1: image URLs may point at this host


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
                      routed=receipt["routed"],
                      n_image_dense=receipt.get("n_image_dense"))  # VISOR-TR: full count
    return dict(
        sa_layers=receipt["sa_layers"], num_sa_layers=len(receipt["sa_layers"]),
        config_index=receipt["config_index"], budget=receipt["budget"],
        budget_source=receipt["budget_source"], max_flops=receipt["max_flops"],
        flops_cap_met=receipt["flops_cap_met"], image_tokens=receipt["n_image"],
        dense_image_tokens=f["dense_image_tokens"],
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
        self._api_tokens: list[bytes] | None = None  # vLLM's --api-key hashes, found lazily
        receipts.runtime_dir()  # a runtime dir others could write stops the server at start
        receipts.sweep()  # receipts of an earlier server nobody will read
        self._swept = time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        # --api-key first, before any body is read, on every POST that can run the model (vLLM's
        # own check does not cover /invocations); the answer is vLLM's own 401
        if path not in UNGUARDED and not _authorised(scope, self._tokens(scope)):
            return await _send_json(send, 401, {"error": "Unauthorized"})
        if path not in JSON_PATHS:
            return await self.app(scope, receive, send)
        if time.monotonic() - self._swept > SWEEP_EVERY_S:  # receipts of timed-out requests
            self._swept = time.monotonic()
            receipts.sweep()
        body = await _read_body(receive)
        try:
            request = json.loads(body)
        except RecursionError:
            return await _json_error(send, 400, "request body is nested too deeply")
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer, ...
            request = None  # vLLM answers malformed bodies itself
        if not isinstance(request, dict):
            return await self.app(scope, _replay(body, receive), send)
        problem = self._check(request, path, scope)
        media = _media_urls(request)
        if problem is None:
            problem, hosts = _media_problem(media, _model_config(scope))
            problem = problem or await _resolve_problem(hosts)
        if problem:
            return await _json_error(send, 400, problem)
        if path == "/tokenize" and _served_config(scope) is not None:
            # vLLM's encoder-decoder path answers {"count": 0, "tokens": []} for every prompt
            try:  # off the event loop: the first call loads the processor
                tokens = await asyncio.to_thread(decoder_tokens, request, _model_config(scope))
            except (ValueError, TypeError, KeyError) as e:
                return await _json_error(send, 400, f"cannot tokenize this request: {e}")
            except Exception as e:  # noqa: BLE001 -- e.g. a chat template error: never a crash
                bad_template = type(e).__module__.startswith("jinja2")
                return await _json_error(send, 400 if bad_template else 500,
                                         f"cannot tokenize this request: "
                                         f"{type(e).__name__}: {e}")
            return await _send_json(send, 200, tokens)
        if path not in PATHS:  # accounted in visor:*, no receipt (vLLM shapes these responses)
            new_body = json.dumps(request).encode()
            scope = dict(scope, headers=_with_length(scope["headers"], len(new_body)))
            if _as_bool(request.get("stream")):
                return await self.app(scope, _replay(new_body, receive), send)
            return await self._plain(scope, _replay(new_body, receive), send, None, media)
        rid = receipts.new_id()
        request["vllm_xargs"] = {**(request.get("vllm_xargs") or {}), receipts.KEY: rid}
        stream = _as_bool(request.get("stream"))
        wants_usage = False
        if stream:
            opts = request.get("stream_options")
            opts = opts if isinstance(opts, dict) else {}
            wants_usage = _as_bool(opts.get("include_usage"))
            request["stream_options"] = {**opts, "include_usage": True}
        new_body = json.dumps(request).encode()
        scope = dict(scope, headers=_with_length(scope["headers"], len(new_body)))
        try:
            if stream:
                await self._stream(scope, _replay(new_body, receive), send, rid, wants_usage, media)
            else:
                await self._plain(scope, _replay(new_body, receive), send, rid, media)
        finally:
            receipts.discard(rid)  # whatever happened, leave no file behind

    # -- what is refused before vLLM sees the request ---------------------------------------------
    def _tokens(self, scope) -> list[bytes]:
        if self._api_tokens is None:
            self._api_tokens = _find_tokens(self.app)
        return self._api_tokens

    def _check(self, request: dict, path: str, scope) -> str | None:
        """The 400 message for a request VISOR refuses (media URLs aside), or None. Mutates
        ``request`` only to drop routing tokens typed into message text (only the template's
        may vote)."""
        from visor_vllm.model.budget import BudgetError, parse_budget

        xargs = request.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return "vllm_xargs must be a JSON object"
        if xargs and receipts.KEY in xargs:
            return f"vllm_xargs.{receipts.KEY} is set by the server; remove it from the request"
        cfg = _served_config(scope)
        if xargs:  # the raw JSON: vLLM would coerce true to 1 before the engine validates
            try:
                parse_budget(xargs, cfg)
            except (BudgetError, ValueError, TypeError) as e:
                return str(e) if isinstance(e, BudgetError) else f"invalid VISOR arguments: {e}"
        stream = request.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return f"stream must be true or false, got {json.dumps(stream)[:40]}"
        if path in ("/v1/completions", "/invocations") and request.get("echo"):
            return ("echo is not supported by VISOR: the prompt is an encoder-decoder input "
                    "whose text tokens are not returned")
        _strip_routing_tokens(request, getattr(cfg, "routing_token", None))
        return None

    # -- a plain JSON response: buffer it, add ``visor`` and headers ------------------------------
    async def _plain(self, scope, receive, send, rid, media=()):
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._finish_plain(start, b"".join(chunks), send, rid, media)
            else:
                await send(message)

        await self.app(scope, receive, capture)

    def _account(self, rid: str, output_tokens: int) -> dict | None:
        """The request's ``visor`` object; None without a receipt.

        Never raises: a broken receipt must not turn a served request into an error.
        """
        receipt = receipts.take(rid) if rid else None
        if receipt is None:
            return None
        try:
            return summarize(receipt, output_tokens)
        except Exception:  # noqa: BLE001 - logged, and the response goes out unchanged
            logger.exception("VISOR: could not account receipt %s", rid)
            return None

    async def _finish_plain(self, start, body, send, rid, media=()):
        visor = None
        message = (_fetch_error(body) if start.get("status") == 500
                   and any(_fetched(u) for u in media) else None)
        if message is not None:
            # vLLM answers a media URL it could not load (refused, timed out) with a 500; it is
            # the client's URL that failed, so it is the client's error
            return await _json_error(send, 400, "an image could not be loaded: "
                                     + (message or "the fetch failed or timed out"))
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
    async def _stream(self, scope, receive, send, rid, wants_usage, media=()):
        state = dict(buffer=b"", held=[], chunks=0, done=False, ok=False, error=None, body=b"")

        async def emit(events: list[bytes], more: bool = True):
            if events or not more:
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": more})

        async def relay(message):
            if message["type"] == "http.response.start":
                state["ok"] = message.get("status") == 200
                if message.get("status") == 500 and any(_fetched(u) for u in media):
                    state["error"] = message  # vLLM fetches media before the stream: a JSON 500
                    return None
                return await send(message)
            if state["error"] is not None and message["type"] == "http.response.body":
                state["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    await self._finish_plain(state["error"], state["body"], send, None, media)
                return None
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
    await _send_json(send, status, {"error": {"message": message, "type": "BadRequestError",
                                              "param": None, "code": status}})


async def _send_json(send, status: int, payload: dict):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Request checks
# ---------------------------------------------------------------------------------------------

def _find_tokens(app, depth: int = 64) -> list[bytes]:
    """vLLM's ``--api-key`` hashes, from its AuthenticationMiddleware further down the stack."""
    for _ in range(depth):
        if app is None:
            break
        tokens = getattr(app, "api_tokens", None)
        if isinstance(tokens, list):
            return tokens
        app = getattr(app, "app", None)
    return []


def _authorised(scope, tokens: list[bytes]) -> bool:
    """vLLM's own rule: ``Authorization: Bearer <one of the keys>`` (compared as hashes)."""
    if not tokens:
        return True
    import hashlib
    import secrets

    value = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, param = value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(param.encode("utf-8")).digest()
    return any(secrets.compare_digest(digest, t) for t in tokens)


def _as_bool(value) -> bool:
    return value is True


# ---------------------------------------------------------------------------------------------
# /tokenize: the tokens the VISOR model really sees
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _processor(path: str):
    from visor_vllm.checkpoints.files import load_processor

    return load_processor(path)


def _template_messages(messages) -> list[dict]:
    """OpenAI chat messages -> the chat template's (image parts of any kind become ``image``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("every message needs a role")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
                elif kind in ("image_url", "image", "input_image", "image_pil", "image_embeds"):
                    parts.append({"type": "image"})
                else:
                    raise ValueError(f"content part of type {kind!r} is not supported by VISOR")
        else:
            parts = [{"type": "text", "text": ""}]
        out.append({"role": m["role"], "content": parts})
    return out


def decoder_tokens(request: dict, model_config) -> dict:
    """vLLM's ``/tokenize`` answer for a VISOR server: the *decoder* prompt's tokens.

    VISOR is served as an encoder-decoder model: the image placeholders become the encoder
    input and the decoder prompt is everything else, the routing token the chat template puts
    after each question included (`VisorMultiModalProcessor.create_decoder_prompt`). So the
    tokens are the rendered prompt's with the image placeholders removed; ``count`` is what a
    receipt reports as ``text_tokens`` for the same request.
    """
    proc = _processor(str(model_config.tokenizer))
    tok = proc.tokenizer
    if "messages" in request:
        text = proc.apply_chat_template(
            _template_messages(request["messages"]), tokenize=False,
            add_generation_prompt=bool(request.get("add_generation_prompt", True)),
            continue_final_message=bool(request.get("continue_final_message", False)))
        special = bool(request.get("add_special_tokens", False))
    elif isinstance(request.get("prompt"), str):
        text, special = request["prompt"], bool(request.get("add_special_tokens", True))
    else:
        raise ValueError("give 'prompt' (a string) or 'messages'")
    ids = tok(text.replace(proc.image_token, ""), add_special_tokens=special)["input_ids"]
    out = {"count": len(ids), "max_model_len": model_config.max_model_len, "tokens": ids,
           "token_strs": tok.convert_ids_to_tokens(ids) if request.get("return_token_strs")
           else None}
    return out


def _model_config(scope):
    try:
        return scope["app"].state.vllm_config.model_config
    except (KeyError, AttributeError):
        return None


def _served_config(scope):
    """The served checkpoint's VisorConfig (None if unknown or not VISOR)."""
    hf = getattr(_model_config(scope), "hf_config", None)
    return hf if getattr(hf, "model_type", None) == "visor" else None


def _strip_routing_tokens(request: dict, token: str | None) -> None:
    """Routing tokens typed into messages would vote: only the chat template's may."""
    if not token:
        return

    def clean(node, depth=0):
        if depth > 32:
            return node
        if isinstance(node, str):
            while token in node:  # "<|ro<|route|>ute|>" must not leave one behind
                node = node.replace(token, "")
            return node
        if isinstance(node, list):
            return [clean(x, depth + 1) for x in node]
        if isinstance(node, dict):
            return {k: clean(v, depth + 1) if k in ("content", "text", "input") else v
                    for k, v in node.items()}
        return node

    for key in ("messages", "input", "system", "instructions", "prompt"):
        if key in request:
            request[key] = clean(request[key])


def _media_urls(request: dict) -> list[str]:
    """Every ``image_url`` / ``video_url`` / ``audio_url`` in the request (bounded walk)."""
    found: list[str] = []

    def walk(node, depth=0):
        if depth > 32 or len(found) > 256:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("image_url", "video_url", "audio_url"):
                    url = v.get("url") if isinstance(v, dict) else v
                    if isinstance(url, str):
                        found.append(url)
                elif k == "source" and isinstance(v, dict) and isinstance(v.get("url"), str):
                    found.append(v["url"])  # Anthropic messages: {"type": "url", "url": ...}
                else:
                    walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk({k: request.get(k) for k in ("messages", "input")})
    return found


def _route_path(scope) -> str:
    """The path as Starlette routes it (root_path removed on a segment boundary)."""
    try:
        from starlette._utils import get_route_path

        return get_route_path(scope)
    except ImportError:  # pragma: no cover
        return scope["path"]


def _host(url: str) -> tuple[str, str]:
    """``(scheme, host)`` as vLLM's fetcher (urllib3) parses the URL; ValueError if the URL is
    malformed or urllib3 and urllib disagree on the host (``http://127.0.0.1\\@example.com``)."""
    from urllib.parse import urlsplit

    from urllib3.util import parse_url

    try:
        ours, theirs = urlsplit(url), parse_url(url)
    except Exception as e:  # noqa: BLE001 - urllib3's LocationParseError, ValueError
        raise ValueError(f"malformed URL: {e}") from None
    host = (theirs.host or "").strip("[]").lower()
    if (theirs.scheme or "").lower() in ("http", "https") and host != (ours.hostname or "").lower():
        raise ValueError("the URL's host is ambiguous")
    return (theirs.scheme or ours.scheme or "").lower(), host


def _fetch_error(body: bytes) -> str | None:
    """The message of a 500 that is about loading media ("" for vLLM's fetch timeout, which has
    none), or None when the 500 is something else (the engine)."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None
    if "Engine" in message:
        return None
    if not message or any(w in message.lower() for w in (
            "connect", "timeout", "timed out", "fetch", "load", "url", "host", "http", "file", "media")):
        return message
    return None


def _fetched(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("http", "https", "file")


def _own_host(ip) -> bool:
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local


def _not_fetched(host: str, resolved: bool = False) -> str:
    return (f"image_url: {host} {'resolves to' if resolved else 'is'} this server's own host (or "
            f"link-local) and is not fetched; set {LOOPBACK_ENV}=1 or --allowed-media-domains "
            "to allow it")


async def _resolve_problem(hosts: set[str], timeout_s: float = 5.0) -> str | None:
    """Resolve each image host first: a name that does not resolve is the client's error (a
    400 now, not vLLM's 500 after its fetch); one that resolves to this host or a link-local
    address (cloud metadata) is refused like the literal address."""
    import asyncio
    import ipaddress

    if len(hosts) > MAX_MEDIA_HOSTS:
        return f"too many image hosts in one request ({len(hosts)} > {MAX_MEDIA_HOSTS})"
    loop = asyncio.get_running_loop()

    async def lookup(host):
        try:
            return host, await loop.getaddrinfo(host, None)
        except (OSError, ValueError):  # ValueError: UnicodeError of an empty/too long label
            return host, None

    try:  # all hosts at once, under one deadline
        results = await asyncio.wait_for(asyncio.gather(*map(lookup, sorted(hosts))), timeout_s)
    except asyncio.TimeoutError:
        return "an image could not be loaded: resolving its host timed out"
    for host, infos in results:
        if infos is None:
            return f"an image could not be loaded: cannot resolve host {host!r}"
        if any(_own_host(ipaddress.ip_address(i[4][0].split("%")[0])) for i in infos):
            return _not_fetched(host, resolved=True)
    return None


def _media_problem(urls: list[str], model_config) -> tuple[str | None, set[str]]:
    """``(why a media URL is refused before vLLM fetches it, or None; the http(s) host names
    still to resolve)``. Hosts in ``--allowed-media-domains`` and, with `LOOPBACK_ENV`, every
    host are allowed without resolving."""
    import ipaddress
    import os

    local_ok = bool(getattr(model_config, "allowed_local_media_path", ""))
    domains = set(getattr(model_config, "allowed_media_domains", None) or [])
    loopback_ok = envs.VISOR_ALLOW_LOOPBACK_MEDIA
    hosts: set[str] = set()
    for url in urls:
        try:
            scheme, host = _host(url)
        except ValueError as e:
            return f"image_url: {e}", set()
        if scheme == "file" and not local_ok:
            return ("image_url: file:// URLs are not served (the server was started without "
                    "--allowed-local-media-path); send the image inline as a data: URL"), set()
        if scheme not in ("http", "https") or not host or loopback_ok or host in domains:
            continue
        try:
            if _own_host(ipaddress.ip_address(host)):
                return _not_fetched(host), set()
        except ValueError:  # a name, not an address
            if host == "localhost" or host.endswith(".localhost"):
                return _not_fetched(host), set()
            hosts.add(host)
    return None, hosts
