"""`scripts/gpu_check.sh --cpu --preset tiny`: the GPU check's plumbing, on this CPU.

The same script runs at real size on a GPU (docs/training.md); here every check must pass:
DDP and FSDP2 training (FSDP2 killed, resumed from its sharded state, then found done), the
export against the reference, and the speed table's rows.
"""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_gpu_check_cpu_form_passes(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--preset",
                           "tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {x["check"]: x for x in lines if "check" in x}
    assert set(checks) == {"build", "train-ddp", "train-fsdp2", "export", "speed"}
    assert all(x["ok"] for x in checks.values())
    assert (checks["train-ddp"]["engine"], checks["train-fsdp2"]["engine"]) == ("ddp", "fsdp2")
    assert checks["train-ddp"]["host_syncs_in_steps"] == 0
    assert checks["train-fsdp2"]["resumed"] and checks["export"]["logits_max_abs_diff"] < 1e-4
    speed = [x["speed"] for x in lines if "phase" in x.get("speed", {})]
    assert {(r["phase"], r["batch"]) for r in speed} == {(p, b) for p in ("prefill", "train")
                                                         for b in (1, 4)}
    assert all(r["speedup_min"] > 0 and r["speedup_max"] > 0 for r in speed)
    assert lines[-1] == {"gpu_check": "passed", "failed": [], "seconds": lines[-1]["seconds"]}
    assert (tmp_path / "check.jsonl").read_text().count("\n") == len(lines)
