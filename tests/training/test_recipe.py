"""Recipe files: one versioned YAML, strict keys, batch arithmetic."""

import pytest

from visor_vllm.training.pipeline import load_recipe
from visor_vllm.training.recipe import RecipeError, StageSpec, TrainRecipe

BASE = {"init": "i", "data": {"train": "t.jsonl"}, "output_dir": "o",
        "stages": [{"kind": "stage1", "steps": 3, "lr": 1e-3}]}


def test_round_trip(tmp_path):
    r = TrainRecipe.from_dict(BASE)
    r.dump(tmp_path / "r.yaml")
    assert TrainRecipe.load(tmp_path / "r.yaml") == r


@pytest.mark.parametrize("bad, match", [
    ({**BASE, "lr": 1}, "unknown key"),
    ({**BASE, "stages": [{"kind": "stage3", "steps": 1, "lr": 1}]}, "stage kind"),
    ({**BASE, "stages": [{"kind": "stage2", "steps": 1, "lr": 1, "sampling": "x"}]}, "sampling"),
    ({**BASE, "stages": [{"kind": "stage1", "steps": 1, "lr": 1, "configs": "viable"}]},
     "one configuration"),
    ({**BASE, "stages": [{"kind": "stage2", "steps": 1, "lr": 1, "train_language_model": True}]},
     "stage1 option"),
    ({**BASE, "recipe_version": 9}, "recipe_version"),
    ({**BASE, "stages": []}, "at least one stage"),
    ({**BASE, "data": {"train": "x", "typo": 1}}, "unknown key"),
    ({**BASE, "data": {"train": "x", "pre_encode_gb": -1}}, "pre_encode_gb is a number"),
    ({**BASE, "data": {"train": "x", "pre_encode_gb": "4"}}, "pre_encode_gb is a number"),
    ({**BASE, "data": {"train": "x", "num_workers": -1}}, "num_workers is a number"),
    ({**BASE, "data": {"train": "x", "num_workers": True}}, "num_workers is a number"),
    ({**BASE, "stages": [{"kind": "stage2", "steps": 1, "lr": "1e-4x"}]},
     "stage2: lr is a number, got '1e-4x'"),
    ({**BASE, "stages": [{"kind": "stage2", "steps": 2.5, "lr": 1}]}, "steps is an integer"),
])
def test_bad_recipes_are_named_errors(bad, match):
    with pytest.raises(RecipeError, match=match):
        TrainRecipe.from_dict(bad)


def test_accumulation_is_derived_and_checked():
    s = StageSpec(kind="stage2", steps=1, lr=1.0, batch_size=64, micro_batch_size=16)
    assert s.accumulation(1) == (16, 4) and s.accumulation(2) == (16, 2)
    with pytest.raises(RecipeError, match="multiple"):
        s.accumulation(3)
    assert StageSpec(kind="dense", steps=1, lr=1.0, batch_size=8).accumulation(2) == (4, 1)


def test_shipped_synthetic_recipe_parses_and_quick_overrides_it():
    full, quick = load_recipe(), load_recipe(quick=True)
    for cfg in (full, quick):
        for k in ("dense", "stage1", "stage2"):
            StageSpec(**cfg[k])
    assert quick["dense"]["steps"] < full["dense"]["steps"]
    assert full["stage1"]["configs"] == "max" and full["stage2"]["configs"] == "viable"


def test_unquoted_mixed_precision_no_means_no(tmp_path):
    """YAML reads `mixed_precision: no` (as Accelerate's own configs write it) as false."""
    (tmp_path / "r.yaml").write_text("init: i\ndata: {train: t.jsonl}\noutput_dir: o\n"
                                     "mixed_precision: no\n"
                                     "stages: [{kind: stage1, steps: 3, lr: 1.0e-3}]\n")
    assert TrainRecipe.load(tmp_path / "r.yaml").mixed_precision == "no"
    with pytest.raises(RecipeError, match="mixed_precision is 'no' or 'bf16', got 'fp8'"):
        TrainRecipe.from_dict({**BASE, "mixed_precision": "fp8"})


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-4` as the string "1e-4"; recipes read it as 1e-4."""
    import yaml

    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # why load_yaml exists
    (tmp_path / "r.yaml").write_text("init: i\ndata: {train: t.jsonl}\noutput_dir: o\n"
                                     "stages: [{kind: stage2, steps: 2500, lr: 1e-4,"
                                     " max_grad_norm: 1E0}]\n")
    stage = TrainRecipe.load(tmp_path / "r.yaml").stages[0]
    assert (stage.lr, stage.max_grad_norm, stage.steps) == (1e-4, 1.0, 2500)
    assert isinstance(stage.steps, int)
    from visor_vllm.training.recipe import load_yaml
    assert load_yaml("[2e-3, -1.5e+2, .5, 3., 1_000, x1e3, '1e-4']") == [
        0.002, -150.0, 0.5, 3.0, 1000, "x1e3", "1e-4"]
