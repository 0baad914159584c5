"""The soak script (loadtests/soak.py) end to end, as a short smoke run: mixed good and bad
requests at saturation leave 0 failed good requests and counters that add up. The measured
10-minute run is a command (SECURITY.md), not a test."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


def test_soak_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "soak", Path(__file__).resolve().parents[1] / "loadtests" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    report = soak.run(minutes=0.25, workers=6, seed=1, max_growth=1.0, log_dir=tmp_path)
    assert report["failures"] == [] and report["requests"] > 50
    assert report["checks"] == {k: True for k in report["checks"]}, report
