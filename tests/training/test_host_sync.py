"""A VISOR training step reads nothing back from the device (issue: host-bound steps).

The step (`visor_vllm.training.trainer._StepFn`: forward and backward over the micro-batches,
clipping, fused AdamW) runs under `visor_vllm.host_sync.no_host_sync`, which fails on
``.item()``/``int()``/``.tolist()``, boolean-mask indexing, ``nonzero`` and device-to-host copies.
On this CPU every tensor counts as a device tensor, so a pass here means every size the step
needs is a Python int from the collate. The launched DDP and FSDP2 runs check the same with
``VISOR_CHECK_HOST_SYNC=1`` (`test_engines.py`, `test_trainer.py`).
"""

import pytest
import torch

from visor_vllm.host_sync import no_host_sync
from visor_vllm.training.data import EncodedDataset, SampleEncoder, load_records
from visor_vllm.training.engines import AccelerateEngine
from visor_vllm.training.recipe import StageSpec
from visor_vllm.training.trainer import (_collate, _StepFn, load_model, param_groups,
                                         resolve_configs, step_module_for)


@pytest.mark.parametrize("stage, accum, checkpointing", [
    ("stage1", 1, False), ("stage2", 2, True), ("stage2", 1, False)])
def test_a_visor_training_step_reads_nothing_back(visor_ckpt_synth, synth_data, stage, accum,
                                                  checkpointing):
    spec = StageSpec(kind=stage, steps=2, lr=1e-3, batch_size=4, micro_batch_size=4 // accum,
                     gradient_checkpointing=checkpointing,
                     configs="max" if stage == "stage1" else "viable")
    model = load_model(stage, visor_ckpt_synth)
    step_module = step_module_for(model, spec)
    engine = AccelerateEngine("no")
    module = engine.prepare(step_module, param_groups(step_module, spec), spec.lr,
                            spec.batch_size // accum, accum, spec.max_grad_norm)
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(synth_data / "train.jsonl"), enc, synth_data)
    micro = spec.batch_size // accum
    batches = [_collate([ds[i] for i in range(j * micro, (j + 1) * micro)],
                        enc.tokenizer.pad_token_id, model.config)[0] for j in range(accum)]
    assert all(b.layout is not None and b.pixel_values is None for b in batches)
    step = _StepFn(engine, module, engine.params, spec, accum)
    configs = resolve_configs(model.config, spec)
    before = [p.detach().clone() for p in engine.params]
    for k, cfg in enumerate([configs[-1], configs[0]]):  # the first step creates AdamW's state
        with no_host_sync(f"{stage} step {k + 1}"):
            loss, n_tokens, grad_norm = step(batches, cfg)
    assert float(loss) > 0 and int(n_tokens) == sum(b.answer_tokens for b in batches)
    assert float(grad_norm) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, engine.params))
