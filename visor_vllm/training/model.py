"""The trainable, batched VISOR forward, the answer loss, and what each stage trains.

What.
* `visor_hidden` runs a padded batch (`visor_vllm.training.data.Batch`) of prompts with
  different image and text lengths through a `VisorForConditionalGeneration` (the reference
  model's modules and parameter names, so a trained model *is* a reference/vLLM checkpoint)
  under one SA configuration (Once-for-All samples one per optimisation step). Returns the
  final-norm text hidden states ``[B, Tm, d]`` and the batch's `BatchLayout`. Each decoder
  layer is one module call (`DecoderLayer.forward` = `visor_vllm.model.layers.visor_layer`), so
  FSDP2 units and activation checkpointing wrap whole layers. `visor_hidden_configs` is its
  no-gradient form for several configurations at once (evaluation), sharing what they share.
* `answer_loss` / `answer_stats` -- cross-entropy and greedy exact match on the answer tokens
  only, computing the LM head only at those positions (a 151,936-row head over every position
  would dominate a tiny model's step); shared by VISOR and the dense LLaVA-OV (`dense_hidden`).
* `set_trainable` -- what a stage unfreezes (paper Sec. 5.1): stage 1 the new modules
  (cross-attention, its conv and norms) and the routing token's embedding row, stage 2
  everything but the vision tower (optional) and the router (trained on its own, issue 10).
  ``train_language_model`` (not the paper's) makes stage 1 train what stage 2 trains, on
  stage 1's one configuration: the SA layers can then adapt to visual tokens that skip the
  layers that became cross-attention.
* `VisorTrainStep` / `DenseTrainStep` -- ``nn.Module`` wrappers whose ``forward(batch, ...)``
  returns ``(loss_sum, n_tokens)``, so DDP / FSDP2 / DeepSpeed see one module call per step;
  they apply `set_trainable` for their stage themselves.

The layout (flat vision, padded text, gathered ``[V;T]`` rows; no dense ``[N, N]`` mask) is
`visor_vllm.model.batch_layout`; the trainer builds it in the collate, so a step reads nothing
back from the device (`tests/training/test_host_sync.py`).

Footguns.
* Equivalence with the reference is per sample and exact in fp32 up to SDPA rounding
  (`tests/training/test_model.py`); if you change the layout, that test is the spec.
* Stage 1 trains one row of the (tied) embedding matrix by stopping the gradient everywhere
  else *in the forward*: the embedding output of every other token and the LM head read a
  detached weight. No gradient hook, no mask tensor bound to a device: it holds under DDP, FSDP2
  (whose sharded gradients never pass a parameter hook) and DeepSpeed alike. With AdamW and no
  weight decay a zero gradient leaves a row exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visor_vllm.model import layers
from visor_vllm.model.batch_layout import IGNORE, AnswerIndex, BatchLayout, build_layout
from visor_vllm.model.packing import pack_same_size
from visor_vllm.model.plan import ImageTokenMismatchError
from visor_vllm.model.reference import VisorForConditionalGeneration
from visor_vllm.training.data import Batch

STAGES = ("dense", "stage1", "stage2")


class TrainingError(ValueError):
    """A training request that cannot run (unknown stage, configuration not viable, ...)."""


# ---------------------------------------------------------------------------------------------
# The batched forward
# ---------------------------------------------------------------------------------------------

def layout_of(model: VisorForConditionalGeneration, batch: Batch) -> BatchLayout:
    """The batch's layout on the model's device: the collate's, or built now on the host."""
    lay = batch.layout
    if lay is None:
        lay = build_layout(model.config, batch.input_ids, batch.attention_mask, batch.labels,
                           batch.images_per_sample, batch.image_sizes, batch.pixel_values)
    device = model.inv_freq.device
    return lay if lay.device == device else lay.to(device)


def encode_images(model: VisorForConditionalGeneration, lay: BatchLayout) -> torch.Tensor | None:
    """Every image of the batch -> flat packed features ``[Sv, d]`` (None without images).

    One tower call for every crop, then LLaVA-OV's packing once per group of images that pack
    alike (`visor_vllm.model.packing.pack_same_size`), not once per image.
    """
    if lay.crops is None:
        return None
    enc, side = model.encode_crops(lay.crops)                    # [n_crops, side*side, d]
    packed = []
    for g in lay.pack_groups:
        feats = enc.index_select(0, g.crop_index).view(g.images, g.crops, *enc.shape[1:])
        packed.append(pack_same_size(model.config, feats, g.size, model.image_newline)
                      .flatten(0, 1))
    vis = torch.cat(packed) if len(packed) > 1 else packed[0]
    if vis.shape[0] != lay.sv:
        raise ImageTokenMismatchError(f"the images give {vis.shape[0]} features, the layout "
                                      f"expects {lay.sv}")
    return vis if lay.vis_order is None else vis.index_select(0, lay.vis_order)


