"""A tiny synthetic dataset and tiny dense / converted VISOR checkpoints of the synthetic preset."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from visor_vllm.training.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth") / "data", seed=0, n_train=96,
                         n_val=16, n_test=32, turns=2, progress=False)


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.training.synthetic import corpus

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("dense") / "ckpt", seed=0,
                                      preset="synthetic", extra_corpus=corpus())


@pytest.fixture(scope="session")
def visor_ckpt_synth(tmp_path_factory, dense_ckpt):
    from visor_vllm.checkpoints.convert import convert

    return convert(dense_ckpt, tmp_path_factory.mktemp("visor") / "ckpt", preset="synthetic",
                   init="random", progress=False)


def tiny_recipe(init, data, out, stages, **kw):
    from visor_vllm.training.recipe import DataSpec, StageSpec, TrainRecipe

    return TrainRecipe(init=str(init), data=DataSpec(train=str(data / "train.jsonl"),
                                                     max_length=512, num_workers=0),
                       output_dir=str(out), stages=[StageSpec(**s) for s in stages],
                       save_every=kw.pop("save_every", 2), log_every=1, **kw)
