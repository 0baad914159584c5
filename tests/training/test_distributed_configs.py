"""The shipped accelerate / DeepSpeed configs and the paper-size recipe parse as their tools expect.

Every engine is run for real elsewhere (`test_trainer.py`: DDP; `test_engines.py`: FSDP2 and
DeepSpeed, two gloo processes each); here the files themselves are checked.
"""

import json
from pathlib import Path

import pytest

from visor_vllm.training.recipe import TrainRecipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deploy" / "accelerate").glob("*.yaml"))


def test_there_is_a_config_per_engine():
    names = {p.stem for p in CONFIGS}
    assert names == {"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_reads_the_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_machines == 1 and cfg.num_processes >= 2
    if "deepspeed" in path.stem:
        ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
        assert ds["gradient_accumulation_steps"] == 1  # the trainer accumulates (see trainer)
        # a mixed_precision next to a DeepSpeed JSON makes Accelerate refuse to start
        assert "mixed_precision" not in path.read_text().split("deepspeed_config:")[0]
    if path.stem == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2


def test_paper_recipe_parses_with_the_papers_numbers():
    r = TrainRecipe.load(ROOT / "visor_vllm" / "training" / "recipes" / "visor-0.5b.yaml")
    s1, s2 = r.stages
    assert (s1.kind, s1.lr, s1.configs) == ("stage1", 1e-4, "max")
    assert (s2.kind, s2.lr, s2.configs, s2.sampling) == ("stage2", 1e-5, "viable", "uniform")
    assert s1.batch_size == s2.batch_size == 128 and s1.weight_decay == s2.weight_decay == 0
    assert s1.accumulation(16) == (8, 1)
