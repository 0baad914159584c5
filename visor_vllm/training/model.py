"""The trainable, batched VISOR forward, the answer loss, and what each stage trains.

What.
* `visor_hidden` runs a padded batch (`visor_vllm.training.data.Batch`) of prompts with
  different image and text lengths through a `VisorForConditionalGeneration` (the reference
  model's modules and parameter names, so a trained model *is* a reference/vLLM checkpoint)
  under one SA configuration (Once-for-All samples one per optimisation step). Returns the
  final-norm text hidden states ``[B, Nt_max, d]`` and the text labels.
* `answer_loss` / `answer_stats` -- cross-entropy and greedy exact match on the answer tokens
  only, computing ``lm_head`` only at those positions (a 151,936-row head over every position
  would dominate a tiny model's step); shared by VISOR and the dense LLaVA-OV (`dense_hidden`).
* `set_trainable` -- what a stage unfreezes (paper Sec. 5.1): stage 1 the new modules
  (cross-attention, its conv and norms, the routing token's embedding row), stage 2 everything
  but the vision tower (optional) and the router (trained on its own, issue 10).
* `VisorTrainStep` / `DenseTrainStep` -- ``nn.Module`` wrappers whose ``forward(batch, ...)``
  returns ``(loss_sum, n_tokens)``, so DDP / FSDP / DeepSpeed see one module call per step.

Layout (all per configuration, no dense ``[N, N]`` mask anywhere):
* vision lives flat, ``[sum Nv, d]`` (images of all samples concatenated); the CA conv runs on
  it with one segment per image, so it never crosses an image or sample border;
* text lives right-padded, ``[B, Nt_max, d]``; text-only layers use SDPA with ``is_causal``
  (right padding is harmless under a causal mask: real queries never see later pads);
* an SA layer gathers each sample's ``[V_b; T_b]`` into a right-padded ``[B, Nj_max, d]``
  (one index_select), runs causal SDPA, and scatters back;
* CA attends text queries to padded vision keys with a ``[B, 1, 1, Nv_max]`` key mask.
RoPE positions follow `visor_vllm.model.plan`: vision ``0..Nv_b-1``, text ``Nv_b + j``.

Footguns.
* Equivalence with the reference is per sample and exact in fp32 up to SDPA rounding
  (`tests/training/test_model.py`); if you change the layout, that test is the spec.
* A sample without images has no CA keys: it gets one dummy key and a zero output, because a
  fully masked SDPA row is NaN in forward *and* backward.
* Padded text positions produce finite garbage; every consumer masks them with ``labels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visor_vllm.model import plan
from visor_vllm.model.reference import (ImageTokenMismatchError, VisorForConditionalGeneration,
                                        apply_rope, rope_cos_sin)
from visor_vllm.training.data import IGNORE, Batch

STAGES = ("dense", "stage1", "stage2")


class TrainingError(ValueError):
    """A training request that cannot run (unknown stage, configuration not viable, ...)."""


# ---------------------------------------------------------------------------------------------
# Index bookkeeping for one batch
# ---------------------------------------------------------------------------------------------

class _Layout:
    """Where every token of a padded batch lives in the flat-vision / padded-text layouts."""

    def __init__(self, nv: list[int], nt: list[int], device):
        B = len(nv)
        self.B, self.nv, self.nt = B, nv, nt
        self.sv, self.tm, self.vm = sum(nv), max(nt), max(max(nv), 1)
        self.jm = max(a + b for a, b in zip(nv, nt))
        v_off = [sum(nv[:b]) for b in range(B)]
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        # padded vision [B*Vm] <- flat vision rows (index sv = a zero row)
        v_pad = torch.full((B, self.vm), self.sv, dtype=torch.long, device=device)
        for b in range(B):
            v_pad[b, :nv[b]] = ar(nv[b]) + v_off[b]
        self.v_pad_src = v_pad.flatten()
        self.v_key_mask = ar(self.vm)[None, :] < torch.tensor(nv, device=device)[:, None]
        self.has_vision = torch.tensor([n > 0 for n in nv], device=device)
        self.v_key_mask[:, 0] |= ~self.has_vision  # dummy key for text-only samples
        # joint [B*Jm] <- cat(flat vision [Sv], padded text [B*Tm], zero row)
        zero = self.sv + B * self.tm
        j_src = torch.full((B, self.jm), zero, dtype=torch.long, device=device)
        j_pos = torch.zeros((B, self.jm), dtype=torch.long, device=device)
        v_back = torch.empty(self.sv, dtype=torch.long, device=device)
        t_back = torch.full((B, self.tm), B * self.jm, dtype=torch.long, device=device)
        for b in range(B):
            j_src[b, :nv[b]] = ar(nv[b]) + v_off[b]
            j_src[b, nv[b]:nv[b] + nt[b]] = self.sv + b * self.tm + ar(nt[b])
            j_pos[b, :nv[b] + nt[b]] = ar(nv[b] + nt[b])
            v_back[v_off[b]:v_off[b] + nv[b]] = b * self.jm + ar(nv[b])
            t_back[b, :nt[b]] = b * self.jm + nv[b] + ar(nt[b])
        self.j_src, self.j_pos = j_src.flatten(), j_pos
        self.v_back, self.t_back = v_back, t_back.flatten()
        self.v_pos = torch.cat([ar(n) for n in nv]) if self.sv else ar(0)
        self.t_pos = torch.tensor(nv, device=device)[:, None] + ar(self.tm)[None, :]

    def to_joint(self, vis: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        src = torch.cat([vis, t.reshape(-1, d), t.new_zeros(1, d)])
        return src.index_select(0, self.j_src).view(self.B, self.jm, d)

    def from_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[-1]
        flat = torch.cat([x.reshape(-1, d), x.new_zeros(1, d)])
        return flat.index_select(0, self.v_back), flat.index_select(0, self.t_back).view(
            self.B, self.tm, d)

    def pad_vision(self, vis: torch.Tensor) -> torch.Tensor:
        d = vis.shape[-1]
        return torch.cat([vis, vis.new_zeros(1, d)]).index_select(0, self.v_pad_src).view(
            self.B, self.vm, d)


# ---------------------------------------------------------------------------------------------
# The batched forward
# ---------------------------------------------------------------------------------------------

def _heads(x: torch.Tensor, n: int, dh: int) -> torch.Tensor:
    """[B, N, n*dh] -> [B, n, N, dh]."""
    return x.view(x.shape[0], x.shape[1], n, dh).transpose(1, 2)


def _causal_block(layer, x: torch.Tensor, pos: torch.Tensor, inv_freq) -> torch.Tensor:
    """The ordinary transformer layer on a right-padded batch ``x [B, N, d]``, causal."""
    attn = layer.self_attn
    B, N, _ = x.shape
    h = layer.input_layernorm(x)
    cos, sin = rope_cos_sin(inv_freq, pos.reshape(-1), x.dtype)
    cos, sin = cos.view(B, 1, N, -1), sin.view(B, 1, N, -1)
    q = apply_rope(_heads(attn.q_proj(h), attn.heads, attn.head_dim), cos, sin)
    k = apply_rope(_heads(attn.k_proj(h), attn.kv_heads, attn.head_dim), cos, sin)
    v = _heads(attn.v_proj(h), attn.kv_heads, attn.head_dim)
    rep = attn.heads // attn.kv_heads
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                         v.repeat_interleave(rep, 1), is_causal=True)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(B, N, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _cross(ca, t: torch.Tensor, vis: torch.Tensor, lay: _Layout, image_lens: list[int]):
    """VISOR's cross-attention update for padded text ``t [B, Tm, d]`` (reference semantics)."""
    B = t.shape[0]
    x = ca.vision_norm(vis)
    x = x + plan.segment_depthwise_conv1d(x, image_lens, ca.pos_conv.weight, ca.pos_conv.bias)
    xp = lay.pad_vision(x)                                        # [B, Vm, d]
    k = _heads(ca.k_proj(xp), ca.kv_heads, ca.head_dim)
    v = _heads(ca.v_proj(xp), ca.kv_heads, ca.head_dim)
    q = _heads(ca.q_proj(ca.text_norm(t)), ca.heads, ca.head_dim)
    rep = ca.heads // ca.kv_heads
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                         v.repeat_interleave(rep, 1),
                                         attn_mask=lay.v_key_mask[:, None, None, :])
    out = ca.o_proj(out.transpose(1, 2).reshape(B, t.shape[1], -1))
    return out * lay.has_vision[:, None, None].to(out.dtype)


