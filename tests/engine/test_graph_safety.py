"""The VISOR step vLLM compiles is graph-safe: no host synchronisation, no data-dependent shape.

Every step without new images (decode, text-only prefill) runs `VisorDecoder.forward`, the
module vLLM compiles (and on GPU would capture). Here it runs eagerly under a dispatch mode that
records every aten op a CUDA graph or a fullgraph trace cannot take: a device-to-host read
(``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()`` all reach ``_local_scalar_dense``) and
ops whose output shape depends on tensor values (``nonzero``, boolean-mask indexing,
``repeat_interleave`` without ``output_size``...). The first step (images arriving, the router)
is eager by design and is checked to *have* such ops, so the detector is known to see them.
VISOR's custom ops run as their Python bodies while recording (a dispatch mode is off inside an
op's kernel); a test of the detector checks that it then sees into them.
"""

from __future__ import annotations

import pytest
import torch

from visor_vllm.host_sync import HostSyncDetector

from .test_vllm_vs_reference import CASES, engine, run

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

# host reads (.item(), bool(), .tolist(); under inference_mode .item() and bool() dispatch as
# item / is_nonzero) and data-dependent output shapes: one detector for the whole project
SyncRecorder = HostSyncDetector


def use_op_bodies(mp: pytest.MonkeyPatch) -> None:
    """VISOR's custom ops as their Python bodies: a dispatch mode is off while an op's kernel
    runs, so it would not see what happens inside them."""
    from visor_vllm.engine import vllm_model as vm

    mp.setattr(torch.ops.visor, "step", vm._step_op)
    mp.setattr(torch.ops.visor, "sa_attention", vm._sa_attention_op)


@pytest.fixture(scope="module")
def recorded(visor_ckpt):
    """Serve every equivalence case in one in-process eager engine; record the ops of each step."""
    from visor_vllm.engine import vllm_model as vm

    steps = {"decode": [], "first": [], "side_decode": [], "side_first": []}

    def recording(kind, fn):
        def wrap(self, *a, **k):
            with SyncRecorder() as rec:
                out = fn(self, *a, **k)
            if self._step is not None:  # a real step, not a profiling run
                steps[kind].append(rec.found)
            return out
        return wrap

    side = vm.VisorDecoder.side_channels

    def side_channels(self):
        from visor_vllm.engine import bridge

        kind = "side_first" if bridge.STATE is not None and bridge.STATE.joined else "side_decode"
        with SyncRecorder() as rec:
            side(self)
        if self._step is not None:
            steps[kind].append(rec.found)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vm.VisorDecoder, "side_channels", side_channels)
        mp.setattr(vm.VisorDecoder, "forward", recording("decode", vm.VisorDecoder.forward))
        mp.setattr(vm.VisorDecoder, "first_step", recording("first", vm.VisorDecoder.first_step))
        use_op_bodies(mp)
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        llm = engine(visor_ckpt)
        try:
            run(llm, list(CASES))
        finally:
            llm.llm_engine.engine_core.shutdown()
    return steps


def test_steps_without_new_images_have_no_host_sync_or_data_dependent_shape(recorded):
    assert len(recorded["decode"]) >= 5  # every case decodes several tokens after its first step
    assert [found for found in recorded["decode"] if found] == []


def test_side_channels_of_steady_steps_read_nothing_from_the_device(recorded):
    """Receipts and executed-FLOP stats after a step in which no row joined: no host read
    (decode FLOPs stay on the device until a row joins or leaves, `bridge.RowState.flush`)."""
    assert len(recorded["side_decode"]) >= 5
    assert [found for found in recorded["side_decode"] if found] == []
    assert recorded["side_first"] and all(found for found in recorded["side_first"])


def test_the_detector_sees_the_first_steps_host_reads(recorded):
    """Guards the guard: the first step routes and matches images to rows on the host."""
    assert recorded["first"] and all(found for found in recorded["first"])


def test_the_detector_sees_into_visors_custom_ops(monkeypatch):
    """A host read inside the ``visor::step`` op's body is recorded, and ``tolist``."""
    from visor_vllm.engine import vllm_model as vm

    use_op_bodies(monkeypatch)
    class Decoder:
        def begin_step(self, positions, slots, md):
            int(positions[0])  # the kind of read the decode path must not have
            return positions.clone(), positions.new_zeros(positions.shape[0], 1, dtype=torch.bool)

    ctx = type("Ctx", (), {"no_compile_layers": {"d": Decoder()}, "attn_metadata": None})()
    monkeypatch.setattr(vm, "get_forward_context", lambda: ctx)
    with torch.inference_mode(), SyncRecorder() as rec:  # as vLLM runs the model
        torch.ops.visor.step(torch.arange(3), None, "d")
        torch.arange(2).tolist()
    assert rec.found == [str(torch.ops.aten.item.default), "Tensor.tolist"]
