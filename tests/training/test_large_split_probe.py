"""scripts/large_split_probe.py: a per-family choice scored on other questions, and its split."""

import json

import pytest

from visor_vllm.training import synthetic


def _records(bits: str, families: str) -> list[dict]:
    return [{"correct": b == "1", "family": f} for b, f in zip(bits, families)]


def test_a_choice_is_scored_by_its_own_answers_and_costs(load_script):
    probe = load_script("large_split_probe")
    configs = [[0], [0, 2]]                       # cheapest, full
    flops = [1.0, 4.0]
    fam = "aabb" * 2                              # samples 0..7, families in turn of two
    results = [_records("10101010", fam),         # [0]: a right on 2 of 4, b on 2 of 4
               _records("11111110", fam)]         # full: a 4 of 4, b 3 of 4
    idx = {"a": [0, 1, 4, 5], "b": [2, 3, 6, 7]}
    got = probe._score(results, configs, {"a": 0, "b": 1}, flops, idx)
    assert got["labels"] == {"a": [1], "b": [1, 3]}
    assert got["accuracy"] == pytest.approx(5 / 8, abs=1e-4)      # a: 2 right, b: 3 right
    assert got["max_accuracy"] == pytest.approx(7 / 8, abs=1e-4)
    assert got["accuracy_ratio"] == pytest.approx(5 / 7, abs=1e-4)
    assert got["flops_vs_max"] == pytest.approx((4 * 1 + 4 * 4) / 8 / 4, abs=1e-4)
    lo, hi = got["accuracy_ratio_ci"]
    assert lo < 5 / 7 < hi
    half = probe._score(results, configs, {"a": 1, "b": 1}, flops, {"a": [0, 1], "b": [2, 3]})
    assert half["accuracy_ratio"] == 1.0 and half["flops_vs_max"] == 1.0


def test_the_split_is_the_runs_seed_and_families_in_a_new_stream(tmp_path, load_script):
    probe = load_script("large_split_probe")
    run = tmp_path / "run"
    synthetic.write_dataset(run / "data", seed=3, n_train=1, n_val=1, n_test=2,
                            families=["count", "below"], progress=False)
    big = probe._split(run, tmp_path / "probe", per_family=3)
    rows = [json.loads(line) for line in big.read_text().splitlines()]
    assert [r["family"] for r in rows] == ["count", "below"] * 3
    test = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "big-0" and test[0]["id"] == "test-0"  # its own (seed, split) stream
    assert not (run / "data" / "big.jsonl").exists()             # the run is left as it was
    stamp = big.stat().st_mtime_ns
    assert probe._split(run, tmp_path / "probe", per_family=3) == big
    assert big.stat().st_mtime_ns == stamp                           # reused, not rewritten
    assert len(probe._split(run, tmp_path / "probe", per_family=4).read_text().splitlines()) == 8