def split_batch(model: VisorForConditionalGeneration, batch: Batch):
    """Images -> flat vision features; the text tokens (image placeholders removed), padded."""
    cfg = model.config
    ids, labels, mask = batch.input_ids, batch.labels, batch.attention_mask.bool()
    is_image = ids == cfg.image_token_index
    feats, image_lens, nv = [], [], []
    if batch.pixel_values is not None:
        offsets = [sum(batch.images_per_sample[:b]) for b in range(len(batch))]
        crops, sizes = [], []
        for b, n in enumerate(batch.images_per_sample):
            s = batch.image_sizes[offsets[b]:offsets[b] + n]
            sizes.append(s)
            crops.append(model.crops_per_image(s) if n else [])
        pixels = torch.cat([batch.pixel_values[offsets[b] + i, :c]
                            for b in range(len(batch)) for i, c in enumerate(crops[b])])
        enc, side = model.encode_crops(pixels)
        per_image = list(torch.split(enc, [c for cs in crops for c in cs]))
        k = 0
        for b, n in enumerate(batch.images_per_sample):
            packed = model.pack_images(per_image[k:k + n], sizes[b], side) if n else []
            k += n
            feats += packed
            image_lens += [x.shape[0] for x in packed]
            nv.append(sum(x.shape[0] for x in packed))
    else:
        nv = [0] * len(batch)
    text = mask & ~is_image
    nt = text.sum(1).tolist()
    n_img_tokens = (is_image & mask).sum(1).tolist()
    if n_img_tokens != nv:
        raise ImageTokenMismatchError(f"image tokens per sample {n_img_tokens} but the images "
                                      f"give {nv} features")
    tm = max(nt)
    t_ids = torch.full((len(batch), tm), 0, dtype=torch.long, device=ids.device)
    t_labels = torch.full((len(batch), tm), IGNORE, dtype=torch.long, device=ids.device)
    for b in range(len(batch)):
        t_ids[b, :nt[b]] = ids[b][text[b]]
        t_labels[b, :nt[b]] = labels[b][text[b]]
    vis = torch.cat(feats) if feats else None
    return vis, image_lens, nv, nt, t_ids, t_labels


