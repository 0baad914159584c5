"""benchmarks/bench_vs_llava.py: its pure parts (arguments, commands, parsing, tables)."""

import json
from pathlib import Path

import pytest

from tests.benchmarks.script_loader import load_script


@pytest.fixture(scope="module")
def bench():
    with load_script("bench_vs_llava") as mod:
        yield mod


# --- arguments --------------------------------------------------------------------------------

def test_defaults(bench):
    a = bench.parse_args([])
    assert a.preset == "real" and a.models == ["visor", "llava"]
    assert a.budgets == ["min", "auto", "max"] and a.concurrency == [1, 4, 16]
    assert a.image == (384, 384) and a.max_tokens == 64 and a.num_prompts is None
    assert a.conversations == 3
    assert a.omp_bind == "auto"  # vLLM's default binding: one core left to the engine core
    assert a.out == Path("bench-results/bench_vs_llava.json") and a.serve_args == []


def test_flags_parse(bench):
    a = bench.parse_args(["--preset", "tiny", "--concurrency", "4", "1", "4", "--budgets", "max",
                          "3", "--image", "640X480", "--num-prompts", "2",
                          "--serve-args", "--max-num-seqs 8", "--models", "llava"])
    assert a.preset == "tiny" and a.concurrency == [1, 4]  # sorted, deduplicated
    assert a.budgets == ["max", "3"] and a.image == (640, 480) and a.num_prompts == 2
    assert a.serve_args == ["--max-num-seqs", "8"] and a.models == ["llava"]


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--image", "384"],
                                  ["--budgets", "cheap"], ["--preset", "huge"],
                                  ["--num-prompts", "-1"]])
