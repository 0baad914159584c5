"""A tiny synthetic dataset and tiny dense / converted VISOR checkpoints of the synthetic preset."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def load_script():
    """``load_script("name")``: the module ``scripts/name.py`` (scripts are not a package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


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
                                                     max_length=512,
                                                     num_workers=kw.pop("num_workers", 0),
                                                     pre_encode_gb=kw.pop("pre_encode_gb", 4.0)),
                       output_dir=str(out), stages=[StageSpec(**s) for s in stages],
                       save_every=kw.pop("save_every", 2), log_every=1, **kw)


def launch(args: list[str], cwd=ROOT, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run a training command in its own process group of processes, CPU only, one thread each."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "VISOR_CHECK_HOST_SYNC": "1", **env}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def accelerate_launch(config: str, processes: int, recipe, *extra: str, **env):
    """``accelerate launch --config_file deploy/accelerate/<config>.yaml`` on ``processes``
    gloo processes (from the repository root: the DeepSpeed configs name their JSON by path)."""
    bin_dir = Path(sys.executable).parent
    return launch([str(bin_dir / "accelerate"), "launch", "--config_file",
                   str(ROOT / "deploy" / "accelerate" / f"{config}.yaml"),
                   "--num_processes", str(processes), "--main_process_port", "0",
                   "-m", "visor_vllm.training", str(recipe), "--no-progress", *extra], **env)
