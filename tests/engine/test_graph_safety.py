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
from torch.utils._python_dispatch import TorchDispatchMode

from .test_vllm_vs_reference import CASES, engine, run

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

aten = torch.ops.aten
# host reads (vLLM runs the model under inference_mode, where .item() and bool() dispatch as
# item / is_nonzero rather than _local_scalar_dense) and data-dependent output shapes
DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
                  aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_consecutive.default, aten.unique_dim.default,
                  aten.masked_scatter.default, aten.argwhere.default}


class SyncRecorder(TorchDispatchMode):
    """Records the ops of ``DATA_DEPENDENT`` and their data-dependent variants, and
    ``Tensor.tolist`` (a host read that reaches no dispatcher)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        found, tolist = self.found, self._tolist

        def recorded_tolist(t):
            found.append("Tensor.tolist")
            return tolist(t)
        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT:
            self.found.append(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.found.append("repeat_interleave without output_size")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.found.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


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

    steps = {"decode": [], "first": []}

    def recording(kind, fn):
        def wrap(self, *a, **k):
            with SyncRecorder() as rec:
                out = fn(self, *a, **k)
            if self._step is not None:  # a real step, not a profiling run
                steps[kind].append(rec.found)
            return out
        return wrap

    with pytest.MonkeyPatch.context() as mp:
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
