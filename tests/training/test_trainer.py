"""The training loop: learning, configuration sampling, kill-and-resume, 2 processes == 1."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visor_vllm.training.data import (EncodedDataset, PreEncoded, SampleEncoder, collate,
                                      load_records)
from visor_vllm.training.model import VisorTrainStep
from visor_vllm.training.trainer import ConfigSampler, Stopped, StepSampler, load_model, run

from .conftest import launch, tiny_recipe


def _weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _curve(stage_dir):
    return [(r["step"], r["loss"], tuple(r["sa_layers"]))
            for r in map(json.loads, (Path(stage_dir) / "metrics.jsonl").read_text().splitlines())]


def _assert_same_run(a_dir, b_dir, stages, a_model, b_model, loss: dict, weights: dict | None):
    """Two runs' curves (same steps and configurations, losses ``pytest.approx(**loss)``) and
    exported weights (``assert_close(**weights)``; None: the caller compares them) agree."""
    for stage in stages:
        ca, cb = _curve(Path(a_dir) / stage), _curve(Path(b_dir) / stage)
        assert [(s, c) for s, _, c in ca] == [(s, c) for s, _, c in cb]
        assert [x for _, x, _ in ca] == pytest.approx([x for _, x, _ in cb], **loss)
    if weights is None:
        return
    a, b = _weights(a_model), _weights(b_model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **weights)


def _assert_same_training(a_model, b_model, init, lr: float):
    """Two runs that differ only in float rounding (a compiled and an eager one) moved the
    weights alike.

    AdamW amplifies rounding: its step is about ``lr`` wherever a gradient is above ``eps``,
    whatever its size, so an element whose gradient is rounding noise or a near-cancellation
    moves by a different fraction of a step in each run. One element of a stage-2 V
    projection differed by 0.02 lr on an AVX2 host (AMD EPYC); on AVX-512 hosts both runs were
    within 1e-5. And a cross-attention key bias has no gradient at all in exact arithmetic (no
    RoPE there, and softmax ignores a shift shared by all keys), so its few-1e-6 moves are noise.
    Hence: every element within a twentieth of a step, and every tensor the runs moved by more
    than one step (in norm) moved the same way to 2e-3 of that move; a block that stopped
    training, or trained wrongly, misses that by orders of magnitude."""
    a, b, w0 = _weights(a_model), _weights(b_model), _weights(init)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=0.05 * lr)
        if k in w0 and (moved := (a[k] - w0[k]).norm()) > lr:
            assert (a[k] - b[k]).norm() <= 2e-3 * moved, k


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
    _assert_same_run(a_dir, tmp_path / "b", ("stage1", "stage2"), whole, resumed,
                     loss=dict(abs=1e-6), weights=dict(rtol=0, atol=1e-6))


def test_a_compiled_run_follows_the_eager_one(tmp_path, visor_ckpt_synth, synth_data,
                                              uninterrupted):
    """``compile: true`` (every block torch.compiled): the same losses and weights as the eager
    run to float rounding, over stage 1 and a stage 2 that visits several configurations (SA
    and CA layers, with and without SA); a block that fell back to eager (dynamo's recompile
    limit) fails the run instead of passing unseen."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    counters.clear()
    a_dir, whole = uninterrupted
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        compiled = run(tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "c", KILL_STAGES,
                                   compile=True), progress=False)
    assert counters["stats"]["unique_graphs"] > 0
    _assert_same_run(a_dir, tmp_path / "c", ("stage1", "stage2"), whole, compiled,
                     loss=dict(rel=1e-4), weights=None)
    _assert_same_training(whole, compiled, visor_ckpt_synth, lr=1e-3)


def test_samples_encoded_as_drawn_train_the_same_run(tmp_path, visor_ckpt_synth, synth_data,
                                                     uninterrupted, capsys):
    """Pre-encoding (the default, `data.pre_encode`) only moves work: a run whose samples pass
    ``pre_encode_gb`` after the first encodes the others as drawn, says so, and gives the same
    bytes as the run that pre-encoded them all."""
    a_dir, whole = uninterrupted
    drawn = run(tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "d", KILL_STAGES,
                            pre_encode_gb=1e-9), progress=False)
    said = capsys.readouterr().out
    assert "[stage1] pre-encoded 1 of 12 samples" in said
    assert "the other 11 encoded as drawn" in said
    _assert_same_run(a_dir, tmp_path / "d", ("stage1", "stage2"), whole, drawn,
                     loss=dict(abs=0), weights=dict(rtol=0, atol=0))


