"""Every engine runs the recipe on CPU with gloo processes, and agrees with one process.

FSDP2 is applied by the trainer itself (`visor_vllm.training.engines`), so these runs really
shard (Accelerate's FSDP plugin would fall back to DDP on a CPU). DDP's two-process run is in
`test_trainer.py`. DeepSpeed ZeRO-2/3 run wherever DeepSpeed imports (``DS_ACCELERATOR=cpu``),
and skip with the reason otherwise. Every launched DDP and FSDP2 step runs under
``VISOR_CHECK_HOST_SYNC=1`` (DeepSpeed's own step reads its gradient norm back).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visor_vllm.training.engines import EngineError, launch_engine
from visor_vllm.training.trainer import run

from .conftest import accelerate_launch, tiny_recipe

pytestmark = pytest.mark.e2e

STAGES = [{"kind": "stage1", "steps": 3, "lr": 1e-3, "batch_size": 4},
          {"kind": "stage2", "steps": 4, "lr": 1e-3, "batch_size": 4, "configs": "viable"}]
TWO = [{**s, "micro_batch_size": 2} for s in STAGES]  # 2 processes x 2 = the same global batch
# one process vs two: the same global batch, summed in another order (fp32)
ATOL, RTOL = 5e-5, 1e-4


def _weights(run_dir, stage="stage2"):
    return load_file(str(Path(run_dir) / stage / "model" / "model.safetensors"))


def _lines(run_dir, stage):
    return [json.loads(x) for x in (Path(run_dir) / stage / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir, stage):
    return json.loads((Path(run_dir) / stage / "model" / "trainer_state.json").read_text())


def _launch(tmp: Path, config: str, ckpt, data, *extra, **env):
    """``(run dir, finished process)``: the recipe of ``TWO`` under ``config`` on 2 processes
    (the recipe file is written once, so a relaunch resumes the same run)."""
    recipe = tmp / "r.yaml"
    if not recipe.exists():
        tiny_recipe(ckpt, data, tmp / "run", TWO, save_every=2).dump(recipe)
    done = accelerate_launch(config, 2, recipe, *extra, **env)
    if not extra:
        assert done.returncode == 0, done.stderr[-4000:]
    return tmp / "run", done


@pytest.fixture(scope="module")
def single(tmp_path_factory, visor_ckpt_synth, synth_data):
    out = tmp_path_factory.mktemp("single")
    run(tiny_recipe(visor_ckpt_synth, synth_data, out, STAGES, save_every=2), progress=False)
    return out


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, visor_ckpt_synth, synth_data):
    return _launch(tmp_path_factory.mktemp("fsdp2"), "fsdp2", visor_ckpt_synth, synth_data)[0]


def _assert_close_weights(a_dir, b_dir):
    for stage in ("stage1", "stage2"):
        a, b = _weights(a_dir, stage), _weights(b_dir, stage)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def _assert_stage1_rows(run_dir, init, routing_id):
    before = load_file(str(Path(init) / "model.safetensors"))
    after = _weights(run_dir, "stage1")
    key = "language_model.model.embed_tokens.weight"
    changed = (before[key] != after[key]).any(1).nonzero().flatten().tolist()
    assert changed == [routing_id]  # and every other row bit-exact
    others = {k for k in before if not torch.equal(before[k], after[k])} - {key}
    assert others and all(".cross_attn." in k for k in others)


def test_fsdp2_shards_every_parameter_of_every_layer(fsdp2):
    for stage in ("stage1", "stage2"):
        s = _state(fsdp2, stage)
        assert (s["engine"], s["processes"], s["wrapper"]) == ("fsdp2", 2, "fully_shard")
        assert s["dtensor_parameters"] == s["parameters"] > 100
        assert s["fsdp_units"] >= 8 + 1  # 8 decoder layers at least, then the root
        assert {(x["engine"], x["processes"]) for x in _lines(fsdp2, stage)} == {("fsdp2", 2)}


def test_fsdp2_gives_the_weights_of_one_process(single, fsdp2):
    _assert_close_weights(single, fsdp2)
    assert {x["engine"] for x in _lines(single, "stage2")} == {"single"}


def test_stage1_trains_one_embedding_row_under_fsdp2_and_one_process(single, fsdp2,
                                                                      visor_ckpt_synth):
    rid = json.loads((visor_ckpt_synth / "config.json").read_text())["routing_token_id"]
    for run_dir in (single, fsdp2):
        _assert_stage1_rows(run_dir, visor_ckpt_synth, rid)


def test_fsdp2_export_is_the_gathered_state_and_loads(fsdp2, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from visor_vllm.model.reference import VisorForConditionalGeneration

    last = fsdp2 / "stage2" / "state" / "step-4"
    assert (last / "DONE").exists() and list(last.glob("*.distcp"))  # sharded: one file a rank
    dcp_to_torch_save(str(last), str(tmp_path / "full.pt"))
    gathered = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    export = _weights(fsdp2)
    for k, v in export.items():
        assert torch.equal(gathered[f"model.{k}"], v), k
    model = VisorForConditionalGeneration.from_pretrained(str(fsdp2 / "stage2" / "model"))
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_fsdp2_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, fsdp2,
                                                                 visor_ckpt_synth, synth_data):
    args = (tmp_path, "fsdp2", visor_ckpt_synth, synth_data)
    tiny, killed = _launch(*args, "--stop-after", "5")  # killed in stage 2, after step 2
    assert killed.returncode != 0 and "stopped at step 2 of stage2" in killed.stderr
    assert not (tiny / "stage2" / "model").exists()
    _, resumed = _launch(*args)
    assert "resumed from" in resumed.stdout
    for stage in ("stage1", "stage2"):
        a, b = _lines(fsdp2, stage), _lines(tiny, stage)
        assert [(x["step"], x["sa_layers"]) for x in a] == [(x["step"], x["sa_layers"]) for x in b]
        assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], abs=1e-6)
    a, b = _weights(fsdp2), _weights(tiny)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_runs_as_one_job_and_agrees(tmp_path, single, visor_ckpt_synth,
                                                    synth_data, zero):
    # DeepSpeed's own step reads its gradient norm back (3 syncs a step): not checked here
    tiny, _ = _launch(tmp_path, f"deepspeed-zero{zero}", visor_ckpt_synth, synth_data,
                      DS_ACCELERATOR="cpu", VISOR_CHECK_HOST_SYNC="0")
    for stage in ("stage1", "stage2"):
        s = _state(tiny, stage)
        assert (s["engine"], s["processes"]) == (f"deepspeed-zero{zero}", 2)
        assert all(x["grad_norm"] is not None for x in _lines(tiny, stage))
    _assert_close_weights(single, tiny)  # ZeRO-3's export is gathered from the shards
    rid = json.loads((visor_ckpt_synth / "config.json").read_text())["routing_token_id"]
    _assert_stage1_rows(tiny, visor_ckpt_synth, rid)


@pytest.mark.parametrize("env, want", [
    ({}, "accelerate"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2"),
    ({"VISOR_TRAIN_ENGINE": "fsdp2"}, "fsdp2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1 is not supported"),
    ({"VISOR_TRAIN_ENGINE": "zero9"}, "VISOR_TRAIN_ENGINE"),
])
def test_the_launch_picks_the_engine(monkeypatch, env, want):
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "VISOR_TRAIN_ENGINE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if want in ("accelerate", "fsdp2"):
        assert launch_engine() == want
    else:
        with pytest.raises(EngineError, match=want):
            launch_engine()
