"""VISOR-TR served (paper Sec. 4.4, App. I): packing ratios 2 and 4 under vLLM.

vLLM's VISOR-TR equals the reference (tokens and logprobs), its placeholders are the packed
count, and its receipts compare VISOR's packed tokens with dense LLaVA-OV's *full* count, the
way the paper's 18x/35x rows are counted; a FLOP cap is a fraction of that dense cost.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.engine.test_vllm_vs_reference import ATOL, MAX_TOKENS, TIE, chat, image

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

CASES = {  # name -> (prompt, images, extra_args)
    "router": (chat("What is shown?"), [image(0)], None),
    "sa_1_4": (chat("What is shown?"), [image(0)], {"visor_sa_layers": [1, 4]}),
    "max": (chat("Count the apples."), [image(2, 90, 40)], {"visor_budget": "max"}),
    "two_images": (chat("Compare them.", 2), [image(4), image(5, 64, 32)],
                   {"visor_sa_layers": [1, 6]}),
    "flops_cap": (chat("Where is the bird?"), [image(3)], None),  # cap set per ratio below
}


@pytest.fixture(scope="module", params=[2.0, 4.0], ids=["tr2", "tr4"])
def served(request, tmp_path_factory):
    """(ratio, checkpoint, reference model + processor, {case: (output, receipt)})."""
    from vllm import LLM, SamplingParams

    from visor_vllm.checkpoints.files import load_processor
    from visor_vllm.engine import receipts
    from visor_vllm.model.reference import VisorForConditionalGeneration
    from visor_vllm.testing import write_random_tiny_checkpoint

    ratio = request.param
    ckpt = write_random_tiny_checkpoint(tmp_path_factory.mktemp(f"visor-tr{ratio:g}"),
                                        token_packing_ratio=ratio)
    model = VisorForConditionalGeneration.from_pretrained(str(ckpt))
    proc = load_processor(ckpt)
    cases = dict(CASES)
    cases["flops_cap"] = (*CASES["flops_cap"][:2], {"visor_max_flops": _cap_only_full_count_meets(
        model, proc, *CASES["flops_cap"][:2])})
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    old = os.environ.get(receipts.DIR_ENV)
    os.environ[receipts.DIR_ENV] = str(run_dir)  # the worker inherits it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=4096,
              max_num_seqs=8, limit_mm_per_prompt={"image": 2}, seed=0)
    try:
        ids = {n: receipts.new_id() for n in cases}
        prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs, _ in cases.values()]
        params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True,
                                 extra_args={**(extra or {}), receipts.KEY: ids[n]})
                  for n, (_, _, extra) in cases.items()]
        outs = llm.generate(prompts, params, use_tqdm=False)
        results = {n: (o.outputs[0], receipts.take(ids[n])) for n, o in zip(cases, outs)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        if old is None:
            os.environ.pop(receipts.DIR_ENV, None)
        else:
            os.environ[receipts.DIR_ENV] = old
    return ratio, ckpt, (model, proc), cases, results


def _encode(proc, text, images):
    return proc(images=[images], text=text, return_tensors="pt")  # one prompt


def _cap_only_full_count_meets(model, proc, text, images) -> float:
    """A prefill FLOP cap the cheapest configuration meets against dense LLaVA-OV on the full
    image, but would miss against dense on the packed tokens."""
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops

    cfg = model.config
    enc = _encode(proc, text, images)
    ids = enc["input_ids"][0]
    nv = int((ids == cfg.image_token_index).sum())
    nt = ids.numel() - nv
    nd = model.dense_image_tokens(enc["image_sizes"], len(images))
    cost = prefill_flops(cfg, nv, nt, min(cfg.sa_configs, key=len))
    cap = cost / dense_prefill_flops(cfg, nd, nt) * 1.01
    assert cost > cap * dense_prefill_flops(cfg, nv, nt)  # the case is decisive
    return cap


@pytest.mark.parametrize("name", list(CASES))
def test_served_tr_equals_reference(served, name):
    from visor_vllm.model.budget import parse_budget

    _, _, (model, proc), cases, results = served
    text, images, extra = cases[name]
    out, _ = results[name]
    enc = _encode(proc, text, images)
    tokens = list(out.token_ids)
    ids = torch.cat([enc["input_ids"][0], torch.tensor(tokens[:-1])])
    with torch.no_grad():
        ref = model(ids, enc["pixel_values"], enc["image_sizes"], budget=parse_budget(extra, model.config))
    logp = torch.log_softmax(ref.logits[-len(tokens):].double(), -1)
    for step, (tok, lps) in enumerate(zip(tokens, out.logprobs)):
        assert float(logp[step, tok]) >= float(logp[step].max()) - TIE, (name, step)
        for cand, lp in lps.items():
            assert abs(lp.logprob - float(logp[step, cand])) < ATOL, (name, step, cand)


def test_receipts_count_packed_tokens_against_dense_on_the_full_image(served):
    from visor_vllm.model.packing import visual_token_count
    from visor_vllm.serving.middleware import summarize

    ratio, ckpt, (model, _), _, results = served
    cfg = model.config
    _, rec = results["router"]
    h, w = image(0).height, image(0).width
    assert rec["n_image"] == visual_token_count(cfg, h, w)
    assert rec["n_image_dense"] == visual_token_count(cfg, h, w, packed=False)
    assert rec["n_image_dense"] > rec["n_image"] * ratio * 0.5
    _, two = results["two_images"]
    assert two["n_image_dense"] == sum(visual_token_count(cfg, im.height, im.width, 2, packed=False)
                                       for im in CASES["two_images"][1])
    v = summarize(rec, MAX_TOKENS)
    assert v["dense_image_tokens"] == rec["n_image_dense"] and v["image_tokens"] == rec["n_image"]
    plain = summarize({**rec, "n_image_dense": rec["n_image"]}, MAX_TOKENS)
    assert v["visor_flops"] == plain["visor_flops"] and v["savings"] > plain["savings"]


def test_a_flops_cap_is_measured_against_dense_on_the_full_image(served):
    _, _, (model, _), _, results = served
    _, rec = results["flops_cap"]
    assert rec["flops_cap_met"] is True
    assert [n - 1 for n in rec["sa_layers"]] == min(model.config.sa_configs, key=len)
