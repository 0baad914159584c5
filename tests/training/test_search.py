"""Configuration search: subsets, the viable rule, and writing sa_configs with a resized router."""

import json

import pytest
from safetensors.torch import load_file

from visor_vllm.model.config import VisorConfig, get_preset
from visor_vllm.training.search import search, subsets, viable, write_configs


def _row(layers, flops, acc, fam):
    return {"sa_layers": layers, "flops_vs_dense": flops, "accuracy": acc, "families": fam}


def test_subsets_fix_the_always_on_layers():
    got = subsets(get_preset("synthetic"))
    assert len(got) == 8 and all(c[0] == 0 for c in got) and [0, 2, 4, 6] in got


def test_viable_keeps_frontier_and_what_some_family_needs():
    rows = [_row([0], 0.4, 0.80, {"a": 0.9, "b": 0.7}),
            _row([0, 2], 0.5, 0.79, {"a": 0.88, "b": 0.70}),   # worse everywhere: dropped
            _row([0, 4], 0.5, 0.80, {"a": 0.80, "b": 0.80}),   # b +10 points: kept
            _row([0, 2, 4], 0.6, 0.85, {"a": 0.9, "b": 0.8}),  # frontier: kept
            _row([0, 2, 4, 6], 0.7, 0.85, {"a": 0.9, "b": 0.8})]  # costliest: kept
    assert viable(rows) == [[0], [0, 4], [0, 2, 4], [0, 2, 4, 6]]


def _q(n, right):
    return [1.0] * right + [0.0] * (n - right)


def test_paired_viable_drops_configurations_that_win_only_on_noise():
    """100 questions a family: +3 points on family b over a cheaper configuration (the 2-point
    rule keeps it as measured), from 4 vs 1 discordant answers: not significant, dropped; a
    +15-point win is kept."""
    cheap = {"": _q(200, 160), "a": _q(100, 90), "b": _q(100, 70)}
    noise = {"": _q(200, 163), "a": _q(100, 90), "b": _q(100, 74)}
    noise["b"][0] = 0.0  # 4 questions gained, 1 lost: +3 points
    real = {"": _q(200, 175), "a": _q(100, 90), "b": _q(100, 85)}
    full = {"": _q(200, 176), "a": _q(100, 90), "b": _q(100, 86)}
    rows = [dict(_row([0], 0.4, 0.800, {"a": 0.90, "b": 0.70}), _correct=cheap),
            dict(_row([0, 2], 0.5, 0.815, {"a": 0.90, "b": 0.73}), _correct=noise),
            dict(_row([0, 4], 0.55, 0.875, {"a": 0.90, "b": 0.85}), _correct=real),
            dict(_row([0, 2, 4], 0.7, 0.88, {"a": 0.90, "b": 0.86}), _correct=full)]
    assert viable(rows, test="point") == [[0], [0, 2], [0, 4], [0, 2, 4]]
    assert viable(rows) == [[0], [0, 4], [0, 2, 4]]


def test_search_and_write_configs(tmp_path, visor_ckpt_synth, synth_data):
    res = search(visor_ckpt_synth, synth_data / "val.jsonl", batch_size=8)
    assert len(res["configs"]) == 8 and res["image_tokens"] == 36
    assert len(res["heatmap"]["accuracy"]) == 8 and res["heatmap"]["columns"]
    keep = [[0], [0, 4], [0, 2, 4, 6]]
    out = write_configs(visor_ckpt_synth, keep, tmp_path / "ck")
    cfg = VisorConfig.from_pretrained(str(out))
    assert cfg.sa_configs == keep and cfg.sa_capable_layers == [0, 2, 4, 6]
    old, new = load_file(str(visor_ckpt_synth / "model.safetensors")), load_file(
        str(out / "model.safetensors"))
    assert new["router.fc2.weight"].shape[0] == 3
    assert (new["router.fc2.weight"][1] == old["router.fc2.weight"][2]).all()
    out2 = write_configs(visor_ckpt_synth, [[0], [0, 4]], tmp_path / "ck2")
    cfg2 = VisorConfig.from_pretrained(str(out2))
    assert cfg2.layer_types[2] == "text" and cfg2.layer_types[6] == "text"
    json.dumps(res)