def test_images_processed_by_an_earlier_run_train_the_same_run(tmp_path, dense_ckpt,
                                                               visor_ckpt_synth, synth_data,
                                                               uninterrupted, capsys):
    """The recipe hands its dense phase's processed images to VISOR's stages (`PixelStore`):
    they only tokenize, say so, and train the same bytes as a run that processed its own."""
    from visor_vllm.training.data import PixelStore, pre_encode

    a_dir, whole = uninterrupted
    store = PixelStore()
    records = load_records(synth_data / "train.jsonl")
    pre_encode(EncodedDataset(records, SampleEncoder(dense_ckpt, pixels=store), synth_data),
               range(len(records)))  # what the dense phase does
    assert len(store) == len(records)
    reused = run(tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "p", KILL_STAGES),
                 progress=False, pixels=store)
    said = capsys.readouterr().out
    assert "[stage1] pre-encoded 12 of 12 samples" in said
    assert "the images of 12 processed by an earlier stage" in said
    assert "the images of 16 processed by an earlier stage" in said
    _assert_same_run(a_dir, tmp_path / "p", ("stage1", "stage2"), whole, reused,
                     loss=dict(abs=0), weights=dict(rtol=0, atol=0))


def test_batches_made_by_a_worker_train_the_same_run(tmp_path, visor_ckpt_synth, synth_data,
                                                     uninterrupted):
    """Where the batches are made (a DataLoader worker, or the step's process: the default on a
    CPU once every sample is pre-encoded, `trainer.loader_workers`) changes no byte."""
    from visor_vllm.training.trainer import loader_workers

    a_dir, whole = uninterrupted  # made in the step's process
    worker = run(tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "w", KILL_STAGES,
                             num_workers=1), progress=False)
    _assert_same_run(a_dir, tmp_path / "w", ("stage1", "stage2"), whole, worker,
                     loss=dict(abs=0), weights=dict(rtol=0, atol=0))

    class Pre(PreEncoded):
        def __init__(self, complete):
            self.complete = complete

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(None, Pre(True), cpu) == 0
    assert loader_workers(None, Pre(False), cpu) == 1  # some samples are encoded as drawn
    assert loader_workers(None, Pre(True), gpu) == 1   # the worker overlaps the device
    assert loader_workers(None, object(), cpu) == 1    # nothing pre-encoded
    assert loader_workers(3, Pre(True), cpu) == 3      # as set


def test_a_compiled_dense_stage_follows_the_eager_one(tmp_path, dense_ckpt, synth_data):
    from torch._dynamo import config as dynamo_config

    from visor_vllm.training.engines import compile_blocks
    from visor_vllm.training.recipe import RecipeError

    stages = [{"kind": "dense", "steps": 3, "lr": 1e-3, "batch_size": 4}]
    eager = run(tiny_recipe(dense_ckpt, synth_data, tmp_path / "e", stages), progress=False)
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        compiled = run(tiny_recipe(dense_ckpt, synth_data, tmp_path / "c", stages,
                                   compile=True), progress=False)
    _assert_same_run(tmp_path / "e", tmp_path / "c", ("dense",), eager, compiled,
                     loss=dict(rel=1e-4), weights=None)
    _assert_same_training(eager, compiled, dense_ckpt, lr=1e-3)
    model = load_model("dense", dense_ckpt)
    n_layers = model.config.text_config.num_hidden_layers
    assert compile_blocks(model) == n_layers + model.config.vision_config.num_hidden_layers
    with pytest.raises(RecipeError, match="compile is true or false"):
        tiny_recipe(dense_ckpt, synth_data, tmp_path / "x", stages, compile="yes")


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


