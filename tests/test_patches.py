"""The patch ledger: every entry documented, idempotent, and doing what it says."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from visor_vllm import patches

ALL = lambda: (patches.PATCHES + patches.VLLM_PATCHES + patches.FRONTEND_PATCHES  # noqa: E731
               + patches.CONFIG_PATCHES + patches.SCHEDULER_PATCHES)


def test_patch_ledger_entries_are_documented():
    assert len(ALL()) >= 3
    for p in ALL():
        assert p.why and p.how and p.removal and p.target, p.name
        assert p.name in patches.__doc__, p.name


def test_apply_transformers_patches_is_idempotent():
    first = patches.apply_transformers_patches()
    assert patches.apply_transformers_patches() == first
    assert set(first) <= {p.name for p in patches.PATCHES}
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        assert first == [p.name for p in patches.PATCHES]
        from transformers.models.pixtral.image_processing_pixtral import _num_image_tokens

        assert _num_image_tokens((33, 17), (16, 16)) == (3, 2)
        with pytest.raises(NotImplementedError, match="video"):
            patches.NoVideoProcessor()(videos=[])


def test_vllm_llava_onevision_imports_after_the_patches():
    """Patch 2's reason to exist, in a fresh process (vLLM's llava.py -> pixtral -> torchvision)."""
    pytest.importorskip("vllm")
    code = ("from visor_vllm.patches import apply_transformers_patches\n"
            "apply_transformers_patches()\n"
            "import vllm.model_executor.models.llava_onevision\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.vllm
@pytest.mark.compat
def test_encoder_outputs_come_in_persistent_batch_row_order():
    """Patch 3: items of requests scheduled b-then-a come back in row order a, b (a's items kept)."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert patches.apply_vllm_patches() == patches.apply_vllm_patches()  # idempotent
    assert patches.VLLM_PATCHES[0].applied()

    def feature(h):
        return SimpleNamespace(data=object(), identifier=h, modality="image", mm_position=h)

    runner = SimpleNamespace(
        requests={"a": SimpleNamespace(mm_features=[feature("a0"), feature("a1")]),
                  "b": SimpleNamespace(mm_features=[feature("b0")])},
        input_batch=SimpleNamespace(req_id_to_index={"a": 0, "b": 1}))
    sched = SimpleNamespace(scheduled_encoder_inputs={"b": [0], "a": [0, 1]})
    hashes, _, refs = GPUModelRunner._batch_mm_inputs_from_scheduler(runner, sched)
    assert hashes == ["a0", "a1", "b0"] and [r[0] for r in refs] == ["a", "a", "b"]
