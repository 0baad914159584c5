"""The shared `vllm serve` launcher: the flags it gives VISOR and non-VISOR checkpoints."""

import json

import pytest

from visor_vllm.evaluation.launch import MIDDLEWARE, ServerError, serve_command, served


def _ckpt(tmp_path, model_type):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path


def test_visor_gets_the_middleware_dense_gets_no_video(tmp_path):
    visor = serve_command(_ckpt(tmp_path / "v", "visor"), 1234, "m")
    dense = serve_command(_ckpt(tmp_path / "d", "llava_onevision"), 1234, "m", ["--x", "1"])
    assert visor[1] == "serve" and MIDDLEWARE in visor and "--port" in visor
    assert MIDDLEWARE not in dense and dense[-2:] == ["--x", "1"]  # extra flags last: they win
    limit = dense[dense.index("--limit-mm-per-prompt") + 1]
    assert json.loads(limit) == {"image": 2, "video": 0}  # LLaVA-OV's video path needs torchvision


@pytest.mark.vllm
@pytest.mark.e2e
def test_a_server_that_dies_raises_with_its_log(tmp_path):
    bad = _ckpt(tmp_path / "bad", "visor")  # config only: vllm serve exits at start-up
    with pytest.raises(ServerError, match="exited"):
        with served(bad, "m", log=tmp_path / "log" / "server.log", startup_s=120):
            pass
    assert (tmp_path / "log" / "server.log").read_text()


HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def stand_ins(monkeypatch):
    """`serve_command` replaced by tiny Python servers: a model dir named ``bad*`` exits with 3
    at once, any other answers ``/health``; returns the processes started."""
    import subprocess
    import sys

    from visor_vllm.evaluation import launch

    def command(model_dir, port, name, extra=(), middleware=True):
        if str(model_dir).rsplit("/", 1)[-1].startswith("bad"):
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        return [sys.executable, "-c", HEALTHY, str(port)]

    procs, popen = [], subprocess.Popen

    def recording_popen(*a, **kw):
        procs.append(popen(*a, **kw))
        return procs[-1]

    monkeypatch.setattr(launch, "serve_command", command)
    monkeypatch.setattr(launch.subprocess, "Popen", recording_popen)
    return procs


def test_servers_started_together_are_all_ready_then_all_stopped(tmp_path, stand_ins):
    import urllib.request

    from visor_vllm.evaluation.launch import served_together

    with served_together([dict(model_dir=tmp_path / "a", name="a", log=tmp_path / "a.log"),
                          dict(model_dir=tmp_path / "b", name="b", log=tmp_path / "b.log")],
                         startup_s=60) as urls:
        assert [log for _, log in urls] == [tmp_path / "a.log", tmp_path / "b.log"]
        assert len({base for base, _ in urls}) == 2  # a port each
        for base, _ in urls:
            assert urllib.request.urlopen(base + "/health", timeout=5).status == 200
        assert all(p.poll() is None for p in stand_ins)
    assert len(stand_ins) == 2 and all(p.poll() is not None for p in stand_ins)


def test_one_server_failing_to_start_stops_the_others(tmp_path, stand_ins):
    from visor_vllm.evaluation.launch import served_together

    with pytest.raises(ServerError, match="exited with 3"):
        with served_together([dict(model_dir=tmp_path / "good", name="g"),
                              dict(model_dir=tmp_path / "bad", name="b")], startup_s=60):
            pytest.fail("the block runs only when every server is ready")
    assert len(stand_ins) == 2 and all(p.poll() is not None for p in stand_ins)
