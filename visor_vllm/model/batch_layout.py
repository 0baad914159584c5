"""Where every token of a padded batch of VISOR prompts lives: built on the host, once per batch.

What. `BatchLayout` holds everything the batched forward (`visor_vllm.model.layers`, used by the
trainer and offline evaluation) needs to run B prompts with different image and text lengths:

* vision lives flat, ``[Sv, d]``: every image's packed LLaVA-OV features, sample after sample;
  the CA conv runs on it with one segment per image (`conv_gaps`), never across an image;
* text lives right-padded, ``[B, Tm, d]``: image placeholders removed, prompt order kept
  (`text_ids`, `text_labels`);
* an SA layer gathers each sample's ``[V_b; T_b]`` into a right-padded ``[B, Jm, d]``
  (`to_joint`: one index_select) and scatters back (`from_joint`);
* CA reads each sample's vision padded to ``[B, Vm, d]`` (`pad_vision`), with a key mask only
  when the samples' vision lengths differ (`v_key_mask` is None otherwise, so the fused
  attention kernels stay available);
* `answers`: where the answer tokens are predicted, so the LM head runs only there;
* `crops`: the crops the vision tower sees, already selected (anyres tiles for a one-image
  prompt, base crops for several: LLaVA-OV's rule, as `VisorForConditionalGeneration.crops_per_image`).

RoPE positions follow `visor_vllm.model.plan`: vision ``0..Nv_b-1``, text ``Nv_b + j``.

Why on the host. Every size a step needs (Sv, Tm, Vm, Jm, K, per-image token counts) is a Python
int here and every index a tensor built before the step, so the step never reads the device:
no ``.item()``, no boolean-mask indexing, no ``nonzero`` (`visor_vllm.host_sync` checks it).
The trainer builds it in the DataLoader's collate, off the step.

Footguns.
* `build_layout` reads host tensors; given device tensors it copies them to the host first,
  which is a synchronisation (fine for evaluation, wrong inside a training step).
* A sample without images has no CA keys: it gets one dummy key and its CA output is zeroed
  (`has_vision`), because a fully masked SDPA row is NaN in forward *and* backward.
* Padded text positions compute finite garbage; consumers read only `answers` positions.
* It runs in DataLoader workers, forked from a process that already used OpenMP: no torch op
  that enters OpenMP on its own (``repeat_interleave`` does, and hangs there: measured); the
  rest stays below ATen's parallel grain or runs on the worker's one thread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from visor_vllm.model import plan
from visor_vllm.model.packing import visual_token_count

IGNORE = -100  # label of a position that is not trained (transformers' convention)


def map_tensors(obj, fn):
    """A copy of dataclass ``obj`` with ``fn`` applied to every tensor field (nested too)."""
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = fn(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            changes[f.name] = map_tensors(v, fn)
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            changes[f.name] = (fn(v[0]), *v[1:])
        elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
            changes[f.name] = tuple(map_tensors(x, fn) for x in v)
    return dataclasses.replace(obj, **changes)


def _move(obj, device, non_blocking: bool):
    """A copy of dataclass ``obj`` with every tensor field on ``device``."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" else t


@dataclass(frozen=True)
class AnswerIndex:
    """The K positions of hidden states ``[B, T, d]`` that predict an answer token.

    ``pos`` indexes ``hidden.flatten(0, 1)`` (``b * T + j`` predicts token ``j + 1``:
    transformers' shift), in row-major order.
    """

    pos: torch.Tensor         # [K] long
    target: torch.Tensor      # [K] long
    row: torch.Tensor         # [K] long, the sample of each answer token
    count: int                # K
    per_sample: tuple         # answer tokens per sample, length B

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> AnswerIndex:
        """From labels ``[B, T]`` (IGNORE outside the answers), on the host."""
        labels = labels.cpu()
        B, T = labels.shape
        where = labels[:, 1:] != IGNORE                              # [B, T-1]
        b, j = where.nonzero(as_tuple=True)
        return cls(b * T + j, labels[b, j + 1], b, int(b.numel()), tuple(where.sum(1).tolist()))

    def to(self, device, non_blocking: bool = False) -> AnswerIndex:
        return _move(self, device, non_blocking)

    def pin_memory(self) -> AnswerIndex:
        return map_tensors(self, _pin)


@dataclass(frozen=True)
class PackGroup:
    """Images of the batch that LLaVA-OV packs alike (`packing.pack_same_size`), packed at once."""

    size: tuple | None        # (h, w) of one-image prompts; None: images of several-image prompts
    crops: int                # crops per image
    crop_index: torch.Tensor  # [G * crops] rows of the tower's output, image-major
    images: int               # G


