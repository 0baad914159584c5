"""The batched trainer forward == the reference model, per sample and configuration (fp32)."""

import pytest
import torch

from visor_vllm.model.batch_layout import AnswerIndex
from visor_vllm.model.reference import VisorForConditionalGeneration
from visor_vllm.testing import random_tiny_model
from visor_vllm.training.data import IGNORE, Encoded, collate
from visor_vllm.training.model import (TrainingError, VisorTrainStep, answer_loss, answer_stats,
                                       set_trainable, visor_hidden)

ROUTE, IMAGE, IM_START, IM_END = 151648, 151646, 151644, 151645


@pytest.fixture(scope="module")
def model():
    return random_tiny_model()


def _n_image_tokens(model, size):
    pix = torch.zeros(1, 40, 3, 32, 32)
    return sum(x.shape[0] for x in model.embed_images(pix, torch.tensor([size])))


def _sample(model, g, size, n_q, with_image=True, marks=(IM_START, IM_END)):
    """ChatML-shaped ids with one image (anyres) of ``size`` and a question of ``n_q`` tokens;
    the routing and image ids are ``model``'s, ``marks`` the turn's start and end ids (a
    compact vocabulary has no 151644)."""
    start, end = marks
    route, image = model.config.routing_token_id, model.config.image_token_id
    question = torch.randint(5, 900, (n_q,), generator=g).tolist()
    head = [start, 5, 6]
    body = question + [route, end, start, 10, 11, 12, end]
    if not with_image:
        ids = head + body
        return Encoded(torch.tensor(ids), torch.tensor(ids), None, None)
    n = _n_image_tokens(model, size)
    ids = head + [image] * n + body
    crops = model.crops_per_image(torch.tensor([size]))[0]
    pix = torch.zeros(1, 10, 3, 32, 32)
    pix[0, :crops] = torch.randn(crops, 3, 32, 32, generator=g)
    labels = [IGNORE] * (len(ids) - 4) + ids[-4:]
    return Encoded(torch.tensor(ids), torch.tensor(labels), pix, torch.tensor([size]))


@pytest.fixture(scope="module")
def samples(model):
    g = torch.Generator().manual_seed(3)
    return [_sample(model, g, (50, 70), 5), _sample(model, g, (32, 32), 11),
            _sample(model, g, (90, 40), 2), _sample(model, g, None, 7, with_image=False)]


@pytest.mark.parametrize("config", [[0], [0, 3], [0, 5], [0, 3, 5]])
def test_batched_logits_equal_reference_per_sample(model, samples, config):
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        hidden, lay = visor_hidden(model, batch, config)
        labels = lay.text_labels
        logits = model.language_model.lm_head(hidden)
    for b, s in enumerate(samples):
        ref = model(s.input_ids, s.pixel_values, s.image_sizes, sa_layers=config).logits
        got = logits[b, :ref.shape[0]]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        text = s.input_ids != IMAGE
        assert torch.equal(labels[b, :ref.shape[0]], s.labels[text])


def test_configurations_change_the_batched_output(model, samples):
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        a, _ = visor_hidden(model, batch, [0])
        b, _ = visor_hidden(model, batch, [0, 3, 5])
    assert not torch.allclose(a[0], b[0], atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients(model, samples):
    batch = collate(samples, pad_id=0)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        loss, n = VisorTrainStep(model, gradient_checkpointing=ckpt)(batch, [0, 3])
        (loss / n).backward()
        grads.append(model.language_model.model.layers[1].cross_attn.q_proj.weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])


def test_answer_stats_is_greedy_exact_match():
    lm_head = torch.nn.Identity()
    # vocab 4; sample 0 predicts its answer, sample 1 gets its 2nd answer token wrong
    hidden = torch.full((2, 4, 4), -5.0)
    labels = torch.full((2, 4), IGNORE)
    labels[:, 2:] = torch.tensor([[1, 2], [1, 2]])
    hidden[0, 1, 1] = hidden[0, 2, 2] = 5
    hidden[1, 1, 1] = hidden[1, 2, 3] = 5
    ok, loss, n, prefix = answer_stats(hidden, labels, lm_head)
    assert ok.tolist() == [True, False] and n.tolist() == [2, 2] and prefix.tolist() == [2, 1]
    total, count = answer_loss(hidden, AnswerIndex.from_labels(labels), torch.eye(4))
    torch.testing.assert_close(total, loss.sum())
    assert count == 4


