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
