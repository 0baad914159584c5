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
