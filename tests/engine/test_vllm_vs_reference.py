"""vLLM's VISOR equals the reference model: tokens and logprobs, per configuration and batched.

One engine (tiny checkpoint, fp32, CPU; the session's ``llm`` of ``conftest.py``, which the MRV2
module compares against too) serves every case in a single batch; each case then runs alone
again. The reference is teacher-forced on vLLM's tokens, so a near-tie between
two tokens (random tiny weights) cannot make the comparison flaky: a token vLLM picked must be
the reference's argmax or within ``TIE`` of it, and its logprob must agree to ``ATOL``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]

ATOL, TIE, MAX_TOKENS = 2e-3, 2e-3, 6
IMAGE, ROUTE = "<image>\n", "<|route|>"


def chat(question: str, n_images: int = 1) -> str:
    return (f"<|im_start|>user\n{IMAGE * n_images}{question}{ROUTE}<|im_end|>\n"
            "<|im_start|>assistant\n")


def image(seed: int, h: int = 50, w: int = 70):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


LONG = " ".join(["the cat sat on the red sofa next to a window"] * 120)
CASES = {  # name -> (prompt, images, extra_args)
    "router": (chat("What is shown?"), [image(0)], None),
    "sa_1": (chat("What is shown?"), [image(0)], {"visor_sa_layers": [1]}),
    "sa_1_4": (chat("What is shown?"), [image(0)], {"visor_sa_layers": [1, 4]}),
    "sa_1_6": (chat("Describe it."), [image(1)], {"visor_sa_layers": [1, 6]}),
    "sa_1_4_6": (chat("Describe it."), [image(1)], {"visor_sa_layers": [1, 4, 6]}),
    "min": (chat("Count the apples."), [image(2, 90, 40)], {"visor_budget": "min"}),
    "max": (chat("Count the apples."), [image(2, 90, 40)], {"visor_budget": "max"}),
    "cap_1": (chat("Where is the bird?"), [image(3)], {"visor_budget": 1}),
    # prefill FLOPs / dense for this prompt: [0.30, 0.45, 0.45, 0.60] -> the costliest is out
    "flops_cap": (chat("Where is the bird?"), [image(3)], {"visor_max_flops": 0.5}),
    "text_only": ("<|im_start|>user\nHello there, who are you?<|route|><|im_end|>\n"
                  "<|im_start|>assistant\n", [], None),
    "two_images": (chat("Compare them.", 2), [image(4), image(5, 64, 32)],
                   {"visor_sa_layers": [1, 6]}),
    "long": (chat(LONG), [image(6)], None),
}


def engine(visor_ckpt, enforce_eager: bool = True):
    """The equivalence suite's engine (fp32, 16 rows, 2 images); also the compiled, graph-safety
    and MRV2 (`run_cases`) engines, so every comparison is between the same settings."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # lets collective_rpc ship a test function to the worker (kv_cache_spec_kinds); tests only
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    return LLM(model=str(visor_ckpt), dtype="float32", enforce_eager=enforce_eager,
               max_model_len=4096, max_num_batched_tokens=8192, max_num_seqs=16,
               limit_mm_per_prompt={"image": 2}, seed=0)


def run(llm, names):
    from vllm import SamplingParams

    prompts, params = [], []
    for name in names:
        text, images, extra = CASES[name]
        prompts.append({"prompt": text, **({"multi_modal_data": {"image": images}} if images else {})})
        params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5,
                                     extra_args=extra, ignore_eos=True))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {n: o.outputs[0] for n, o in zip(names, outs)}


def check_against_reference(reference, name, out):
    from visor_vllm.model.budget import parse_budget

    model, proc = reference
    text, images, extra = CASES[name]
    enc = proc(images=[images] if images else None, text=text, return_tensors="pt")  # one prompt
    tokens = list(out.token_ids)
    ids = torch.cat([enc["input_ids"][0], torch.tensor(tokens[:-1])])
    with torch.no_grad():
        ref = model(ids, enc.get("pixel_values"), enc.get("image_sizes"),
                    budget=parse_budget(extra, model.config))
    logp = torch.log_softmax(ref.logits[-len(tokens):].double(), -1)   # [n, vocab]
    for step, (tok, lps) in enumerate(zip(tokens, out.logprobs)):
        best = float(logp[step].max())
        assert float(logp[step, tok]) >= best - TIE, (name, step, tok, int(logp[step].argmax()))
        for cand, lp in lps.items():
            assert abs(lp.logprob - float(logp[step, cand])) < ATOL, (name, step, cand)
    return ref


@pytest.mark.parametrize("name", list(CASES))
def test_batched_request_equals_reference(reference, batched, name):
    check_against_reference(reference, name, batched[name])


def test_each_request_alone_gives_the_batched_tokens(llm, batched):
    for name in CASES:
        alone = run(llm, [name])[name]
        assert list(alone.token_ids) == list(batched[name].token_ids), name


def test_configurations_really_differ(batched):
    """Guards the guard: if every configuration gave the same tokens, the test above is weak."""
    outs = {tuple(batched[n].token_ids) for n in ("sa_1", "sa_1_4", "sa_1_6", "sa_1_4_6")}
    assert len(outs) >= 3


