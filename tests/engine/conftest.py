import pytest


@pytest.fixture(scope="session")
def visor_ckpt(tmp_path_factory):
    """A tiny VISOR checkpoint whose random weights give decisive, configuration-dependent logits."""
    from visor_vllm.testing import write_random_tiny_checkpoint

    return write_random_tiny_checkpoint(tmp_path_factory.mktemp("visor-tiny"))
