"""The worker-side bridge: row bookkeeping follows vLLM's batch updates; safe on both runners."""

from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402
from vllm.v1.sample.logits_processor.interface import MoveDirectionality  # noqa: E402

from visor_vllm.engine import bridge  # noqa: E402
from visor_vllm.model.budget import parse_budget  # noqa: E402
from visor_vllm.model.config import preset_tiny  # noqa: E402


def vllm_config(model_type="visor"):
    hf = preset_tiny() if model_type == "visor" else NS(model_type=model_type)
    return NS(model_config=NS(hf_config=hf, model="/ckpt"), scheduler_config=NS(max_num_seqs=4))


def update(added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=4, removed=list(removed), added=list(added), moved=list(moved))


def test_rows_follow_adds_moves_swaps_and_removals():
    b = bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    b.update_state(update(added=[(0, SamplingParams(extra_args={"visor_sa_layers": [1, 6]}), [1, 2, 3], []),
                                 (1, SamplingParams(extra_args={"visor_budget": "max"}), [1], [])]))
    assert st.has_explicit[0] and st.explicit[0].nonzero().flatten().tolist() == [0, 5]
    assert st.allowed[1].tolist() == [False, False, False, True] and st.prompt_len[0] == 3
    st.sa_mask[1, 3] = True  # as if the model had routed row 1
    b.update_state(update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert st.has_explicit[1] and not st.has_explicit[0] and st.sa_mask[0, 3]
    b.update_state(update(moved=[(0, 2, MoveDirectionality.UNIDIRECTIONAL)], removed=[1]))
    assert st.sa_mask[2, 3] and not st.has_explicit[1] and st.budgets[2].mode == "max"


def test_validate_params_is_a_value_error_with_the_allowed_forms():
    with pytest.raises(ValueError, match="visor_budget must be one of"):
        bridge.VisorBudgetBridge.validate_params(SamplingParams(extra_args={"visor_budget": "x"}))


def test_inert_for_other_models_and_under_model_runner_v2():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2

    assert issubclass(bridge.VisorBudgetBridge, V2)  # MRV2 would reject the entry point otherwise
    assert not bridge.VisorBudgetBridge(vllm_config("llama"), "cpu", False).active
    assert not bridge.VisorBudgetBridge(vllm_config(), NS()).active  # the V2 constructor


def test_flops_caps_and_receipts_at_the_first_step(tmp_path, monkeypatch):
    import torch

    from visor_vllm.engine import receipts

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    b = bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    route = st.cfg.routing_token_id
    rid = receipts.new_id()
    b.update_state(update(added=[
        (0, SamplingParams(extra_args={"visor_max_flops": 1e-6, "visor_receipt": rid}), [5, route, 6], []),
        (1, SamplingParams(extra_args={"visor_receipt": "not-an-id"}), [5, 6], []),
    ]))
    first, n_vision = torch.tensor([True, True, False, False]), torch.tensor([16, 0, 0, 0])
    st.apply_flops_caps(first, n_vision, torch.arange(4))  # V1: slot = row
    assert st.allowed[0].tolist() == [True, False, False, False] and not st.cap_met[0]
    assert st.allowed[1].all()  # no cap asked for
    st.sa_mask[0, 0] = True
    st.config_index[0] = 0
    st.emit_receipts(first, n_vision, has_router=True, slots=torch.arange(4))
    files = list(tmp_path.glob("*.json"))
    assert [f.stem for f in files] == [rid]  # the invalid id wrote nothing
    r = receipts.take(rid)
    assert r["sa_layers"] == [1] and r["n_text"] == 3 and r["n_routing"] == 1 and r["n_image"] == 16
    assert r["flops_cap_met"] is False and r["routed"] is False and r["budget_source"] == "override"
    assert r["model"] == "/ckpt"


def test_bad_server_default_budget_stops_the_engine(monkeypatch):
    from visor_vllm.model.budget import DEFAULT_ENV, BudgetError

    monkeypatch.setenv(DEFAULT_ENV, "plenty")
    with pytest.raises(BudgetError, match=DEFAULT_ENV):
        bridge.VisorBudgetBridge(vllm_config(), "cpu", False)


@pytest.mark.parametrize("dense", [None, 40], ids=["plain", "tr"])
def test_executed_flops_add_up_to_the_flop_model(tmp_path, monkeypatch, dense):
    """Prefill + every decode step, as the model reports them, equal `request_flops` (``tr``:
    VISOR-TR, VISOR runs on 16 packed tokens, dense LLaVA-OV would have seen 40)."""
    import torch

    from visor_vllm.engine import receipts, stats
    from visor_vllm.model.flops import request_flops

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    b = bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    route = st.cfg.routing_token_id
    b.update_state(update(added=[(0, SamplingParams(extra_args={"visor_budget": "max"}), [5, 6, route], []),
                                 (1, SamplingParams(), [5, 6, 7, 8], [])]))
    costliest = max(st.cfg.sa_configs, key=len)
    st.sa_mask[0, costliest] = True  # as the model decides at step 1 (row 1: text-only)
    w = stats.StatsWriter(stats.stats_path(0, server="t"))
    r = stats.StatsReader(stats.stats_path(0, server="t"))

    def step(q, seq, computed, nv):
        qsl = torch.tensor([0, *torch.tensor(q).cumsum(0).tolist()])
        return NS(R=len(q), qsl=qsl, seq_lens=torch.tensor(seq), computed=torch.tensor(computed),
                  n_vision=torch.tensor(nv),
                  n_dense_vision=torch.tensor([dense if (dense and n) else n for n in nv]),
                  slots=torch.arange(len(q)))

    keys = ("visor_prefill_flops", "visor_decode_flops", "dense_prefill_flops", "dense_decode_flops")
    st.account(step([3, 4], [3, 4], [0, 0], [16, 0]), w, has_router=True)   # both prefill
    st.step_done()
    for j in range(1, 5):                                                     # 4 decode steps
        st.account(step([1, 1], [3 + j, 4 + j], [2 + j, 3 + j], [16, 0]), w, has_router=True)
        st.step_done()
    want0 = request_flops(st.cfg, 16, 3, 5, costliest, n_routing=1, routed=False, n_image_dense=dense)
    want1 = request_flops(st.cfg, 0, 4, 5, [], n_routing=0, routed=False)
    flops, events, _ = r.drain()  # decode FLOPs stay on the device until a row joins or leaves
    assert flops == [float(want0[k] + want1[k]) if "prefill" in k else 0.0 for k in keys]
    assert events == [(sum(1 << i for i in costliest), stats.SOURCES.index("override"), 16, 3, 1),
                      (0, stats.SOURCES.index("router"), 0, 4, 1)]
    b.update_state(update(removed=[1]))  # a row leaves: the decode FLOPs so far are flushed
    assert r.drain()[0] == [0.0 if "prefill" in k else float(want0[k] + want1[k]) for k in keys]
    b.update_state(update(removed=[0], added=[(0, SamplingParams(), [5, 6], [9, 9])]))  # resumed
    st.account(step([4, 1], [4, 9], [0, 8], [16, 0]), w, has_router=True)
    assert r.drain()[1] == []  # a resumed request is no new request (its re-prefill is counted)


def test_steady_decode_steps_read_nothing_from_the_device(tmp_path, monkeypatch):
    """Side channels of a step where no row joined: no host read (`HostSyncDetector`); rows
    that join are known on the host through moves and swaps; a join or a leave flushes."""
    import torch

    from visor_vllm.engine import receipts, stats
    from visor_vllm.host_sync import HostSyncDetector

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    b = bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    b.update_state(update(added=[(0, SamplingParams(extra_args={"visor_receipt": receipts.new_id()}),
                                  [5, 6], []), (2, SamplingParams(), [5], [])]))
    assert st.joined == {0, 2}
    b.update_state(update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    b.update_state(update(moved=[(2, 3, MoveDirectionality.UNIDIRECTIONAL)]))
    assert st.joined == {1, 3}
    w = stats.StatsWriter(stats.stats_path(0, server="steady"))
    r = stats.StatsReader(stats.stats_path(0, server="steady"))
    s = NS(R=2, qsl=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([5, 4]),
           computed=torch.tensor([4, 3]), n_vision=torch.tensor([0, 0]),
           n_dense_vision=torch.tensor([0, 0]), slots=torch.tensor([1, 3]))
    st.step_done()
    with HostSyncDetector() as rec:
        st.emit_receipts(s.computed == 0, s.n_vision, True, s.slots)
        st.account(s, w, has_router=True)
        st.step_done()
        b.update_state(None)  # vLLM's steady state: no batch change
    assert rec.found == [] and st.decode_flops.sum() > 0 and r.drain()[0] == [0.0] * 4
    b.update_state(update(removed=[3]))
    assert r.drain()[0][1] > 0 and st.decode_flops.sum() == 0
    # a request that left shows only as vLLM condensing the batch (its slot refilled): flushed
    st.account(s, w, has_router=True)
    b.update_state(update(moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert r.drain()[0][1] > 0 and st.decode_flops.sum() == 0


def test_rows_no_request_holds_count_no_flops(tmp_path, monkeypatch):
    """A warm-up or graph-capture batch (rows no request joined) and a padded row (no query
    token) add nothing to the decode FLOPs; the live row's count is unchanged by them."""
    import torch

    from visor_vllm.engine import receipts

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    b = bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    dummy = NS(R=4, qsl=torch.tensor([0, 1, 2, 3, 4]), seq_lens=torch.tensor([7, 7, 7, 7]),
               computed=torch.tensor([6, 6, 6, 6]), n_vision=torch.zeros(4, dtype=torch.long),
               n_dense_vision=torch.zeros(4, dtype=torch.long), slots=torch.arange(4))
    st.account(dummy, None, has_router=True)  # vLLM's dummy run before any request
    assert st.decode_flops.sum() == 0
    b.update_state(update(added=[(0, SamplingParams(), [5, 6], [])]))
    st.step_done()
    one = NS(R=1, qsl=torch.tensor([0, 1]), seq_lens=torch.tensor([7]), computed=torch.tensor([6]),
             n_vision=torch.zeros(1, dtype=torch.long), n_dense_vision=torch.zeros(1, dtype=torch.long),
             slots=torch.arange(1))
    st.account(one, None, has_router=True)
    alone = st.decode_flops.clone()
    st.decode_flops.zero_()
    padded = NS(R=4, qsl=torch.tensor([0, 1, 1, 1, 1]), seq_lens=torch.tensor([7, 0, 0, 0]),
                computed=torch.tensor([6, 0, 0, 0]), n_vision=torch.zeros(4, dtype=torch.long),
                n_dense_vision=torch.zeros(4, dtype=torch.long), slots=torch.arange(4))
    st.account(padded, None, has_router=True)  # one live row, padded to a graph of four
    assert alone.sum() > 0 and torch.equal(st.decode_flops, alone)


def test_rows_reach_their_slots_when_batch_order_differs(tmp_path, monkeypatch):
    """Model Runner V2 keeps per-request state at a fixed index (idx_mapping), not the batch row:
    batch row 0 is slot 2 and row 1 is slot 0; caps and receipts must follow the slot."""
    import torch

    from visor_vllm.engine import receipts

    monkeypatch.setenv(receipts.DIR_ENV, str(tmp_path))
    bridge.VisorBudgetBridge(vllm_config(), "cpu", False)
    st = bridge.STATE
    rid = receipts.new_id()
    st.set_row(2, parse_budget({"visor_max_flops": 1e-6}, st.cfg), [5, 6, 7], rid)
    st.set_row(0, parse_budget({}, st.cfg), [5, 6])
    first, n_vision, slots = torch.tensor([True, True]), torch.tensor([16, 0]), torch.tensor([2, 0])
    st.apply_flops_caps(first, n_vision, slots)
    assert st.allowed[2].tolist() == [True, False, False, False] and not st.cap_met[2]
    assert st.allowed[0].all() and st.cap_met[0]
    st.emit_receipts(first, n_vision, has_router=True, slots=slots)
    r = receipts.take(rid)
    assert r["n_image"] == 16 and r["n_text"] == 3 and r["flops_cap_met"] is False
