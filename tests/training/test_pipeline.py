"""`visor-vllm recipe synthetic`, shrunk to seconds: every phase runs and the report is complete.

This is plumbing only: accuracies at this size are chance (the README has the full run).
"""

import json

from visor_vllm.training.pipeline import run_synthetic

TINY = {"data": {"n_train": 48, "n_val": 8, "n_test": 32}, "encoder": {"steps": 3},
        "dense": {"steps": 3, "batch_size": 4}, "stage1": {"steps": 2, "batch_size": 4},
        "stage2": {"steps": 4, "batch_size": 4}, "eval": {"batch_size": 16},
        "save_every": 2, "log_every": 1}


def test_recipe_runs_every_phase_and_reports(tmp_path):
    report = run_synthetic(tmp_path / "r", quick=True, progress=False, overrides=TINY)
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["loss_curve"] == report["loss_curve"]
    assert [len(report["loss_curve"][s]) for s in ("dense", "stage1", "stage2")] == [3, 2, 4]
    assert set(report["dense"]) >= {"easy", "hard", "families"}
    assert len(report["configs"]) == 8  # every viable configuration of the synthetic preset
    flops = [c["prefill_flops_vs_dense"] for c in report["configs"]]
    assert flops[0] == min(flops) and flops[-1] == max(flops) < 1
    assert all(c["easy"] is not None and c["hard"] is not None for c in report["configs"])
    assert report["encoder"]["colour"] >= 0 and report["image_tokens"] == 36
    assert (tmp_path / "r" / "visor" / "config.json").exists()
    # a rerun resumes: finished phases are not redone
    again = run_synthetic(tmp_path / "r", quick=True, progress=False, overrides=TINY)
    assert "dense" in again["wall_seconds"] and again["wall_seconds"]["dense"] < 5
