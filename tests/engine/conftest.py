import pytest


@pytest.fixture(scope="session")
def visor_ckpt(tmp_path_factory):
    """A tiny VISOR checkpoint whose random weights give decisive, configuration-dependent logits."""
    from visor_vllm.testing import write_random_tiny_checkpoint

    return write_random_tiny_checkpoint(tmp_path_factory.mktemp("visor-tiny"))


# -- the equivalence suite's engine, its batched run and the reference: one each per session ----
# test_vllm_vs_reference and test_model_runner_v2 both compare against them; module fixtures
# started the engine (and ran the batch) twice. The engine (a core process, a 1 GiB KV cache)
# is shut down after the last collected test that uses it, not at the session's end.

_LLM: dict = {}  # "engine": the live LLM, "last": the node id of its last user


def _shutdown_llm() -> None:
    llm = _LLM.pop("engine", None)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()  # now, not at interpreter exit after pytest closed stdout


def pytest_collection_modifyitems(config, items):
    users = [i.nodeid for i in items if {"llm", "batched"} & set(getattr(i, "fixturenames", ()))]
    _LLM["last"] = users[-1] if users else None


def pytest_runtest_teardown(item, nextitem):
    if item.nodeid == _LLM.get("last"):
        _shutdown_llm()


@pytest.fixture(scope="session")
def llm(visor_ckpt):
    from .test_vllm_vs_reference import engine

    _LLM["engine"] = engine(visor_ckpt)
    yield _LLM["engine"]
    _shutdown_llm()


@pytest.fixture(scope="session")
def reference(visor_ckpt):
    from visor_vllm.checkpoints.files import load_processor
    from visor_vllm.model.reference import VisorForConditionalGeneration

    return VisorForConditionalGeneration.from_pretrained(str(visor_ckpt)), load_processor(visor_ckpt)


@pytest.fixture(scope="session")
def batched(llm):
    from .test_vllm_vs_reference import CASES, run

    return run(llm, list(CASES))
