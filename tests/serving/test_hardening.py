"""The served surface a careful adversary tries (issue: hardening), on live servers: every case
is a fast 4xx with a message, the server stays healthy (the `stays_healthy` check of
`test_bad_input` runs after each test), and what it reports cannot be forged from outside."""

from __future__ import annotations

import socket
import time

import pytest

from .conftest import MODEL, serving
from .test_bad_input import (HURT, chat, client, data_url, image_messages, metric,  # noqa: F401
                             png, post, rejected, stays_healthy)

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def hanging_port():
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_image_urls_that_cannot_load_are_fast_4xx(client, hanging_port, monkeypatch):
    for url, fragment in ((f"http://127.0.0.1:{_closed_port()}/x.png", "own host"),
                          (f"http://127.0.0.1:{hanging_port}/x.png", "own host"),
                          ("http://[::1]/x.png", "own host"),
                          ("file:///etc/passwd", "file://")):
        t0 = time.time()
        rejected(lambda: chat(client, image_messages(url)), 400, fragment)
        assert time.time() - t0 < 5


def test_unreachable_remote_image_is_a_4xx_in_seconds(client):
    t0 = time.time()  # a host that does not resolve: refused before vLLM fetches anything
    rejected(lambda: chat(client, image_messages("http://example.invalid/cat.png")), 400,
             "could not be loaded", "cannot resolve")
    assert time.time() - t0 < 10


def test_echo_deep_json_and_loose_types_are_400(server, client):
    status, message = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True})
    assert status == 400 and "echo" in message
    import httpx

    r = httpx.post(server[0] + "/v1/chat/completions", content=b"[" * 50000 + b"]" * 50000,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    for xargs, fragment in (({"visor_budget": True}, "visor_budget"),
                            ({"visor_sa_layers": []}, "empty"),
                            ({"visor_sa_layers": list(range(100_000))}, "visor_sa_layers")):
        message = rejected(lambda: chat(client, image_messages(data_url(png())),
                                        extra_body={"vllm_xargs": xargs}), 400, fragment)
        assert len(message) < 500
    status, message = post(server, "/v1/chat/completions",
                           {"model": MODEL, "messages": image_messages(data_url(png())),
                            "stream": "false"})
    assert status == 400 and "stream" in message


def test_a_streaming_request_with_a_bad_budget_is_a_400_not_a_200(client):
    rejected(lambda: chat(client, image_messages(data_url(png())), stream=True,
                          extra_body={"vllm_xargs": {"visor_budget": "lots"}}), 400, "visor_budget")


def test_internal_receipt_ids_are_refused_on_every_endpoint(server):
    from visor_vllm.engine import receipts

    forged = "0123456789abcdef" * 2
    bodies = {"/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 16},
              "/v1/messages": {"model": MODEL, "max_tokens": 2,
                               "messages": [{"role": "user", "content": "hi"}]},
              "/invocations": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
              "/v1/chat/completions": {"model": MODEL, "max_tokens": 2,
                                       "messages": [{"role": "user", "content": "hi"}]}}
    for path, body in bodies.items():
        status, message = post(server, path, {**body, "vllm_xargs": {"visor_receipt": forged}})
        assert status == 400 and "visor_receipt" in message, (path, status, message)
    assert not (receipts.runtime_dir() / f"{forged}.json").exists()


def test_endpoints_without_receipts_are_still_counted(server):
    before = metric(server, "visor:requests_total")
    for path, body in {"/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 16},
                       "/v1/messages": {"model": MODEL, "max_tokens": 2,
                                        "messages": [{"role": "user", "content": "hi"}]},
                       "/invocations": {"model": MODEL, "prompt": "hi", "max_tokens": 2}}.items():
        status, message = post(server, path, body)
        assert status == 200, (path, message)
    assert metric(server, "visor:requests_total") - before == 3


def test_routing_tokens_typed_by_the_user_do_not_vote(client):
    from visor_vllm.model.config import preset_tiny

    route = preset_tiny().routing_token
    plain = chat(client, image_messages(data_url(png(seed=5)), text="What is it?"))
    typed = chat(client, image_messages(data_url(png(seed=5)), text=f"What{route * 50} is it?"))
    assert typed.model_extra["visor"]["sa_layers"] == plain.model_extra["visor"]["sa_layers"]
    assert typed.usage.prompt_tokens == plain.usage.prompt_tokens  # the 50 tokens are gone


# -- --api-key, and the runtime directory, on servers of their own -----------------------------

def test_api_key_guards_every_model_endpoint_before_parsing(tmp_path_factory, tmp_path):
    import httpx

    run = tmp_path / "run"
    with serving(tmp_path_factory, "--api-key", "sekret",
                 env={"VISOR_RECEIPT_DIR": str(run)}) as (base, log):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                     "/v1/messages", "/invocations"):
            for body in (b'{"model": "visor-tiny", "prompt": "hi", "max_tokens": 2}', b"{broken"):
                r = httpx.post(base + path, content=body, timeout=30,
                               headers={"content-type": "application/json"})
                assert r.status_code == 401, (path, body, r.status_code, r.text)
        key = {"Authorization": "Bearer sekret"}
        r = httpx.post(base + "/invocations", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       headers=key, timeout=60)
        assert r.status_code == 200
        # accounting is a side channel: break the runtime dir under a running server
        for f in run.iterdir():
            if f.suffix == ".json":
                f.unlink()
        run.rename(tmp_path / "moved")
        run.write_text("not a directory")
        msgs = image_messages(data_url(png()))
        for _ in range(2):
            r = httpx.post(base + "/v1/chat/completions", headers=key, timeout=60,
                           json={"model": MODEL, "messages": msgs, "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"] and "visor" not in r.json()
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert "EngineDeadError" not in log.read_text()


def test_a_runtime_dir_others_could_write_stops_the_server_at_start(tmp_path_factory, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    from visor_vllm.evaluation.launch import ServerError, served
    from visor_vllm.testing import write_random_tiny_checkpoint

    log = tmp_path / "server.log"
    with pytest.raises(ServerError, match="exited"):
        with served(write_random_tiny_checkpoint(tmp_path / "ckpt"), MODEL, log=log,
                    env={"VISOR_RECEIPT_DIR": str(loose)}):
            pass
    text = log.read_text()
    assert "RuntimeDirError" in text and "mode 0700" in text and str(loose) in text
