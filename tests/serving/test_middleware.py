"""The server middleware against a fake vLLM app: receipts in plain and streamed responses,
a client-supplied receipt id refused, no file left behind; it counts nothing in ``visor:*``
(the stat-logger plugin does, `visor_vllm.serving.stat_logger`)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client import REGISTRY

from visor_vllm.engine import receipts
from visor_vllm.model.config import preset_tiny
from visor_vllm.model.flops import request_flops
from visor_vllm.serving.middleware import VisorMiddleware

N_OUT = 5


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path / "receipts"))
    preset_tiny().save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def fake_vllm(model_dir, seen):
    """Reads the request, 'runs' it (writes the receipt as the worker would), answers."""

    async def app(scope, receive, send):
        body = json.loads((await receive())["body"])
        seen.append(body)
        rid = body["vllm_xargs"]["visor_receipt"]
        receipts.write(rid, dict(sa_layers=[1, 4], config_index=1, n_image=16, n_text=20,
                                 n_routing=1, routed=True, budget="auto", budget_source="router",
                                 max_flops=None, flops_cap_met=True, model=model_dir))
        usage = {"prompt_tokens": 20, "completion_tokens": N_OUT, "total_tokens": 20 + N_OUT}
        if not body.get("stream"):
            out = json.dumps({"id": "x", "choices": [{"index": 0, "message": {"content": "hi"},
                                                      "finish_reason": "length"}], "usage": usage})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out.encode()})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        events = [{"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}] * 4
        events += [{"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "length"}]}]
        if body["stream_options"]["include_usage"]:
            events += [{"choices": [], "usage": usage}]
        for e in events:  # split one event across two sends, as a real server may
            raw = b"data: " + json.dumps(e).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": raw[:7], "more_body": True})
            await send({"type": "http.response.body", "body": raw[7:], "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


def post(app, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/chat/completions", content=raw)

    return asyncio.run(go())


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_plain_response_carries_the_receipt_and_counts_nothing(model_dir, tmp_path):
    seen = []
    app = VisorMiddleware(fake_vllm(model_dir, seen))
    before = sample("visor:llm_flops_total", phase="prefill")
    r = post(app, {"model": "m", "messages": [], "vllm_xargs": {"visor_budget": "auto"}})
    assert r.status_code == 200
    v = r.json()["visor"]
    want = request_flops(preset_tiny(), 16, 20, N_OUT, [0, 3])
    assert v["sa_layers"] == [1, 4] and v["visor_flops"] == want["visor_flops"]
    assert r.headers["x-visor-sa-layers"] == "1,4" and int(r.headers["content-length"]) == len(r.content)
    assert seen[0]["vllm_xargs"]["visor_budget"] == "auto"  # the client's own args pass through
    assert sample("visor:llm_flops_total", phase="prefill") == before  # the engine's count only
    assert not list((tmp_path / "receipts").glob("*.json"))  # taken, not left behind


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_keeps_its_shape_and_adds_the_receipt_to_the_finishing_chunk(model_dir, include_usage):
    seen = []
    body = {"model": "m", "messages": [], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(VisorMiddleware(fake_vllm(model_dir, seen)), body)
    assert seen[0]["stream_options"]["include_usage"] is True  # asked for, to count tokens
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[5:]) for e in events[:-1]]
    assert len(chunks) == 5 + include_usage
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["visor"]["output_tokens"] == N_OUT
    assert ("usage" in chunks[-1]) == include_usage
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == "aaaab"


def test_client_supplied_receipt_id_is_refused(model_dir):
    r = post(VisorMiddleware(fake_vllm(model_dir, [])),
             {"model": "m", "messages": [], "vllm_xargs": {"visor_receipt": "0" * 32}})
    assert r.status_code == 400 and "visor_receipt" in r.json()["error"]["message"]


def test_other_paths_and_bad_bodies_pass_through(model_dir):
    calls = []

    async def app(scope, receive, send):
        calls.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"vllm says no"})

    for body in (b"{not json", b"[1, 2]"):
        r = post(VisorMiddleware(app), body)
        assert r.status_code == 400 and r.text == "vllm says no"
    assert calls == [b"{not json", b"[1, 2]"]  # untouched: vLLM words the error
    r = post(VisorMiddleware(app), {"vllm_xargs": "not a dict"})
    assert r.status_code == 400 and "vllm_xargs must be a JSON object" in r.text


def test_receipt_ids_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    receipts.write("../../etc/passwd", {"x": 1})
    receipts.write("A" * 32, {"x": 1})
    assert not list(tmp_path.iterdir())
    rid = receipts.new_id()
    receipts.write(rid, {"x": 1})
    assert receipts.take(rid) == {"x": 1} and receipts.take(rid) is None


def test_a_broken_receipt_never_breaks_the_response(model_dir, tmp_path):
    async def app(scope, receive, send):
        body = json.loads((await receive())["body"])
        receipts.write(body["vllm_xargs"]["visor_receipt"], {"model": str(tmp_path / "gone")})
        out = b'{"choices": [], "usage": {"completion_tokens": 1}}'
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": out})

    r = post(VisorMiddleware(app), {"model": "m", "messages": []})
    assert r.status_code == 200 and "visor" not in r.json() and "x-visor-flops" not in r.headers


# -- what the middleware refuses before vLLM sees a request (issue: hardening) -------------------

def _recording_app(calls, status=200, payload=None):
    async def app(scope, receive, send):
        calls.append(json.loads((await receive())["body"] or b"null"))
        out = json.dumps(payload or {"choices": [], "usage": {"completion_tokens": 0}}).encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": out})
    return app


def post_to(app, path, body, headers=None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(path, content=raw, headers=headers or {})

    return asyncio.run(go())


def _image(url):
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("body,message", [
    ({"vllm_xargs": {"visor_budget": True}}, "visor_budget"),          # vLLM would coerce to 1
    ({"vllm_xargs": {"visor_max_flops": True}}, "visor_max_flops"),
    ({"vllm_xargs": {"visor_sa_layers": []}}, "empty"),
    ({"stream": "false"}, "stream must be true or false"),
    ({"stream": True, "vllm_xargs": {"visor_budget": "lots"}}, "visor_budget"),  # before the stream
    (_image("file:///etc/passwd"), "file://"),
    (_image("http://127.0.0.1:1/x.png"), "own host"),
    (_image("http://169.254.169.254/latest/meta-data"), "link-local"),
    (_image("http://localhost/x.png"), "own host"),
])
def test_bad_requests_are_400_before_vllm_sees_them(model_dir, body, message):
    calls = []
    r = post(VisorMiddleware(_recording_app(calls)), {"model": "m", "messages": [], **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert calls == []


def test_echo_and_deep_json_are_400(model_dir):
    calls = []
    mw = VisorMiddleware(_recording_app(calls))
    r = post_to(mw, "/v1/completions", {"model": "m", "prompt": "x", "echo": True})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
    r = post_to(mw, "/v1/completions", b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    assert calls == []


def test_receipt_ids_from_clients_are_refused_on_every_endpoint(model_dir):
    for path in ("/v1/responses", "/v1/messages", "/invocations"):
        r = post_to(VisorMiddleware(_recording_app([])), path,
                    {"model": "m", "vllm_xargs": {"visor_receipt": receipts.new_id()}})
        assert r.status_code == 400 and "visor_receipt" in r.text, path
    assert not receipts.valid_id("0" * 32)  # a well-formed id without the server's HMAC


def test_api_key_is_checked_first_on_every_model_endpoint(model_dir):
    import hashlib

    class Auth:  # vLLM's AuthenticationMiddleware as the middleware finds it
        def __init__(self, app):
            self.app, self.api_tokens = app, [hashlib.sha256(b"sekret").digest()]

        async def __call__(self, scope, receive, send):
            return await self.app(scope, receive, send)

    calls = []
    mw = VisorMiddleware(Auth(_recording_app(calls)))
    for path in ("/v1/chat/completions", "/invocations", "/v1/responses"):
        assert post_to(mw, path, b"{broken").status_code == 401  # before the body is read
    assert post_to(mw, "/invocations", {"model": "m"},
                   headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = post_to(mw, "/v1/completions", {"model": "m", "prompt": "x"},
                 headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and len(calls) == 1


def test_a_media_fetch_500_becomes_a_400(model_dir, monkeypatch):
    from visor_vllm.serving.middleware import LOOPBACK_ENV

    monkeypatch.setenv(LOOPBACK_ENV, "1")  # no name resolution: the fake app 'fetches'
    app = _recording_app([], status=500, payload={"error": {"message": "Cannot connect to host"}})
    r = post(VisorMiddleware(app), _image("http://example.invalid/x.png"))
    assert r.status_code == 400 and "could not be loaded: Cannot connect" in r.text
    r = post(VisorMiddleware(app), {"model": "m", "messages": []})  # no media: vLLM's 500 stays
    assert r.status_code == 500


def test_routing_tokens_typed_by_the_user_are_removed(model_dir, monkeypatch):
    from visor_vllm.serving import middleware

    monkeypatch.setattr(middleware, "_served_config", lambda scope: preset_tiny())
    calls = []
    route = preset_tiny().routing_token
    body = {"model": "m", "messages": [
        {"role": "user", "content": f"a{route}b"},
        {"role": "user", "content": [{"type": "text", "text": f"{route}{route}c"}]}]}
    post(VisorMiddleware(_recording_app(calls)), body)
    sent = calls[0]["messages"]
    assert sent[0]["content"] == "ab" and sent[1]["content"][0]["text"] == "c"


def test_old_receipts_are_swept(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path / "r"))
    old, new = receipts.new_id(), receipts.new_id()
    receipts.write(old, {})
    receipts.write(new, {})
    past = time.time() - 2 * receipts.MAX_AGE_S
    os.utime(tmp_path / "r" / f"{old}.json", (past, past))
    assert receipts.sweep() == 1
    assert receipts.take(new) == {} and receipts.take(old) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1\\@example.com/x.png",          # urllib and urllib3 disagree on the host
    "http://169.254.169.254\\@example.com/meta",
    "http://[::ffff:127.0.0.1]/x.png",               # IPv4-mapped loopback
    "http://[::ffff:169.254.169.254]/",
    "http://[::1/x.png",                              # malformed
])
def test_ssrf_tricks_are_refused(model_dir, url):
    calls = []
    r = post(VisorMiddleware(_recording_app(calls)), _image(url))
    assert r.status_code == 400 and calls == [], r.text


def test_other_shapes_and_endpoints_are_checked_too(model_dir):
    calls = []
    mw = VisorMiddleware(_recording_app(calls))
    anthropic = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}}]}]}
    assert post_to(mw, "/v1/messages", anthropic).status_code == 400
    batch = {"model": "m", "messages": [[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]]}
    assert post_to(mw, "/v1/chat/completions/batch", batch).status_code == 400
    assert post_to(mw, "/invocations", {"model": "m", "prompt": "x", "echo": True}).status_code == 400
    raw = []

    async def vllm_says(scope, receive, send):
        raw.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"vllm says no"})

    big = b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    r = post_to(VisorMiddleware(vllm_says), "/v1/completions", big)
    assert r.status_code == 400 and raw == [big]  # not a 500: passed through, vLLM words it
    assert "visor_budget" in post(mw, {"model": "m", "messages": [],
                                       "vllm_xargs": {"visor_budget": "++3"}}).text


def test_a_streamed_media_500_is_a_400_and_engine_500s_stay(model_dir, monkeypatch):
    from visor_vllm.serving.middleware import LOOPBACK_ENV

    monkeypatch.setenv(LOOPBACK_ENV, "1")
    fetch = _recording_app([], status=500, payload={"error": {"message": "Cannot connect to host"}})
    r = post(VisorMiddleware(fetch), {**_image("http://example.invalid/x.png"), "stream": True})
    assert r.status_code == 400 and "could not be loaded" in r.text
    dead = _recording_app([], status=500, payload={"error": {"message": "EngineDeadError: gone"}})
    assert post(VisorMiddleware(dead), _image("http://example.invalid/x.png")).status_code == 500


def test_nested_routing_tokens_leave_none(model_dir, monkeypatch):
    from visor_vllm.serving import middleware

    monkeypatch.setattr(middleware, "_served_config", lambda scope: preset_tiny())
    calls = []
    route = preset_tiny().routing_token
    post(VisorMiddleware(_recording_app(calls)), {"model": "m", "messages": [
        {"role": "user", "content": route[:4] + route + route[4:]}]})
    assert route not in calls[0]["messages"][0]["content"]