def visor_hidden(model: VisorForConditionalGeneration, batch: Batch, sa_layers,
                 gradient_checkpointing: bool = False, upto_layer: int | None = None):
    """``(hidden [B, Nt_max, d], text_labels [B, Nt_max])`` under SA layers ``sa_layers``.

    ``upto_layer``: stop after that layer and return its *output* (no final norm) and the text
    token ids instead of the labels -- the router's input (`visor_vllm.training.router`).
    """
    cfg = model.config
    sa = set(sa_layers)
    bad = sa - set(cfg.sa_capable_layers)
    if bad:
        raise TrainingError(f"layers {sorted(bad)} are not SA-capable ({cfg.sa_capable_layers})")
    lm = model.language_model.model
    vis, image_lens, nv, nt, t_ids, t_labels = split_batch(model, batch)
    lay = _Layout(nv, nt, t_ids.device)
    t = lm.embed_tokens(t_ids)
    if vis is None:
        vis = t.new_zeros(0, t.shape[-1])

    def run(i, layer, t, vis):
        if layer.kind == "cross" and lay.sv:
            t = t + _cross(layer.cross_attn, t, vis, lay, image_lens)
        if layer.kind == "self" and i in sa and lay.sv:
            x = _causal_block(layer, lay.to_joint(vis, t), lay.j_pos, model.inv_freq)
            vis, t = lay.from_joint(x)
        else:
            t = _causal_block(layer, t, lay.t_pos, model.inv_freq)
        return t, vis

    for i, layer in enumerate(lm.layers):
        if gradient_checkpointing and torch.is_grad_enabled():
            t, vis = checkpoint(run, i, layer, t, vis, use_reentrant=False)
        else:
            t, vis = run(i, layer, t, vis)
        if i == upto_layer:
            return t, t_ids
    return lm.norm(t), t_labels