def _touch_vision(model: VisorForConditionalGeneration, t: torch.Tensor) -> torch.Tensor:
    """``0`` that depends on every vision-side parameter (tower if trained, projector,
    ``image_newline``) through one blank crop: a batch without images then gives them zero
    gradients, as DDP and FSDP2 need on every rank (`visor_vllm.model.layers.zero_touch`).
    The tower runs as a module call, so its FSDP2 units gather their shards as usual."""
    S = model.config.vision_config.image_size
    enc, _ = model.encode_crops(t.new_zeros(1, 3, S, S))           # [1, side*side, d]
    return (enc.sum() + model.image_newline.sum()) * 0.0


def _sa_set(cfg, sa_layers) -> set[int]:
    sa = set(sa_layers)
    bad = sa - set(cfg.sa_capable_layers)
    if bad:
        raise TrainingError(f"layers {sorted(bad)} are not SA-capable ({cfg.sa_capable_layers})")
    return sa


def _start(model: VisorForConditionalGeneration, batch: Batch):
    """``(decoder, layout, vision [Sv, d] or None, text embeddings [B, Tm, d])``: what every
    configuration starts from."""
    lm = model.language_model.model
    lay = layout_of(model, batch)
    return lm, lay, encode_images(model, lay), lm.embed_tokens(lay.text_ids)


def visor_hidden(model: VisorForConditionalGeneration, batch: Batch, sa_layers,
                 gradient_checkpointing: bool = False, upto_layer: int | None = None,
                 trainable_rows: tuple[int, ...] = ()):
    """``(hidden [B, Tm, d], layout)`` under SA layers ``sa_layers``.

    ``upto_layer``: stop after that layer and return its *output* (no final norm) -- the
    router's input (`visor_vllm.training.router`). ``trainable_rows``: embedding rows that get
    a gradient; every other token's embedding is detached (stage 1, see the footguns).
    """
    sa = _sa_set(model.config, sa_layers)
    lm, lay, vis, t = _start(model, batch)
    if trainable_rows:
        keep = lay.text_ids == trainable_rows[0]
        for r in trainable_rows[1:]:
            keep = keep | (lay.text_ids == r)
        t = torch.where(keep[..., None], t, t.detach())
    if vis is None:
        vis = t.new_zeros(0, t.shape[-1])
        if torch.is_grad_enabled():
            t = t + _touch_vision(model, t)
    rope = layers.rope_tables(model.inv_freq, lay, t.dtype)
    for i, layer in enumerate(lm.layers):
        run_sa = i in sa
        if gradient_checkpointing and torch.is_grad_enabled():
            t, vis = checkpoint(layer, t, vis, lay, run_sa, rope, use_reentrant=False)
        else:
            t, vis = layer(t, vis, lay, run_sa, rope)
        if i == upto_layer:
            return t, lay
    return lm.norm(t), lay


@torch.no_grad()
def visor_hidden_configs(model: VisorForConditionalGeneration, batch: Batch, configs):
    """Yields ``(hidden [B, Tm, d], layout)``, `visor_hidden` under each of ``configs`` in
    order, no gradients: the layout, the vision tower and the layers on which every
    configuration agrees (the always-on SA layers before the first optional one) run once for
    all of them; one configuration's hidden states live at a time. Evaluation's forward
    (`visor_vllm.training.evaluate.score_configs`); equal to one `visor_hidden` per
    configuration (tested)."""
    sas = [_sa_set(model.config, c) for c in configs]
    lm, lay, vis, t = _start(model, batch)
    if vis is None:
        vis = t.new_zeros(0, t.shape[-1])
    rope = layers.rope_tables(model.inv_freq, lay, t.dtype)
    shared = 0  # layers [0, shared) run alike under every configuration
    while shared < len(lm.layers) and len({shared in sa for sa in sas}) == 1:
        t, vis = lm.layers[shared](t, vis, lay, shared in sas[0], rope)
        shared += 1
    for sa in sas:
        tc, vc = t, vis
        for i in range(shared, len(lm.layers)):
            tc, vc = lm.layers[i](tc, vc, lay, i in sa, rope)
        yield lm.norm(tc), lay