def test_stage1_changes_only_new_modules_and_the_routing_row(samples):
    model = random_tiny_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = VisorTrainStep(model, "stage1")
    names = step.trainable
    assert names and all(".cross_attn." in n or "embed_tokens" in n for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    batch = collate(samples, pad_id=0)
    loss, n = step(batch, [0, 3, 5])
    (loss / n).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    changed.discard("language_model.lm_head.weight")  # tied: the embedding, checked below
    assert model.config.tie_word_embeddings
    assert changed and all(".cross_attn." in k or "embed_tokens" in k for k in changed)
    emb0, emb1 = before["language_model.model.embed_tokens.weight"], after[
        "language_model.model.embed_tokens.weight"]
    rows = (emb0 != emb1).any(1).nonzero().flatten().tolist()
    assert rows == [model.config.routing_token_id]


def test_stage1_with_the_language_model_trains_what_stage2_trains(samples):
    """``train_language_model``: the SA layers, MLPs and every embedding row move in stage 1."""
    model = random_tiny_model(seed=1)
    stage2 = set_trainable(model, "stage2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = VisorTrainStep(model, "stage1", train_language_model=True)
    assert step.trainable == stage2 and step.trainable_rows == ()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    loss, n = step(collate(samples, pad_id=0), [0, 3, 5])
    (loss / n).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(".self_attn." in k for k in changed) and any(".mlp." in k for k in changed)
    assert not any(k.startswith(("vision_tower.", "router.")) for k in changed)
    emb0, emb1 = before["language_model.model.embed_tokens.weight"], model.state_dict()[
        "language_model.model.embed_tokens.weight"]
    assert len((emb0 != emb1).any(1).nonzero()) > 1
    with pytest.raises(TrainingError, match="stage1 option"):
        set_trainable(model, "stage2", train_language_model=True)


def test_stage2_freezes_vision_tower_and_router():
    model = random_tiny_model(seed=1)
    names = set_trainable(model, "stage2")
    assert not any(n.startswith(("vision_tower.", "router.")) for n in names)
    assert any(".cross_attn." in n for n in names) and any(".mlp." in n for n in names)
    assert isinstance(model, VisorForConditionalGeneration)


def _two_image_sample(model, g, n_q):
    """Two images in one prompt: base crop + newline each (LLaVA-OV's multi-image rule)."""
    sizes = torch.tensor([[50, 70], [32, 32]])
    pix = torch.zeros(2, 10, 3, 32, 32)
    pix[:, 0] = torch.randn(2, 3, 32, 32, generator=g)
    n = [x.shape[0] for x in model.embed_images(pix, sizes)]
    question = torch.randint(5, 900, (n_q,), generator=g).tolist()
    ids = [IM_START, 5] + [IMAGE] * n[0] + [7] + [IMAGE] * n[1] + question + [ROUTE, IM_END,
                                                                            IM_START, 10, 11, IM_END]
    labels = [IGNORE] * (len(ids) - 3) + ids[-3:]
    return Encoded(torch.tensor(ids), torch.tensor(labels), pix, sizes)


@pytest.mark.parametrize("kind", ["same image size", "two images in a prompt", "interleaved"])
def test_batched_layouts_without_a_key_mask_and_with_several_images(model, kind):
    """Equal vision lengths: CA runs without a mask (the fused kernels' case); several images in
    one prompt: one conv segment each; sizes interleaved: packed by group, put back in order.
    All equal the reference per sample."""
    g = torch.Generator().manual_seed(5)
    if kind == "same image size":
        samples = [_sample(model, g, (50, 70), n) for n in (3, 9, 1)]
    elif kind == "interleaved":
        samples = [_sample(model, g, s, 4) for s in ((50, 70), (90, 40), (50, 70), (90, 40))]
        samples.insert(1, _two_image_sample(model, g, 3))
    else:
        samples = [_two_image_sample(model, g, 4), _sample(model, g, (90, 40), 6)]
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        hidden, lay = visor_hidden(model, batch, [0, 3])
        logits = model.language_model.lm_head(hidden)
    assert (lay.v_key_mask is None) == (kind == "same image size")
    assert (lay.vis_order is not None) == (kind == "interleaved")
    assert len(lay.pack_groups) == {"same image size": 1, "two images in a prompt": 2,
                                    "interleaved": 3}[kind]
    for b, s in enumerate(samples):
        ref = model(s.input_ids, s.pixel_values, s.image_sizes, sa_layers=[0, 3]).logits
        torch.testing.assert_close(logits[b, :ref.shape[0]], ref, atol=2e-5, rtol=1e-4)


def test_placeholders_that_do_not_match_the_images_are_a_named_error(model, samples):
    from visor_vllm.model.plan import ImageTokenMismatchError

    s = samples[0]
    short = Encoded(s.input_ids[1:], s.labels[1:], s.pixel_values, s.image_sizes)
    short.input_ids[2] = 5  # one image placeholder fewer
    with pytest.raises(ImageTokenMismatchError, match="image tokens per sample"):
        visor_hidden(model, collate([short], pad_id=0), [0])


@pytest.mark.parametrize("stage,tower", [("stage1", False), ("stage2", False), ("stage2", True)])
def test_a_text_only_batch_gives_every_trainable_parameter_a_gradient(stage, tower):
    """DDP and FSDP2 need the same gradients on every rank: a rank whose micro-batch has no image
    must still give CA, the projector (and a trained tower) zero gradients, not none."""
    model = random_tiny_model(seed=2)
    g = torch.Generator().manual_seed(5)
    step = VisorTrainStep(model, stage, train_vision_tower=tower)
    batch = collate([_sample(model, g, None, 6, with_image=False)], pad_id=0)
    loss, n = step(batch, [0, 3, 5])
    (loss / n).backward()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert any(".cross_attn." in k for k in trainable)
    assert (not tower) or any(k.startswith("vision_tower.") for k in trainable)
    missing = [k for k, p in trainable.items() if p.grad is None]
    assert not missing, missing
    assert all(not p.grad.any() for k, p in trainable.items() if ".cross_attn." in k)
    with torch.no_grad():  # the touch is exactly zero: the output is the plain text forward's
        h, _ = visor_hidden(model, batch, [0, 3, 5])
    h2, _ = visor_hidden(model, batch, [0, 3, 5])
    torch.testing.assert_close(h, h2.detach(), atol=0, rtol=0)


def test_rope_frequencies_stay_fp32_through_casts():
    """DeepSpeed's bf16 casts the module; RoPE's frequencies must not be rounded with it."""
    model = random_tiny_model(seed=2)
    fp32 = model.inv_freq.clone()
    model.bfloat16()
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, fp32)
    assert model.language_model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_text_only_batch_gives_the_dense_models_parameters_gradients(dense_ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.training.model import DenseTrainStep

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(dense_ckpt)
    step = DenseTrainStep(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 900, (12,), generator=g).tolist()  # text only (compact vocabulary)
    batch = collate([Encoded(torch.tensor(ids), torch.tensor(ids), None, None)], pad_id=0)
    loss, n = step(batch)
    (loss / n).backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_the_late_ca_schedule_batched_equals_reference_and_routes_at_layer_0(dense_ckpt,
                                                                              tmp_path):
    """``synthetic-late-ca`` (the router after layer 0, four optional SA layers in a row): the
    trainer's batched forward equals the reference per sample, and the reference's own routed
    forward picks one of its configurations at layer 0."""
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.training.trainer import load_model

    ckpt = convert(dense_ckpt, tmp_path / "late", preset="synthetic-late-ca", init="random",
                   progress=False)
    m = load_model("stage2", ckpt).eval()
    assert m.config.router_layer == 0
    g = torch.Generator().manual_seed(5)
    samples = [_sample(m, g, (32, 32), q, marks=(1, 2)) for q in (3, 8)]  # a 1,024-token vocab
    batch = collate(samples, pad_id=0)
    for config in ([0], [0, 1], [0, 2, 4], [0, 1, 2, 3, 4]):
        with torch.no_grad():
            hidden, _ = visor_hidden(m, batch, config)
            logits = m.language_model.lm_head(hidden)
        for b, s in enumerate(samples):
            ref = m(s.input_ids, s.pixel_values, s.image_sizes, sa_layers=config).logits
            torch.testing.assert_close(logits[b, :ref.shape[0]], ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        routed = m(samples[0].input_ids, samples[0].pixel_values, samples[0].image_sizes)
        again = m(samples[0].input_ids, samples[0].pixel_values, samples[0].image_sizes,
                  sa_layers=list(routed.sa_layers))
    assert routed.router_logits is not None and list(routed.sa_layers) in m.config.sa_configs
    torch.testing.assert_close(routed.logits, again.logits)  # the router ran after layer 0