def dense_hidden(model, batch: Batch):
    """transformers' `LlavaOnevisionForConditionalGeneration`: final hidden states, full labels."""
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                      batch_num_images=torch.tensor(batch.images_per_sample))
    return out.last_hidden_state, batch.labels


# ---------------------------------------------------------------------------------------------
# Loss and accuracy on answer tokens only
# ---------------------------------------------------------------------------------------------

def _answer_logits(hidden, labels, lm_head):
    """Logits ``[K, V]`` at the K positions that predict an answer token, and those targets."""
    target = labels[:, 1:]
    where = target != IGNORE                                      # [B, T-1]
    logits = lm_head(hidden[:, :-1][where]).float()               # [K, V]
    return logits, target[where], where


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module):
    """``(sum of token cross-entropies, number of answer tokens)`` (transformers' shift)."""
    logits, target, _ = _answer_logits(hidden, labels, lm_head)
    return F.cross_entropy(logits, target, reduction="sum"), target.numel()


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
    """``forward(batch, sa_layers) -> (loss_sum, n_tokens)``; ``.model`` is the VISOR model."""

    def __init__(self, model: VisorForConditionalGeneration, gradient_checkpointing: bool = False):
        super().__init__()
        self.model, self.gradient_checkpointing = model, gradient_checkpointing

    def forward(self, batch: Batch, sa_layers):
        hidden, labels = visor_hidden(self.model, batch, sa_layers, self.gradient_checkpointing)
        return answer_loss(hidden, labels, self.model.language_model.lm_head)


class DenseTrainStep(nn.Module):
    """The same for transformers' LLaVA-OneVision (the accuracy anchor)."""

    def __init__(self, model, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        if gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})

    def forward(self, batch: Batch, sa_layers=None):
        hidden, labels = dense_hidden(self.model, batch)
        return answer_loss(hidden, labels, self.model.lm_head)


# ---------------------------------------------------------------------------------------------
# What a stage trains
# ---------------------------------------------------------------------------------------------

def set_trainable(model: nn.Module, stage: str, train_vision_tower: bool = False) -> list[str]:
    """Freeze/unfreeze for ``stage``; returns the trainable parameter names.

    Stage 1 trains ``cross_attn.*`` and the routing token's embedding row only: a gradient hook
    zeroes every other row of the (tied) embedding, so the rest of the vocabulary stays exact.
    """
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    names = []
    for name, p in model.named_parameters():
        if stage == "stage1":
            on = ".cross_attn." in name or name == "language_model.model.embed_tokens.weight"
        else:
            on = not name.startswith("router.")
            if not train_vision_tower and (name.startswith("vision_tower.")
                                           or name.startswith("model.vision_tower.")):
                on = False
        p.requires_grad_(on)
        if on:
            names.append(name)
    if stage == "stage1":
        emb = model.language_model.model.embed_tokens.weight
        row = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        row[model.config.routing_token_id] = 1
        emb.register_hook(lambda g: g * row)
    return names