def dense_hidden(model, batch: Batch):
    """transformers' `LlavaOnevisionForConditionalGeneration`: final hidden states, full labels."""
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                      batch_num_images=torch.tensor(batch.images_per_sample),
                      use_cache=False)  # a cache makes compiled blocks recompile per layer
    hidden = out.last_hidden_state
    if batch.pixel_values is None and torch.is_grad_enabled():  # see `_touch_vision`
        m = model.model
        S = m.config.vision_config.image_size
        blank = hidden.new_zeros(1, 3, S, S, dtype=m.multi_modal_projector.linear_1.weight.dtype)
        feats = m.vision_tower(blank, output_hidden_states=True).hidden_states[-1]
        hidden = hidden + (m.multi_modal_projector(feats).sum() + m.image_newline.sum()) * 0.0
    return hidden, batch.labels


# ---------------------------------------------------------------------------------------------
# Loss and accuracy on answer tokens only
# ---------------------------------------------------------------------------------------------

def answer_logits(hidden: torch.Tensor, answers: AnswerIndex, head_weight: torch.Tensor):
    """fp32 logits ``[K, V]`` at the K positions that predict ``answers``' tokens.

    ``hidden [B, T, d]``; ``answers`` from the same rows; ``head_weight [V, d]`` (bias-free head).
    """
    h = hidden.flatten(0, 1).index_select(0, answers.pos)        # [K, d]
    return F.linear(h, head_weight).float()                       # [K, V]


def answer_loss(hidden: torch.Tensor, answers: AnswerIndex, head_weight: torch.Tensor):
    """``(sum of token cross-entropies, number of answer tokens)`` (transformers' shift)."""
    logits = answer_logits(hidden, answers, head_weight)          # [K, V]
    return F.cross_entropy(logits, answers.target, reduction="sum"), answers.count


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``sum over the K answer tokens of KL(teacher || student)`` (temperature 1); both
    ``[K, V]`` logits of the same tokens in the same order."""
    if student.shape != teacher.shape:
        raise TrainingError(f"teacher and student disagree on the answer tokens: "
                            f"{tuple(teacher.shape)} vs {tuple(student.shape)}")
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="sum")


def _answer_logits(hidden, labels, lm_head):
    """Logits ``[K, V]`` at the K positions that predict an answer token, and those targets."""
    target = labels[:, 1:]
    where = target != IGNORE                                      # [B, T-1]
    logits = lm_head(hidden[:, :-1][where]).float()               # [K, V]
    return logits, target[where], where


@torch.no_grad()
def answer_stats(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module):
    """Per sample: ``(exact match, loss sum, answer tokens, right tokens before the first wrong)``.

    Teacher-forced argmax == target at every answer token is exactly "greedy decoding
    reproduces the answer" (each greedy step sees the correct prefix iff all earlier ones were
    right), so this is the served model's greedy exact match, computed in one pass; the last
    value is Appendix D's oracle score.
    """
    logits, target, where = _answer_logits(hidden, labels, lm_head)
    row = where.nonzero()[:, 0]                                   # [K] sample of each token
    B = labels.shape[0]
    hit = logits.argmax(-1) == target                             # [K]
    wrong = torch.zeros(B, dtype=torch.long, device=labels.device).index_add_(
        0, row, (~hit).long())
    loss = torch.zeros(B, device=labels.device).index_add_(
        0, row, F.cross_entropy(logits, target, reduction="none"))
    n = where.sum(1)
    first = torch.cumsum(n, 0) - n                                # index of each row's 1st token
    grid = torch.zeros(B, int(n.max()) if B else 0, device=labels.device)
    grid[row, torch.arange(row.numel(), device=labels.device) - first[row]] = hit.float()
    prefix = grid.cumprod(1).sum(1).long()
    return (wrong == 0) & (n > 0), loss, n, prefix


class VisorTrainStep(nn.Module):
    """``forward(batch, sa_layers) -> (loss_sum, n_tokens)``; ``.model`` is the VISOR model.

    Applies `set_trainable` for ``stage`` (stage 1: the routing token's row is the only
    embedding row with a gradient, see the footguns).

    ``teacher`` (a frozen dense LLaVA-OV) and ``distill`` > 0: the loss adds ``distill`` x
    `distill_loss` against the teacher's answer logits on ``batch.teacher`` (the same samples
    without the routing token, `visor_vllm.training.data.teacher_batch`). The teacher is kept
    out of this module's parameters and state (an engine wraps, shards and saves the student
    only); the caller puts it on the device. Footgun: the teacher's forward is transformers'
    LLaVA-OV, which reads the device back (25 host reads a step on the tiny model, measured
    with ``VISOR_CHECK_HOST_SYNC=count``; the student's own step has none), so a distilling
    step is not host-sync free and ``VISOR_CHECK_HOST_SYNC=raise`` fails it.
    """

    def __init__(self, model: VisorForConditionalGeneration, stage: str = "stage2",
                 train_vision_tower: bool = False, gradient_checkpointing: bool = False,
                 train_language_model: bool = False, teacher: nn.Module | None = None,
                 distill: float = 0.0):
        super().__init__()
        if stage not in ("stage1", "stage2"):
            raise TrainingError(f"VISOR trains stage1 or stage2, not {stage!r}")
        if bool(distill) != (teacher is not None):
            raise TrainingError("distill > 0 and a teacher go together")
        self.model, self.stage = model, stage
        self.gradient_checkpointing = gradient_checkpointing
        self.trainable = set_trainable(model, stage, train_vision_tower, train_language_model)
        new_only = stage == "stage1" and not train_language_model
        self.trainable_rows = (model.config.routing_token_id,) if new_only else ()
        self.distill = distill
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained or saved
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def forward(self, batch: Batch, sa_layers):
        hidden, lay = visor_hidden(self.model, batch, sa_layers, self.gradient_checkpointing,
                                   trainable_rows=self.trainable_rows)
        head = self.model.language_model.lm_head.weight
        if self.trainable_rows:
            head = head.detach()
        if self.teacher is None:
            return answer_loss(hidden, lay.answers, head)
        logits = answer_logits(hidden, lay.answers, head)                        # [K, V]
        loss = F.cross_entropy(logits, lay.answers.target, reduction="sum")     # answer_loss's
        return loss + self.distill * distill_loss(logits, self._teacher_logits(batch)), \
            lay.answers.count

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The frozen teacher's fp32 logits ``[K, V]`` on ``batch.teacher``'s answer tokens."""
        tb = batch.teacher
        if tb is None:
            raise TrainingError("a distilling stage needs batch.teacher (data.teacher_batch)")
        device = self.teacher.lm_head.weight.device
        if tb.input_ids.device != device:
            tb = tb.to(device)
        hidden, _ = dense_hidden(self.teacher, tb)
        return answer_logits(hidden, tb.answers, self.teacher.lm_head.weight)


class DenseTrainStep(nn.Module):
    """The same for transformers' LLaVA-OneVision (the accuracy anchor)."""

    def __init__(self, model, train_vision_tower: bool = False,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.stage = "dense"
        self.trainable = set_trainable(model, "dense", train_vision_tower)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})

    def forward(self, batch: Batch, sa_layers=None):
        hidden, labels = dense_hidden(self.model, batch)
        answers = batch.answers if batch.answers is not None else AnswerIndex.from_labels(labels)
        if answers.pos.device != hidden.device:
            answers = answers.to(hidden.device)
        return answer_loss(hidden, answers, self.model.lm_head.weight)


