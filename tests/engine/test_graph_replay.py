"""A decode step recorded once replays for other batches: what a full CUDA graph asks of VISOR.

vLLM 0.32 runs an encoder-decoder model's decode under ``FULL_DECODE_ONLY`` CUDA graphs
(`visor_vllm.engine.config_hook`): the whole model forward of a uniform decode batch is captured
once per batch size and replayed, Python not run, inputs and attention metadata updated in place.
No GPU build of vLLM runs here, so `visor_vllm.graph_replay` holds the graph's contract on CPU:
the model's forward is recorded, op by op, at the first decode step of each batch size, and
every later decode step of that size replays the recording (VISOR's ops as their Python bodies,
so only their kernels are kept) after copying the step's inputs and metadata into the recorded
buffers, as vLLM's runner does before a replay. Three groups of four requests share one batch
size: the second and third groups replay the first group's recording with other budgets,
images, image sizes and prompt lengths. Tokens, logprobs, receipts and the executed-FLOP stats
(``visor:*``) must equal an eager run's.

What this cannot show: inductor's fused kernels (the recording is of the eager step) and vLLM's
own GPU attention metadata under graphs (vLLM's, whose builders support full graphs).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visor_vllm.graph_replay import ReplayError, record

from .test_graph_safety import use_op_bodies
from .test_vllm_vs_reference import CASES, MAX_TOKENS, engine

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

GROUPS = [  # one batch size (4), other budgets, images, sizes and lengths in each group
    ["router", "sa_1", "min", "text_only"],
    ["sa_1_4", "sa_1_6", "max", "two_images"],
    ["sa_1_4_6", "cap_1", "flops_cap", "long"],
    ["router", "max", "two_images"],  # three rows: replayed padded to four
]


class Replayer:
    """Wraps the model's forward: records the first uniform decode step of ``SIZE`` rows and
    replays it for every later uniform decode step of at most ``SIZE`` rows, padded to it as
    vLLM pads a batch to a captured size (module docstring). ``on``: False runs every step
    eagerly; other steps always do (vLLM runs them without a full graph too)."""

    SIZE = 4

    def __init__(self, forward):
        self.forward, self.on = forward, False
        self.graph = None
        self.recorded = self.replayed = self.padded = 0
        self.model = None

    def __call__(self, model, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                 encoder_outputs=None, visor_slots=None, **kwargs):
        from vllm.forward_context import get_forward_context

        self.model = model
        call = dict(intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds,
                    encoder_outputs=encoder_outputs, visor_slots=visor_slots, **kwargs)
        ctx = get_forward_context()
        md = ctx.attn_metadata
        decoder = model.language_model.model
        text = md.get(decoder.layers[0].self_attn.attn.layer_name) if isinstance(md, dict) else None
        n = input_ids.shape[0]
        if (not self.on or encoder_outputs or text is None or text.max_query_len != 1
                or n > self.SIZE or (self.graph is None and n < self.SIZE)):
            return self.forward(model, input_ids, positions, **call)  # not a graph step
        if self.graph is None:
            with record() as rec:
                out = self.forward(model, input_ids, positions, **call)
                rec.finish(out)
            self.graph = (rec, input_ids, positions, visor_slots, md)
            self.recorded += 1
            return out
        rec, ids0, pos0, slots0, md0 = self.graph
        pad(ids0, input_ids, 0)  # the graph's static input buffers
        pad(pos0, positions, 0)
        if slots0 is not None:
            pad(slots0, visor_slots, 0)
        copy_metadata(md, md0, rec)
        ctx.attn_metadata = md0  # vLLM's own attention ops read the recorded objects too
        try:
            out = rec.replay()
        finally:
            ctx.attn_metadata = md
        self.replayed += 1
        self.padded += n < self.SIZE
        return out[:n]


# how vLLM pads a batch's metadata to a captured size (gpu_model_runner: a padded row has no
# query tokens and no context; a padding token writes no K/V)
PAD = {"query_start_loc": "last", "seq_lens": 0, "block_table": 0, "slot_mapping": -1}


def pad(dst: torch.Tensor, src: torch.Tensor, fill) -> None:
    """``src`` into the recorded buffer ``dst`` (same shape, or fewer rows: the rest ``fill``;
    ``"last"``: the last value of ``src``)."""
    n = src.shape[0]
    dst[:n].copy_(src)
    if n < dst.shape[0]:
        dst[n:] = src[-1] if fill == "last" else fill


def copy_metadata(new: dict, old: dict, rec) -> None:
    """Every tensor field of this step's attention metadata into the recorded step's, padded
    (`PAD`); host ints stay as recorded, as they are baked into a captured graph. A field whose
    shape changed otherwise (the CPU kernel's work partition, ``scheduler_metadata``: CPU-only,
    not a graph's) may be swapped in only where no recorded op reads it: then only vLLM's own
    attention ops do."""
    done = set()
    for name, m in new.items():
        o = old[name]
        if id(o) in done:
            continue
        done.add(id(o))
        for f in dataclasses.fields(m):
            a, b = getattr(m, f.name), getattr(o, f.name)
            if not isinstance(a, torch.Tensor):
                continue
            if a.shape == b.shape:
                b.copy_(a)
            elif f.name in PAD and a.shape[1:] == b.shape[1:] and a.shape[0] < b.shape[0]:
                pad(b, a, PAD[f.name])
            elif not rec.reads(b):
                setattr(o, f.name, a)
            else:
                raise ReplayError(f"{name}.{f.name}: {tuple(a.shape)} now, {tuple(b.shape)} "
                                  "recorded (a graph needs a static shape)")


def run_groups(llm):
    from vllm import SamplingParams

    from visor_vllm.engine import receipts

    outs, ids = {}, {}
    for g, group in enumerate(GROUPS):
        prompts, params = [], []
        for name in group:
            text, images, extra = CASES[name]
            ids[g, name] = receipts.new_id()
            prompts.append({"prompt": text, **({"multi_modal_data": {"image": images}}
                                               if images else {})})
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5,
                                         ignore_eos=True,
                                         extra_args={**(extra or {}), receipts.KEY: ids[g, name]}))
        for name, o in zip(group, llm.generate(prompts, params, use_tqdm=False)):
            outs[g, name] = o.outputs[0]
    return outs, {n: receipts.take(rid) for n, rid in ids.items()}


def drained(model) -> list[float]:
    """The ``visor:*`` FLOP sums since the last call (prefill and decode, VISOR and dense)."""
    from visor_vllm.engine import bridge, stats

    bridge.STATE.flush()  # the host event the next batch update would be
    return stats.StatsReader(model.language_model.model._stats_path).drain()[0]


@pytest.fixture(scope="module")
def runs(visor_ckpt, tmp_path_factory):
    from visor_vllm.engine import receipts
    from visor_vllm.engine import vllm_model as vm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(receipts.DIR_ENV, str(tmp_path_factory.mktemp("receipts")))
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        use_op_bodies(mp)
        rep = Replayer(vm.VisorForConditionalGeneration.forward)
        mp.setattr(vm.VisorForConditionalGeneration, "forward",
                   lambda self, *a, **k: rep(self, *a, **k))
        llm = engine(visor_ckpt)
        try:
            eager = run_groups(llm)
            eager_flops = drained(rep.model)
            rep.on = True
            replayed = run_groups(llm)
            replayed_flops = drained(rep.model)
        finally:
            llm.llm_engine.engine_core.shutdown()
    return dict(eager=eager, replayed=replayed, flops=(eager_flops, replayed_flops), rep=rep)


def test_decode_steps_were_recorded_once_and_replayed(runs):
    rep = runs["rep"]
    assert rep.recorded == 1  # one graph: four rows decoding
    assert rep.replayed >= 3 * (MAX_TOKENS - 1) + (MAX_TOKENS - 2)  # groups 2-4 whole
    assert rep.padded >= MAX_TOKENS - 1  # group 4


def test_replayed_decode_gives_the_eager_tokens_and_logprobs(runs):
    (eager, _), (replayed, _) = runs["eager"], runs["replayed"]
    for name in eager:
        assert list(replayed[name].token_ids) == list(eager[name].token_ids), name
        for a, b in zip(replayed[name].logprobs, eager[name].logprobs):
            assert {t: round(p.logprob, 5) for t, p in a.items()} == \
                   {t: round(p.logprob, 5) for t, p in b.items()}, name


def test_replayed_decode_gives_the_eager_receipts_and_flops(runs):
    (_, eager), (_, replayed) = runs["eager"], runs["replayed"]
    assert all(eager.values()) and eager == replayed
    e, r = runs["flops"]
    assert e[1] > 0 and e[3] > 0  # decode FLOPs were counted
    assert r == pytest.approx(e, rel=1e-12)


def test_a_step_that_keeps_a_python_value_is_caught(runs):
    """Guards the guard: a step that bakes a per-step value replays it stale."""
    x, state = torch.arange(4.0), {"scale": 2.0}

    with record() as rec:
        rec.finish(x * state["scale"])
    state["scale"] = 3.0
    x.copy_(torch.ones(4))
    assert rec.replay().tolist() == [2.0] * 4  # the eager step would give 3.0
    with record() as rec:
        rec.finish(x * int(x.sum()))
    with pytest.raises(ReplayError, match="_local_scalar_dense"):
        rec.replay()