@dataclass(frozen=True)
class BatchLayout:
    """Index bookkeeping of one padded batch (see the module docstring). Python ints are sizes."""

    B: int
    nv: tuple                 # visual tokens per sample
    nt: tuple                 # text tokens per sample
    image_lens: tuple         # visual tokens per image, all images in order
    image_sizes: tuple        # ((h, w), ...) per image, Python ints (for anyres packing)
    images_per_sample: tuple
    crops_per_image: tuple
    sv: int                   # sum(nv)
    tm: int                   # max(nt)
    vm: int                   # max(max(nv), 1)
    jm: int                   # max(nv + nt)
    text_ids: torch.Tensor    # [B, Tm] long, 0 on padding
    text_labels: torch.Tensor  # [B, Tm] long, IGNORE on padding
    t_pos: torch.Tensor       # [B, Tm] RoPE positions of the text rows
    j_pos: torch.Tensor       # [B, Jm] RoPE positions of the joint rows
    j_src: torch.Tensor       # [B*Jm] joint row <- cat(flat vision [Sv], padded text [B*Tm], zero)
    v_back: torch.Tensor      # [Sv] flat vision row <- joint row (of B*Jm)
    t_back: torch.Tensor      # [B*Tm] padded text row <- joint row (B*Jm: a zero row)
    v_pad_src: torch.Tensor   # [B*Vm] padded vision row <- flat vision row (Sv: a zero row)
    v_key_mask: torch.Tensor | None  # [B, Vm] bool, None when every sample has Vm visual tokens
    has_vision: torch.Tensor  # [B] bool
    conv_gaps: tuple          # (dst [Sv] long, total int): `plan.segment_gaps(image_lens, k//2)`
    answers: AnswerIndex      # over the text rows [B, Tm]
    crops: torch.Tensor | None  # [n_crops, 3, S, S] the vision tower's input, None without images
    pack_groups: tuple = ()   # PackGroup per kind of image, in first-appearance order
    vis_order: torch.Tensor | None = None  # [Sv] image-order row <- group-order row (None: same)

    def to(self, device, non_blocking: bool = False) -> BatchLayout:
        return _move(self, device, non_blocking)

    def pin_memory(self) -> BatchLayout:
        """Page-locked host copies (the DataLoader's ``pin_memory=True`` calls this), so that
        ``to(cuda, non_blocking=True)`` really overlaps the copy with the step."""
        return map_tensors(self, _pin)

    @property
    def device(self) -> torch.device:
        return self.text_ids.device

    # -- moving rows between the layouts (on the device, inside the step) ----------------------
    def to_joint(self, vis: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """flat vision ``[Sv, d]`` + padded text ``[B, Tm, d]`` -> joint ``[B, Jm, d]``."""
        d = t.shape[-1]
        src = torch.cat([vis, t.reshape(-1, d), t.new_zeros(1, d)])
        return src.index_select(0, self.j_src).view(self.B, self.jm, d)

    def from_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """joint ``[B, Jm, d]`` -> (flat vision ``[Sv, d]``, padded text ``[B, Tm, d]``)."""
        d = x.shape[-1]
        flat = torch.cat([x.reshape(-1, d), x.new_zeros(1, d)])
        return flat.index_select(0, self.v_back), flat.index_select(0, self.t_back).view(
            self.B, self.tm, d)

    def pad_vision(self, vis: torch.Tensor) -> torch.Tensor:
        """flat vision ``[Sv, d]`` -> per-sample padded ``[B, Vm, d]`` (zeros past Nv_b)."""
        d = vis.shape[-1]
        return torch.cat([vis, vis.new_zeros(1, d)]).index_select(0, self.v_pad_src).view(
            self.B, self.vm, d)


def crops_per_image(cfg, image_sizes: list, n_images: int) -> list[int]:
    """Crops the tower sees per image of one prompt: anyres tiles for one image, else 1 each."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches)

    if n_images != 1:
        return [1] * n_images
    return [image_size_to_num_patches(image_size=tuple(s), grid_pinpoints=cfg.image_grid_pinpoints,
                                      patch_size=cfg.vision_config.image_size)
            for s in image_sizes]


def build_layout(cfg, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, images_per_sample, image_sizes: torch.Tensor | None,
                 pixel_values: torch.Tensor | None) -> BatchLayout:
    """The layout of a right-padded batch (host tensors; see the module footguns).

    ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` with image placeholders expanded;
    ``pixel_values`` ``[n_images, max_crops, 3, S, S]`` and ``image_sizes`` ``[n_images, 2]``
    as transformers' processor returns them, images of all samples in order.
    Raises `plan.ImageTokenMismatchError` when a sample's placeholders do not match its images.
    """
    ids, mask, labels = input_ids.cpu(), attention_mask.cpu().bool(), labels.cpu()
    B = ids.shape[0]
    is_image = (ids == cfg.image_token_index) & mask
    text = mask & ~is_image
    nt = text.sum(1)                                                    # [B]
    placeholders = is_image.sum(1).tolist()

    # images: token and crop counts from the config, i.e. what the packing will produce
    sizes = [] if image_sizes is None else [tuple(int(x) for x in s) for s in image_sizes.tolist()]
    if len(sizes) != sum(images_per_sample):
        raise plan.ImageTokenMismatchError(
            f"{sum(images_per_sample)} images in the batch but {len(sizes)} image sizes")
    image_lens, crops, nv, k = [], [], [], 0
    for n in images_per_sample:
        mine = sizes[k:k + n]
        lens = [visual_token_count(cfg, h, w, n) for h, w in mine]
        image_lens += lens
        crops += crops_per_image(cfg, mine, n)
        nv.append(sum(lens))
        k += n
    if placeholders != nv:
        raise plan.ImageTokenMismatchError(f"image tokens per sample {placeholders} but the "
                                           f"images give {nv} features")
    crop_pixels, groups, vis_order = None, (), None
    if sizes:
        crop_pixels = torch.cat([pixel_values[i, :c] for i, c in enumerate(crops)])
        groups, vis_order = _pack_groups(sizes, images_per_sample, crops, image_lens)

    # text rows, right-padded: token l of sample b goes to column rank[b, l]
    tm = max(int(nt.max()), 1)
    rank = text.long().cumsum(1) - 1
    b_idx, l_idx = text.nonzero(as_tuple=True)
    text_ids = torch.zeros(B, tm, dtype=torch.long)
    text_labels = torch.full((B, tm), IGNORE, dtype=torch.long)
    text_ids[b_idx, rank[b_idx, l_idx]] = ids[b_idx, l_idx]
    text_labels[b_idx, rank[b_idx, l_idx]] = labels[b_idx, l_idx]

    nv_t = torch.tensor(nv, dtype=torch.long)                           # [B]
    sv = int(nv_t.sum())
    vm = max(max(nv), 1)
    jm = int((nv_t + nt).max())
    v_off = nv_t.cumsum(0) - nv_t                                       # [B]
    rows = torch.arange(B)[:, None]
    # padded vision [B, Vm] <- flat vision rows (sv = a zero row)
    i = torch.arange(vm)[None, :]
    v_valid = i < nv_t[:, None]
    v_pad_src = torch.where(v_valid, v_off[:, None] + i, sv).flatten()
    has_vision = nv_t > 0
    v_key_mask = v_valid | (~has_vision[:, None] & (i == 0))            # dummy key if no image
    if bool(v_valid.all()):
        v_key_mask = None                                               # no padding: no mask
    # joint [B, Jm] <- cat(flat vision [Sv], padded text [B*Tm], zero row)
    p = torch.arange(jm)[None, :]
    nvc, ntc = nv_t[:, None], nt[:, None]
    zero = sv + B * tm
    j_src = torch.where(p < nvc, v_off[:, None] + p,
                        torch.where(p < nvc + ntc, sv + rows * tm + (p - nvc), zero)).flatten()
    j_pos = torch.where(p < nvc + ntc, p, 0)
    # np.repeat, not torch.repeat_interleave: see `plan.segment_gaps` (OpenMP in forked workers)
    sample_of_v = torch.from_numpy(np.repeat(np.arange(B), nv))         # [Sv]
    v_back = sample_of_v * jm + torch.arange(sv) - v_off[sample_of_v]
    j = torch.arange(tm)[None, :]
    t_back = torch.where(j < ntc, rows * jm + nvc + j, B * jm).flatten()
    t_pos = nvc + j

    k = cfg.cross_attn_conv_kernel
    return BatchLayout(
        B=B, nv=tuple(nv), nt=tuple(nt.tolist()), image_lens=tuple(image_lens),
        image_sizes=tuple(sizes), images_per_sample=tuple(int(n) for n in images_per_sample),
        crops_per_image=tuple(crops), sv=sv, tm=tm, vm=vm, jm=jm,
        text_ids=text_ids, text_labels=text_labels, t_pos=t_pos, j_pos=j_pos, j_src=j_src,
        v_back=v_back, t_back=t_back, v_pad_src=v_pad_src, v_key_mask=v_key_mask,
        has_vision=has_vision, conv_gaps=plan.segment_gaps(image_lens, k // 2),
        answers=AnswerIndex.from_labels(text_labels), crops=crop_pixels, pack_groups=groups,
        vis_order=vis_order)


def _pack_groups(sizes, images_per_sample, crops, image_lens):
    """Images grouped by how they pack (size and crops; several-image prompts together), and the
    permutation that puts the groups' rows back in image order."""
    keys, first = [], 0
    for n in images_per_sample:
        keys += [(None if n > 1 else sizes[k], crops[k]) for k in range(first, first + n)]
        first += n
    crop_start = [0]
    for c in crops:
        crop_start.append(crop_start[-1] + c)
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups, row_of_image, row = [], {}, 0
    for (size, c), imgs in members.items():
        index = [crop_start[i] + j for i in imgs for j in range(c)]
        groups.append(PackGroup(size, c, torch.tensor(index, dtype=torch.long), len(imgs)))
        for i in imgs:
            row_of_image[i] = row
            row += image_lens[i]
    order = torch.cat([torch.arange(row_of_image[i], row_of_image[i] + image_lens[i])
                       for i in range(len(keys))])
    in_order = bool((order == torch.arange(order.numel())).all())
    return tuple(groups), None if in_order else order