def test_bad_flags_exit_2(bench, argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_requests_per_level(bench):
    assert [bench.requests_for(c, None) for c in (1, 2, 4, 8)] == [4, 4, 8, 16]
    assert bench.requests_for(4, 2) == 2


# --- commands ---------------------------------------------------------------------------------

def test_server_command_identical_for_both_models_but_the_path(bench, tmp_path):
    visor, llava = tmp_path / "visor", tmp_path / "llava"
    visor.mkdir(), llava.mkdir()
    cv, cl = bench.server_command(visor, 8000), bench.server_command(llava, 8000)
    assert cv[2] == str(visor) and cl[2] == str(llava)
    assert cv[:2] + cv[3:] == cl[:2] + cl[3:]
    flags = " ".join(cv)
    for f in ("--enforce-eager", "--max-num-batched-tokens 10000", "--no-enable-prefix-caching",
              "--mm-processor-cache-gb 0", "--load-format dummy", "--dtype bfloat16"):
        assert f in flags
    assert json.loads(cv[cv.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert "--middleware" not in flags  # VISOR-only serving features stay out of the comparison
    cc = bench.server_command(visor, 8000, compiled=True)  # vLLM's default path, for both
    assert "--enforce-eager" not in cc and cc == [f for f in cv if f != "--enforce-eager"]


def test_server_command_weights_and_extra(bench, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    cmd = bench.server_command(tmp_path, 8001, 4096, ["--max-num-seqs", "8"])
    assert "--load-format" not in cmd and cmd[-2:] == ["--max-num-seqs", "8"]
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"


def test_server_env(bench):
    env = bench.server_env(4.0, "0-1")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_bench_command_carries_budget_and_concurrency(bench, tmp_path):
    res = tmp_path / "runs" / "r.json"
    cmd = bench.bench_command(8000, tmp_path / "ckpt", tmp_path / "d.jsonl", 8, 4, 64, "min", res)
    assert cmd[1:3] == ["bench", "serve"]
    val = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert val("--dataset-name") == "custom_image" and val("--max-concurrency") == "4"
    assert val("--num-prompts") == "8" and val("--custom-output-len") == "64"
    assert json.loads(val("--extra-body")) == {"vllm_xargs": {"visor_budget": "min"}}
    assert val("--result-dir") == str(res.parent) and val("--result-filename") == "r.json"
    assert "--ignore-eos" in cmd and "--disable-shuffle" in cmd and val("--temperature") == "0"
    assert "--extra-body" not in bench.bench_command(8000, tmp_path, tmp_path, 1, 1, 8, None, res)


def test_dataset_is_deterministic_and_fresh_per_level(bench):
    a = bench.dataset_lines(0, 1, 3, (16, 12))
    assert a == bench.dataset_lines(0, 1, 3, (16, 12))
    b = bench.dataset_lines(0, 4, 3, (16, 12))
    def urls(lines):
        return [json.loads(x)["content"][0]["image_url"]["url"] for x in lines]

    c = bench.dataset_lines(0, 1, 3, (16, 12), slot=1)  # the next VISOR budget: fresh again
    assert len(set(urls(a) + urls(b) + urls(c))) == 9  # every image is new
    first = json.loads(a[0])["content"]
    assert first[0]["type"] == "image_url"
    assert first[1] == {"type": "text", "text": bench.PROMPTS[0]}


# --- log and metrics parsing ------------------------------------------------------------------

VISOR_LOG = "\n".join([  # lines as vLLM 0.32 prints them (CPU)
    "(EngineCore pid=1) WARNING 11-23 16:28:11 [kv_cache_utils.py:1483] Add 6 padding layers, "
    "may waste at most 25.00% KV cache memory",
    "(EngineCore pid=1) INFO 11-23 16:28:11 [kv_cache_utils.py:2327] CPU KV cache size: "
    "1,382,594 tokens, Maximum concurrency for 10,000 tokens per request: 138.26x",
    "(EngineCore pid=1) INFO 11-23 16:28:11 [kv_cache_utils.py:853] kv cache group sizes "
    "(128, 128, 128)"])


def test_parse_kv_log(bench):
    kv = bench.parse_kv_log(VISOR_LOG)
    assert kv == {"kv_cache_tokens": 1382594, "max_model_len": 10000,
                  "max_concurrency_at_max_len": 138.26, "group_block_sizes": [128, 128, 128],
                  "padding_layers": 6}
    llava = ("INFO [kv_cache_utils.py:2327] GPU KV cache size: 345,632 tokens, "
             "Maximum concurrency for 4,096 tokens per request: 84.38x\n")
    kv = bench.parse_kv_log(llava)
    assert kv["kv_cache_tokens"] == 345632 and kv["max_model_len"] == 4096
    assert kv["group_block_sizes"] is None and kv["padding_layers"] == 0
    assert bench.parse_kv_log("nothing")["kv_cache_tokens"] is None


def test_parse_metrics_and_capacity(bench):
    text = ('# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0005494505494505475\n'
            'vllm:cache_config_info{block_size="128",num_gpu_blocks="5461",x="y"} 1.0\n')
    usage, nb = bench.parse_metrics(text)
    assert nb == 5461 and bench.blocks_from_usage(usage, nb) == 3
    assert bench.kv_capacity(nb, 3) == 1820
    assert bench.kv_capacity(nb, None) is None and bench.kv_capacity(None, 3) is None
    assert bench.parse_metrics("") == (None, None)


def test_summarize_bench(bench):
    res = {"completed": 3, "num_prompts": 4, "mean_ttft_ms": 100.0, "median_itl_ms": 5.0,
           "request_throughput": 0.5, "output_throughput": 32.0, "unrelated": [1, 2]}
    s = bench.summarize_bench(res)
    assert s["failed"] == 1 and s["mean_ttft_ms"] == 100.0 and "unrelated" not in s
    assert s["mean_itl_ms"] is None


# --- table and ratios -------------------------------------------------------------------------

def _row(model, budget, c, ttft, itl, rps, tps, cap):
    return {"model": model, "budget": budget, "concurrency": c, "completed": 4, "failed": 0,
            "mean_ttft_ms": ttft, "mean_itl_ms": itl, "median_itl_ms": itl,
            "p99_itl_ms": 3 * itl if itl is not None else None,
            "request_throughput": rps, "output_throughput": tps, "kv_capacity_requests": cap}


ROWS = [_row("visor", "min", 1, 20000.0, 40.0, 0.05, 3.2, 300),
        _row("visor", "max", 1, 30000.0, 50.0, 0.04, 2.5, 300),
        _row("visor", "min", 4, 80000.0, 60.0, 0.06, 3.8, 300),
        _row("llava", None, 1, 40000.0, 50.0, 0.025, 1.6, 200)]


def test_ratios_pair_same_concurrency(bench):
    r = bench.compute_ratios(ROWS)
    assert [(x["budget"], x["concurrency"]) for x in r] == [("min", 1), ("max", 1)]  # no c=4 ref
    assert r[0]["ttft"] == pytest.approx(0.5) and r[0]["itl"] == pytest.approx(0.8)
    assert r[0]["req_per_s"] == pytest.approx(2.0) and r[0]["kv_capacity"] == pytest.approx(1.5)
    assert r[1]["ttft"] == pytest.approx(0.75)
    assert r[0]["itl_p99"] == pytest.approx(0.8)  # the tail, where a new image stalls decode
    assert "ITL p99" in bench.format_ratios(r) and "ITL p99 ms" in bench.format_table(ROWS)


def test_ratio_with_missing_values(bench):
    rows = [_row("visor", "min", 1, None, 40.0, 0.05, 3.2, None),
            _row("llava", None, 1, 40000.0, 0.0, 0.025, 1.6, 200)]
    r = bench.compute_ratios(rows)[0]
    assert r["ttft"] is None and r["itl"] is None and r["kv_capacity"] is None
    assert "-" in bench.format_ratios([r])


def test_format_table(bench):
    lines = bench.format_table(ROWS).splitlines()
    assert lines[0].split()[:3] == ["model/budget", "conc", "ok"]
    assert len(lines) == 2 + len(ROWS)
    assert lines[2].split() == ["visor/min", "1", "4/4", "20.00", "40.0", "40.0", "120.0", "0.050",
                                "3.20", "300"]
    assert lines[-1].split()[0] == "llava-ov"
    assert len({len(x) for x in lines}) == 1  # aligned columns


def test_format_table_missing_metrics(bench):
    row = {"model": "visor", "budget": "auto", "concurrency": 1, "error": "boom"}
    line = bench.format_table([row]).splitlines()[2].split()
    assert line[:3] == ["visor/auto", "1", "-"] and set(line[3:]) == {"-"}


def test_format_ratios(bench):
    out = bench.format_ratios(bench.compute_ratios(ROWS)).splitlines()
    assert out[2].split() == ["visor/min", "1", "0.50x", "0.80x", "0.80x", "0.80x", "2.00x", "2.00x",
                              "1.50x", "-", "-"]  # no cost model computed: dashes


# --- the decode cost model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg05():
    from visor_vllm.model.config import get_preset

    return get_preset("visor-0.5b")


def test_decode_cost_model_without_image_is_the_cross_weights(bench, cfg05):
    """No image: same FLOPs as dense; VISOR reads its CA q/o projections on top."""
    f = bench.decode_cost_model(cfg05, 0, 0, 30, cfg05.sa_configs[0], 1)
    assert f["flops"] == pytest.approx(1.0)
    assert 1.0 < f["bytes"] < 1.05


def test_decode_cost_model_tends_to_the_kv_ratio_under_load(bench, cfg05):
    """Many rows: weights vanish and the ratio is the K/V each row reads, in closed form."""
    sa, nv, ctx, L = cfg05.sa_configs[-1], 729, 50, cfg05.num_layers
    kv_ratio = (L * ctx + (len(cfg05.cross_layers) + len(sa)) * nv) / (L * (nv + ctx))
    f = bench.decode_cost_model(cfg05, nv, nv, ctx, sa, 10 ** 9)
    assert f["bytes"] == pytest.approx(kv_ratio, rel=1e-6)


def test_decode_cost_models_per_budget(bench, cfg05):
    fl = bench.decode_cost_models(cfg05, (384, 384), 21, 64, ["min", "auto", "max"], [1, 16])
    for c in (1, 16):
        assert fl["min", c]["bytes"]["lo"] == fl["min", c]["bytes"]["hi"]   # one configuration
        auto = fl["auto", c]["bytes"]
        assert auto["lo"] == pytest.approx(fl["min", c]["bytes"]["lo"])   # the router's range
        assert auto["hi"] == pytest.approx(fl["max", c]["bytes"]["hi"])
    assert fl["min", 16]["bytes"]["lo"] < fl["min", 1]["bytes"]["lo"]     # rows add K/V
    # what the 2026-12-04 note reports: a 384x384 image leaves decode ~weight-bound, an anyres
    # one leaves room
    assert fl["max", 16]["bytes"]["lo"] > 0.9
    big = bench.decode_cost_models(cfg05, (768, 1024), 21, 64, ["min"], [16])
    assert big["min", 16]["bytes"]["lo"] < 0.8


def test_format_ratios_with_cost_model(bench):
    r = dict(bench.compute_ratios(ROWS)[0],
             decode_cost_model={"bytes": {"lo": 0.95, "hi": 0.95}, "flops": {"lo": 0.99, "hi": 1.0}})
    assert bench.format_ratios([r]).splitlines()[2].split()[-2:] == ["0.95x", "0.99-1.00x"]


# --- multi-turn case --------------------------------------------------------------------------

def test_turn_two_resends_the_image_question_and_answer(bench):
    msgs = bench.conversation_turn2("data:image/png;base64,AAAA", "What is it?", "A cat.")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == bench.chat_content("data:image/png;base64,AAAA", "What is it?")
    assert msgs[1]["content"] == "A cat." and msgs[2]["content"] == bench.FOLLOW_UP


def test_turns_summary_and_table(bench):
    t = bench.summarize_turns([{"ttft_turn1_s": 3.0, "ttft_turn2_s": 1.0},
                               {"ttft_turn1_s": 4.0, "ttft_turn2_s": 1.2},
                               {"ttft_turn1_s": 5.0, "ttft_turn2_s": None}])
    assert (t["ttft_turn1_s"], t["ttft_turn2_s"], t["turn2_over_turn1"]) == (4.0, 1.1, 0.275)
    models = {"visor": {"multi_turn": {"min": t}},
              "llava": {"multi_turn": {"-": bench.summarize_turns([{"ttft_turn1_s": 8.0,
                                                                    "ttft_turn2_s": 2.2}])}}}
    lines = bench.format_multi_turn(models).splitlines()
    assert lines[2].split() == ["visor/min", "4.00", "1.10", "0.28", "0.50"]
    assert lines[3].split() == ["llava-ov", "8.00", "2.20", "0.28", "1.00"]
