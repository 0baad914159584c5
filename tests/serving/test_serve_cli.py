"""`visor-vllm serve`: builds the embedded default once and hands a complete command to vllm."""

import pytest

from visor_vllm.serving import serve
from visor_vllm.cli import main


def test_dry_run_builds_the_default_checkpoint_and_prints_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--dry-run", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / serve.DEFAULT_DIR / "model.safetensors").exists()
    assert "http://127.0.0.1:8123/v1" in out and "--served-model-name visor-tiny" in out
    assert "--load-format" not in out  # it has weights


def test_weightless_dir_gets_dummy_weights_and_extra_args_pass_through(tmp_path, capsys):
    from visor_vllm.checkpoints.build import build_tiny

    build_tiny(tmp_path / "visor-0.5b", preset="visor-0.5b", weights=False)
    assert main(["serve", str(tmp_path / "visor-0.5b"), "--dry-run", "--", "--max-num-seqs", "2"]) == 0
    out = capsys.readouterr().out
    assert "--load-format dummy" in out and out.rstrip().endswith("--max-num-seqs 2")


def test_not_a_checkpoint_is_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--dry-run"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_preset_name_builds_a_weightless_real_size_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "visor-0.5b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "checkpoints/visor-0.5b/config.json").exists()
    assert "--load-format dummy" in out and "--served-model-name visor-0.5b" in out
    assert f"--middleware {serve.MIDDLEWARE}" in out


def test_default_budget_is_checked_before_vllm_starts(tmp_path, monkeypatch, capsys):
    from visor_vllm.model.budget import DEFAULT_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEFAULT_ENV, "")  # restored (unset) after the test: main() sets it
    assert main(["serve", "--dry-run", "--default-budget", "lots"]) == 2
    assert "VISOR_DEFAULT_BUDGET" in capsys.readouterr().err
    assert main(["serve", "--dry-run", "--default-budget", '{"visor_max_flops": 0.3}']) == 0
    import os

    assert os.environ[DEFAULT_ENV] == '{"visor_max_flops": 0.3}'


def test_a_llava_onevision_dir_is_refused_with_how_to_convert(tmp_path, capsys):
    import json

    from visor_vllm.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    assert main(["serve", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "llava_onevision checkpoint, not VISOR" in err and "visor-vllm convert" in err
