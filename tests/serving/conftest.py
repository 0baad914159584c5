"""A real `vllm serve` subprocess on a tiny VISOR checkpoint, shared by the serve tests.

The launcher is the product's own (`visor_vllm.evaluation.launch.served`, what the recipe uses),
with the tests' flags: 8 sequences, a 1 GiB KV cache, the model named ``visor-tiny``.
"""

from __future__ import annotations

import contextlib

import pytest

MODEL = "visor-tiny"
STARTUP_S = 300
CHECKPOINTS: dict[str, str] = {}  # base url -> the checkpoint it serves (the tokenizer, for clients)


@contextlib.contextmanager
def serving(tmp_path_factory, *extra: str, ckpt=None, middleware: bool = True, env=None):
    """``(base_url, log_path)`` of a ready ``vllm serve`` on ``ckpt`` (default: a fresh tiny one)."""
    from visor_vllm.evaluation.launch import ServerError, served
    from visor_vllm.testing import write_random_tiny_checkpoint

    if ckpt is None:
        ckpt = write_random_tiny_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    try:
        with served(ckpt, MODEL, ["--max-num-seqs", "8", *extra], log=log, startup_s=STARTUP_S,
                    env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
                    middleware=middleware) as ready:
            CHECKPOINTS[ready[0]] = str(ckpt)
            yield ready
    except ServerError as e:  # only the launcher raises it: the server died or never came up
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with serving(tmp_path_factory) as s:
        yield s
