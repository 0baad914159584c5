"""The training loop: learning, configuration sampling, kill-and-resume, 2 processes == 1."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visor_vllm.training.data import EncodedDataset, SampleEncoder, collate, load_records
from visor_vllm.training.model import VisorTrainStep
from visor_vllm.training.trainer import ConfigSampler, Stopped, StepSampler, load_model, run

from .conftest import launch, tiny_recipe


def _weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _curve(stage_dir):
    return [(r["step"], r["loss"], tuple(r["sa_layers"]))
            for r in map(json.loads, (Path(stage_dir) / "metrics.jsonl").read_text().splitlines())]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(visor_ckpt_synth, synth_data):
    model = load_model("stage2", visor_ckpt_synth)
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(synth_data / "train.jsonl"), enc, synth_data)
    batch = collate([ds[i] for i in range(8)], enc.tokenizer.pad_token_id)
    step = VisorTrainStep(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                            weight_decay=0.0)
    losses = []
    for _ in range(15):
        loss, n = step(batch, [0, 2, 4, 6])
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach() / n))
    assert losses[-1] < 0.5 * losses[0], losses


def test_samplers_are_pure_functions_of_the_step():
    s = StepSampler(10, 4, seed=1)
    assert s.indices(3) == StepSampler(10, 4, seed=1).indices(3)
    assert sorted(s.indices(0) + s.indices(1) + s.indices(2)[:2]) == list(range(10))
    c = ConfigSampler([[0], [0, 2], [0, 2, 4]], "sandwich", seed=0)
    assert [c.at(i) for i in range(2)] == [[0, 2, 4], [0]]
    assert c.at(7) == ConfigSampler([[0], [0, 2], [0, 2, 4]], "sandwich", seed=0).at(7)


def test_stage2_visits_several_configurations(tmp_path, visor_ckpt_synth, synth_data):
    recipe = tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "run",
                         [{"kind": "stage2", "steps": 8, "lr": 1e-3, "batch_size": 4,
                           "configs": "viable", "sampling": "sandwich"}], save_every=100)
    out = run(recipe, progress=False)
    seen = {c for _, _, c in _curve(tmp_path / "run" / "stage2")}
    assert len(seen) >= 4 and (0, 2, 4, 6) in seen and (0,) in seen
    assert json.loads((out / "trainer_state.json").read_text())["processes"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "visor" and (out / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, visor_ckpt_synth, synth_data):
    out = tmp_path_factory.mktemp("whole")
    return out, run(tiny_recipe(visor_ckpt_synth, synth_data, out, KILL_STAGES), progress=False)


KILL_STAGES = [{"kind": "stage1", "steps": 3, "lr": 1e-3, "batch_size": 4},
               {"kind": "stage2", "steps": 4, "lr": 1e-3, "batch_size": 4, "configs": "viable"}]


@pytest.mark.parametrize("kill_at, where", [(2, "stage1"), (5, "stage2")])
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, visor_ckpt_synth, synth_data,
                                                          uninterrupted, kill_at, where):
    (a_dir, whole) = uninterrupted
    killed = tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "b", KILL_STAGES)
    with pytest.raises(Stopped, match=where):
        run(killed, stop_after=kill_at, progress=False)  # dies right after a saved state
    assert not (tmp_path / "b" / where / "model").exists()
    resumed = run(killed, progress=False)
    for stage in ("stage1", "stage2"):
        ca, cb = _curve(a_dir / stage), _curve(tmp_path / "b" / stage)
        assert [(s, c) for s, _, c in ca] == [(s, c) for s, _, c in cb]
        assert [x for _, x, _ in ca] == pytest.approx([x for _, x, _ in cb], abs=1e-6)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_dense_stage_trains_transformers_llava_onevision(tmp_path, dense_ckpt, synth_data):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.checkpoints.convert import convert

    out = run(tiny_recipe(dense_ckpt, synth_data, tmp_path / "d",
                          [{"kind": "dense", "steps": 2, "lr": 1e-3, "batch_size": 4}]),
              progress=False)
    LlavaOnevisionForConditionalGeneration.from_pretrained(str(out), local_files_only=True)
    before, after = _weights(dense_ckpt), _weights(out)
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[key], after[key])
    vt = [k for k in before if k.startswith("vision_tower.")]
    assert vt and all(torch.equal(before[k], after[k]) for k in vt)  # frozen by default
    convert(out, tmp_path / "v", preset="synthetic", progress=False)


def test_wrong_checkpoint_kind_is_a_named_error(tmp_path, dense_ckpt, synth_data):
    from visor_vllm.training.model import TrainingError

    with pytest.raises(TrainingError, match="not a VISOR checkpoint"):
        run(tiny_recipe(dense_ckpt, synth_data, tmp_path / "x",
                        [{"kind": "stage1", "steps": 1, "lr": 1e-3, "batch_size": 2}]),
            progress=False)


@pytest.mark.e2e
def test_two_processes_give_the_parameters_of_one(tmp_path, visor_ckpt_synth, synth_data):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo, CPU) vs one process, same batch;
    stage 1 then stage 2, every step checked for host synchronisation.

    (`--cpu` would silently run one process; see the trainer's footguns.)
    """
    stages = [{"kind": "stage1", "steps": 2, "lr": 1e-3, "batch_size": 8},
              {"kind": "stage2", "steps": 3, "lr": 1e-3, "batch_size": 8, "configs": "viable",
               "sampling": "sandwich"}]
    for name in ("one", "two"):
        tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / name, stages,
                    save_every=100).dump(tmp_path / f"{name}.yaml")
    bin_dir = Path(sys.executable).parent
    one = launch([sys.executable, "-m", "visor_vllm.training", str(tmp_path / "one.yaml"),
                  "--no-progress"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0", "-m", "visor_vllm.training",
                  str(tmp_path / "two.yaml"), "--no-progress"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "stage2" / "model" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["micro_batch_size"] == 4
    assert (state["engine"], state["wrapper"]) == ("ddp", "DistributedDataParallel")
    assert {r["engine"] for r in map(json.loads, (tmp_path / "two" / "stage2" / "metrics.jsonl")
                                     .read_text().splitlines())} == {"ddp"}
    a = _weights(tmp_path / "one" / "stage2" / "model")
    b = _weights(tmp_path / "two" / "stage2" / "model")
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
        changed += not torch.equal(a[k], _weights(visor_ckpt_synth)[k])
    assert changed > 10
    # stage 1 under DDP: the routing token's row is the only embedding row that moved
    key = "language_model.model.embed_tokens.weight"
    e0, e1 = _weights(visor_ckpt_synth)[key], _weights(tmp_path / "two" / "stage1" / "model")[key]
    rid = json.loads((Path(visor_ckpt_synth) / "config.json").read_text())["routing_token_id"]
    assert (e0 != e1).any(1).nonzero().flatten().tolist() == [rid]


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, visor_ckpt_synth, synth_data):
    """Through the CLI in its own process: Accelerate's precision is fixed per process."""
    tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "bf16",
                [{"kind": "stage2", "steps": 2, "lr": 1e-3, "batch_size": 4,
                  "micro_batch_size": 2, "gradient_checkpointing": True}],
                save_every=100, mixed_precision="bf16").dump(tmp_path / "r.yaml")
    done = launch([sys.executable, "-m", "visor_vllm.training", str(tmp_path / "r.yaml"),
                   "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    curve = _curve(tmp_path / "bf16" / "stage2")
    assert len(curve) == 2 and all(0 < loss < 100 for _, loss, _ in curve)
    state = json.loads((tmp_path / "bf16" / "stage2" / "model" / "trainer_state.json").read_text())
    assert state["accumulation"] == 2