def test_bad_budget_is_a_value_error(llm):
    from vllm import SamplingParams

    for extra in ({"visor_budget": "lots"}, {"visor_sa_layers": [2]}, {"visor_colour": 1}):
        with pytest.raises(Exception, match="visor") as err:
            llm.generate({"prompt": CASES["router"][0], "multi_modal_data": {"image": [image(0)]}},
                         SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
        assert isinstance(err.value, ValueError) or type(err.value).__name__ == "VLLMValidationError"


def kv_cache_spec_kinds(worker) -> dict[str, str]:
    """Runs in the worker: the class of every layer's KV cache spec (the specs themselves do
    not survive vLLM's RPC serialization; the call hangs)."""
    return {name: type(spec).__name__ for name, spec in worker.get_kv_cache_spec().items()}


def test_vision_kv_lives_only_in_ca_and_sa_capable_layers(llm, visor_ckpt):
    """Vision K/V per request <= (CA layers + SA-capable layers) x visual tokens: CA layers hold
    a cross-attention (encoder) cache, SA-capable layers one [vision ; text] sequence
    (`VisorSASpec`), and every other layer's cache is text tokens only."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, FullAttentionSpec

    from visor_vllm.engine.kv_layout import VisorSASpec
    from visor_vllm.model.config import VisorConfig

    cfg = VisorConfig.from_pretrained(str(visor_ckpt))
    specs = llm.collective_rpc(kv_cache_spec_kinds, timeout=120)[0]   # layer name -> spec class
    by_kind = {k: sorted(n for n, s in specs.items() if s == k.__name__)
               for k in (CrossAttentionSpec, VisorSASpec, FullAttentionSpec)}
    layer = "language_model.model.layers.{}.{}".format
    assert by_kind[CrossAttentionSpec] == sorted(layer(i, "cross_attn.attn") for i in cfg.cross_layers)
    assert by_kind[VisorSASpec] == sorted(layer(i, "self_attn.attn") for i in cfg.sa_capable_layers)
    text_only = [i for i in range(cfg.num_layers) if i not in cfg.sa_capable_layers]
    assert by_kind[FullAttentionSpec] == sorted(layer(i, "self_attn.attn") for i in text_only)
    assert len(specs) == cfg.num_layers + len(cfg.cross_layers)


def vision_cache_stats(worker) -> dict:
    """Runs in the worker: the VISOR model's vision-tower cache counters."""
    return worker.get_model().vision_cache.stats()


def test_a_second_turn_with_the_same_image_skips_the_image_processor_and_the_tower(llm, batched):
    """Same image, new text (a chat's next turn): a hit in the front end's processed-image cache
    (this process: the offline engine's) and in the worker's vision-tower cache, and the tokens
    of a fresh run (the batched run above processed `image(1)` itself; `sa_1_6` and `sa_1_4_6`
    share it)."""
    from visor_vllm.engine.vision_cache import processor_cache

    before = llm.collective_rpc(vision_cache_stats, timeout=120)[0]
    cache = processor_cache()  # None where VISOR_PROCESSOR_CACHE_MB=0 turns it off
    front = cache.stats() if cache is not None else None
    alone = run(llm, ["sa_1_6"])["sa_1_6"]
    after = llm.collective_rpc(vision_cache_stats, timeout=120)[0]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert list(alone.token_ids) == list(batched["sa_1_6"].token_ids)
    assert 0 < after["bytes"] <= after["max_bytes"]
    if cache is not None:
        now = cache.stats()
        assert now["hits"] == front["hits"] + 1 and now["misses"] == front["misses"]


def decoder_compiled(worker) -> bool:
    """Runs in the worker: whether vLLM compiled the VISOR decoder (support_torch_compile),
    now or from its compile cache."""
    decoder = worker.get_model().language_model.model
    return bool(getattr(decoder, "compiled", False)
                or getattr(decoder, "aot_compiled_fn", None) is not None)


def test_without_enforce_eager_the_tokens_are_the_eager_ones(visor_ckpt, batched):
    """vLLM's default path: the VISOR decoder is compiled (torch.compile; on GPU CUDA graphs,
    which VISOR's config hook turns off with a log line) and gives the eager engine's tokens
    and logprobs, every case batched and each alone (other batch sizes, same graph)."""
    compiled = engine(visor_ckpt, enforce_eager=False)
    try:
        cc = compiled.llm_engine.vllm_config.compilation_config
        assert cc.cudagraph_mode.name == "NONE" and cc.mode.name != "NONE"
        outs = run(compiled, list(CASES))
        alone = {name: run(compiled, [name])[name] for name in CASES}
        assert compiled.collective_rpc(decoder_compiled, timeout=120) == [True]
    finally:
        compiled.llm_engine.engine_core.shutdown()
    for name in CASES:
        assert list(outs[name].token_ids) == list(batched[name].token_ids), name
        assert list(alone[name].token_ids) == list(batched[name].token_ids), name
        for a, b in zip(outs[name].logprobs, batched[name].logprobs):
            assert a.keys() == b.keys(), name
            assert all(abs(a[t].logprob - b[t].logprob) < ATOL for t in a), name