# ---------------------------------------------------------------------------------------------
# What a stage trains
# ---------------------------------------------------------------------------------------------

def _unused_in_tower(name: str) -> bool:
    """SigLIP's post-layernorm and pooling head: LLaVA-OV reads the last layer's hidden states
    before them, so they never reach the loss (and an unused trainable parameter fails DDP)."""
    return ".post_layernorm." in name or ".head." in name


def set_trainable(model: nn.Module, stage: str, train_vision_tower: bool = False,
                  train_language_model: bool = False) -> list[str]:
    """Freeze/unfreeze for ``stage``; returns the trainable parameter names.

    Stage 1 marks ``cross_attn.*`` and the (tied) embedding matrix trainable; `VisorTrainStep`
    lets only the routing token's row of the embedding receive a gradient. Stage 1 with
    ``train_language_model`` marks what stage 2 marks (a stage-1 option only: stage 2 and
    dense always train the language model).
    """
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    if train_language_model and stage != "stage1":
        raise TrainingError(f"train_language_model is a stage1 option; {stage} always trains "
                            "the language model")
    names = []
    for name, p in model.named_parameters():
        if stage == "stage1" and not train_language_model:
            on = ".cross_attn." in name or name == "language_model.model.embed_tokens.weight"
        else:
            on = not name.startswith("router.")
            tower = name.startswith(("vision_tower.", "model.vision_tower."))
            if tower and (not train_vision_tower or _unused_in_tower(name)):
                on = False
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names