def test_the_teacher_reads_its_own_prompt_and_the_students_answers(visor_ckpt_synth, dense_ckpt,
                                                                   synth_data):
    """`teacher_batch` of a VISOR batch == the dense checkpoint's own encoding of the samples
    (the routing tokens gone), and its answer tokens are the student's, in the same order."""
    from visor_vllm.training.data import teacher_batch, with_layout

    records = load_records(synth_data / "train.jsonl")[:6]
    visor_enc, dense_enc = SampleEncoder(visor_ckpt_synth), SampleEncoder(dense_ckpt)
    pad = visor_enc.tokenizer.pad_token_id
    batch = collate([visor_enc.encode(r, synth_data) for r in records], pad)
    model = load_model("stage2", visor_ckpt_synth)
    route = model.config.routing_token_id
    assert (batch.input_ids == route).any()
    teach = teacher_batch(batch, route, pad)
    own = collate([dense_enc.encode(r, synth_data) for r in records], pad)
    assert torch.equal(teach.input_ids, own.input_ids) and torch.equal(teach.labels, own.labels)
    assert torch.equal(teach.attention_mask, own.attention_mask)
    lay = with_layout(batch, model.config).layout
    assert torch.equal(teach.answers.target, lay.answers.target)


def test_a_distilling_stage_trains_the_student_only(tmp_path, visor_ckpt_synth, dense_ckpt,
                                                    synth_data):
    """stage 2 with ``distill``: the loss adds the KL to the dense teacher's answers; the
    teacher is neither trained nor saved; distill without a teacher is a named error."""
    from visor_vllm.training.data import teacher_batch
    from visor_vllm.training.model import (TrainingError, answer_logits, dense_hidden,
                                           distill_loss, visor_hidden)
    from visor_vllm.training.recipe import RecipeError, StageSpec

    model = load_model("stage2", visor_ckpt_synth)
    teacher = load_model("dense", dense_ckpt)
    enc = SampleEncoder(visor_ckpt_synth)
    pad = enc.tokenizer.pad_token_id
    ds = EncodedDataset(load_records(synth_data / "train.jsonl"), enc, synth_data)
    batch = collate([ds[i] for i in range(4)], pad)
    batch.teacher = teacher_batch(batch, model.config.routing_token_id, pad)
    with torch.no_grad():
        plain, n = VisorTrainStep(model)(batch, [0, 2])
        both, n2 = VisorTrainStep(model, teacher=teacher, distill=0.5)(batch, [0, 2])
        t_hidden, _ = dense_hidden(teacher, batch.teacher)
        t_logits = answer_logits(t_hidden, batch.teacher.answers, teacher.lm_head.weight)
        hidden, lay = visor_hidden(model, batch, [0, 2])
        kl = distill_loss(answer_logits(hidden, lay.answers, model.language_model.lm_head.weight),
                          t_logits)
    assert n == n2 and float(kl) > 0
    torch.testing.assert_close(both, plain + 0.5 * kl)
    assert float(distill_loss(t_logits, t_logits)) == pytest.approx(0.0, abs=1e-4)
    # KL(teacher || student) = sum_k p_t(k) (log p_t(k) - log p_s(k)), by hand: not reversed
    s_, t_ = torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    p_t, p_s = t_.softmax(-1), s_.softmax(-1)
    assert float(distill_loss(s_, t_)) == pytest.approx(float((p_t * (p_t / p_s).log()).sum()))
    assert float(distill_loss(t_, s_)) != pytest.approx(float(distill_loss(s_, t_)))
    with pytest.raises(TrainingError, match="go together"):
        VisorTrainStep(model, distill=0.5)
    with pytest.raises(RecipeError, match="go together"):
        StageSpec(kind="stage2", steps=1, lr=1e-3, distill=0.5)
    with pytest.raises(RecipeError, match="VISOR stage option"):
        StageSpec(kind="dense", steps=1, lr=1e-3, distill=0.5, teacher=str(dense_ckpt))
    before = _weights(dense_ckpt)
    recipe = tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "run",
                         [{"kind": "stage2", "steps": 2, "lr": 1e-3, "batch_size": 4,
                           "configs": "viable", "distill": 0.5, "teacher": str(dense_ckpt)}])
    out = run(recipe, progress=False)
    saved = _weights(out)
    assert set(saved) == set(_weights(visor_ckpt_synth))  # the student's tensors, no teacher's
    after = _weights(dense_ckpt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same first step without the teacher: its loss lacks the KL term (> 0)
    plain = tiny_recipe(visor_ckpt_synth, synth_data, tmp_path / "plain",
                        [{"kind": "stage2", "steps": 1, "lr": 1e-3, "batch_size": 4,
                          "configs": "viable"}])
    run(plain, progress=False)
    first = [_curve(tmp_path / d / "stage2")[0] for d in ("run", "plain")]
    assert first[0][2] == first[1][2] and first[0][1] > first[1][1] + 1e-3, first
