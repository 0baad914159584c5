"""VISOR's paged K/V layout (`visor_vllm.engine.kv_layout`): the SA-group split rule, vLLM's
grouping as a pure function, and a served tiny checkpoint whose SA layers hold ``[vision ; text]``
per request, with no vision prefix in the optional group for ``min`` requests (the equivalence
suite runs every budget on this same layout)."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.vllm]


@pytest.mark.parametrize("counts", [[17, 8, 2, 5], [17, 8, 7], [21, 9, 7], [21, 9, 2, 5],
                                    [3, 2, 1, 2], [4, 4, 1, 3], [24, 15], [8, 8], [13, 12]])
def test_pages_per_block_is_vllms_grouping(counts):
    import torch
    from vllm.v1.core.kv_cache_utils import _get_kv_cache_groups_uniform_page_size
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, FullAttentionSpec

    from visor_vllm.engine.kv_layout import VisorSASpec, pages_per_block

    kinds = [FullAttentionSpec, CrossAttentionSpec,
             lambda **kw: VisorSASpec(layers=(0,), **kw), lambda **kw: VisorSASpec(layers=(1,), **kw)]
    specs = {f"{k}.{i}": kinds[k](block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
             for k, n in enumerate(counts) for i in range(n)}
    groups = _get_kv_cache_groups_uniform_page_size(specs)
    size = max(len(g.layer_names) for g in groups)  # padding layers are not named
    per_kind = [sum(size for g in groups if g.layer_names[0].startswith(f"{k}.")) for k in range(len(counts))]
    assert per_kind == pages_per_block(counts)


def test_sa_groups_per_preset():
    """0.5B: 17 text / 8 CA / 2 base SA / 5 optional SA (group size 2: 18+8+2+6 pages per block)
    beats one SA group (group size 7: 21+14+7); 1.5B's split would pad its text layers more."""
    import visor_vllm.model.config as c
    from visor_vllm.engine.kv_layout import sa_groups

    assert sa_groups(c.preset_0_5b()) == ((0, 3), (6, 9, 15, 18, 21))
    assert sa_groups(c.preset_1_5b()) == ((0, 3, 6, 9, 16, 19, 22),)
    assert sa_groups(c.preset_tiny()) == ((0,), (3, 5))


def test_merging_specs_of_two_sa_groups_is_refused():
    """vLLM probes a uniform layout by merging all specs and catching AssertionError."""
    import torch

    from visor_vllm.engine.kv_layout import VisorSASpec

    a, b = (VisorSASpec(layers=ls, block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
            for ls in ((0,), (3, 5)))
    assert VisorSASpec.merge([a, a]) == a
    with pytest.raises(AssertionError):
        VisorSASpec.merge([a, b])


def test_min_requests_hold_fewer_vision_blocks(tmp_path):
    """A min request holds no vision prefix in the optional SA group, max/auto/cap>=1 do; every
    block comes back. Blocks of 32 tokens (the CPU kernel's smallest), so the prefix shows."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from visor_vllm.engine.kv_layout import VisorSAManager
    from visor_vllm.testing import write_random_tiny_checkpoint

    ckpt = write_random_tiny_checkpoint(tmp_path / "ckpt")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # to reach the scheduler's block pool
    try:
        llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=2048,
                  max_num_batched_tokens=4096, max_num_seqs=4, limit_mm_per_prompt={"image": 1},
                  seed=0, block_size=32)
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    try:
        core = llm.llm_engine.engine_core.engine_core
        km = core.scheduler.kv_cache_manager
        managers = km.coordinator.single_type_managers
        # tiny: 3 text / 2 CA / 1 base SA / 2 optional SA layers at group size 1
        assert sorted(m.kv_cache_spec.layers for m in managers
                      if isinstance(m, VisorSAManager)) == [(0,), (3, 5), (3, 5)]
        free0 = km.block_pool.get_num_free_blocks()
        held, schedule = [], core.scheduler.schedule

        def counting(*a, **k):
            out = schedule(*a, **k)
            held.append(free0 - km.block_pool.get_num_free_blocks())
            return out

        core.scheduler.schedule = counting
        from PIL import Image

        image = Image.new("RGB", (64, 64), (120, 30, 200))
        from visor_vllm.checkpoints.files import load_processor

        text = load_processor(ckpt).apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
            add_generation_prompt=True)
        prompt = {"prompt": text, "multi_modal_data": {"image": image}}
        used = {}
        for budget in ("min", "max", "auto", 0, 1):
            held.clear()
            llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0,
                                                  extra_args={"visor_budget": budget}),
                         use_tqdm=False)
            used[budget] = max(held)
            assert km.block_pool.get_num_free_blocks() == free0  # freed, nothing leaks
        assert used["min"] < used["max"] == used["auto"] == used[1]
        assert used[0] == used["min"]  # the tiny's cheapest configuration has no optional layer
    finally:
        llm.llm_engine.engine_core.shutdown()
