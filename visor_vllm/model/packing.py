"""VISOR-TR token packing (paper Sec. 4.4, Appendix I): fewer visual tokens, no new parameters.

A crop's patch grid ``[C, H, W]`` is resized bilinearly to ``(s*h, s*w)`` with
``h = round(H / sqrt(r))``, ``w = round(W / sqrt(r))``, then a space-to-depth (pixel unshuffle)
by ``s`` folds each ``s x s`` block into channels: ``[C*s*s, h, w]``. The token count falls by
``H*W / (h*w) ~= r`` for any real ``r >= 1`` (not only powers of two, the point of the paper's
adaptation), and the pixel shuffle keeps ``s*s`` resampled features per token instead of one,
so less detail is lost than with a plain ``1/sqrt(r)`` resize. ``s = 1`` *is* the plain resize.

Reading of the paper. Appendix I interpolates "by a factor of 1/sqrt(2) ... for a 2x compression
ratio, and then appl[ies] a space-to-depth transformation" that "halves the number of visual
tokens": the only reading in which both the resize and the space-to-depth happen and the total
ratio is still ``r`` is the one above (resize to ``s/sqrt(r)`` of the grid, then unshuffle by s).

Footguns. Packing runs on SigLIP features *before* the projector, so the projector's input width
becomes ``C * s * s``: a TR checkpoint is not weight-compatible with LLaVA-OV's projector (it is
trained, not converted). Token counts change, so the processor's placeholder count must come
from `packed_grid_size`, not from transformers' LLaVA-OV processor's default. A TR checkpoint's ``processor_config.json``
therefore says ``num_image_tokens = crop_tokens(cfg)`` (the packed count), which makes
transformers' processor count packed tokens too; `visual_token_count` is the same rule as a pure
function (the engine's placeholder count, and with ``packed=False`` the dense LLaVA-OV count
that FLOP savings are measured against).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from visor_vllm.model.config import VisorConfig


def packed_grid_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """Token grid ``(h, w)`` of one crop after packing by ``ratio`` (>= 1)."""
    if not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"token packing ratio must be a finite number >= 1, got {ratio}")
    scale = 1 / math.sqrt(ratio)
    return max(1, round(height * scale)), max(1, round(width * scale))


def pack_tokens(grid: torch.Tensor, ratio: float, s2d: int = 2) -> torch.Tensor:
    """Pack a batch of crop grids: ``[B, C, H, W] -> [B, C*s2d*s2d, h, w]``."""
    if grid.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(grid.shape)}")
    h, w = packed_grid_size(grid.shape[-2], grid.shape[-1], ratio)
    resized = F.interpolate(grid, size=(h * s2d, w * s2d), mode="bilinear", align_corners=False)
    return F.pixel_unshuffle(resized, s2d)


def pack_features(feats: torch.Tensor, cfg: VisorConfig) -> torch.Tensor:
    """SigLIP features of square crops ``[B, S*S, C]`` -> VISOR-TR's ``[B, h*w, C*s*s]``
    (unchanged without a packing ratio). The reference and the vLLM model both call this."""
    ratio = getattr(cfg, "token_packing_ratio", None)
    if ratio is None:
        return feats
    side = crop_side(cfg, packed=False)
    grid = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)          # [B, C, S, S]
    return pack_tokens(grid, ratio, cfg.token_packing_s2d).flatten(2).transpose(1, 2)


def anyres_grid_view(cfg: VisorConfig, side: int) -> SimpleNamespace:
    """The config fields LLaVA-OV's anyres packing reads (transformers' and vLLM's), with the
    crop's token grid ``side`` (packed under VISOR-TR): both derive the side as
    ``image_size // patch_size``, so ``patch_size`` is the Fraction that gives it exactly, while
    ``image_size`` stays the crop size in pixels that the anyres tile count is computed from."""
    crop = cfg.vision_config.image_size
    return SimpleNamespace(
        vision_config=SimpleNamespace(image_size=crop, patch_size=Fraction(crop, side)),
        image_grid_pinpoints=cfg.image_grid_pinpoints)


def crop_side(cfg: VisorConfig, packed: bool = True) -> int:
    """Side of one crop's token grid: SigLIP's ``image_size // patch_size``, packed for TR."""
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ratio = getattr(cfg, "token_packing_ratio", None)
    if not packed or ratio is None:
        return side
    return packed_grid_size(side, side, ratio)[0]  # square crops: a square packed grid


def crop_tokens(cfg: VisorConfig, packed: bool = True) -> int:
    """Visual tokens of one base crop (before anyres tiles and newline tokens)."""
    return crop_side(cfg, packed) ** 2


def visual_token_count(cfg: VisorConfig, height: int, width: int, n_images: int = 1,
                       packed: bool = True) -> int:
    """LLaVA-OV's visual-token count of one image of ``height x width`` pixels in a prompt with
    ``n_images`` images: base crop + unpadded anyres tiles + one newline per row for a single
    image, base crop + one newline each for several (transformers'
    ``LlavaOnevisionProcessor._get_number_of_features`` with the crop grid side as a parameter).
    ``packed=False``: the count of dense LLaVA-OV (no VISOR-TR) for the same image.
    """
    from transformers.image_processing_utils import select_best_resolution

    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    side = crop_side(cfg, packed)
    base = side * side
    if n_images > 1:
        return base + 1
    best_h, best_w = select_best_resolution([height, width], cfg.image_grid_pinpoints)
    crop = cfg.vision_config.image_size
    cur_h, cur_w = side * (best_h // crop), side * (best_w // crop)
    if width / height > cur_w / cur_h:  # wider than the tile grid: rows of padding removed
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= (cur_h - new_h) // 2 * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= (cur_w - new_w) // 2 * 2
    unpadded, newline = cur_h * cur_w, cur_h
    max_patches = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
    scale = math.sqrt(cur_h * cur_w / (max_patches * side ** 2))
    if scale > 1.1:  # anyres_max_N: the unpadded grid is resized down to ~N crops
        unpadded = int(cur_h // scale) * int(cur_w // scale)
        newline = int(cur_h // scale)
    return unpadded + newline + base


def projector_config(cfg: VisorConfig):
    """The projector's config: TR widens its input to ``C * s * s`` (packing runs before it)."""
    if getattr(cfg, "token_packing_ratio", None) is None:
        return cfg
    proj = copy.copy(cfg)
    vc = copy.copy(cfg.vision_config)
    vc.hidden_size = cfg.vision_config.hidden_size * cfg.token_packing_s2d ** 2
    proj.vision_config = vc
    return proj


def anyres_tile_grid(cfg: VisorConfig, height: int, width: int) -> tuple[int, int]:
    """Anyres tiles ``(rows, cols)`` of one image: transformers' ``get_anyres_image_grid_shape``."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([height, width], cfg.image_grid_pinpoints)
    crop = cfg.vision_config.image_size
    return best_h // crop, best_w // crop


def pack_same_size(cfg: VisorConfig, feats: torch.Tensor, size: tuple[int, int] | None,
                   newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-OV's packing of G images that pack alike, at once: ``[G, crops, s*s, d] -> [G, n, d]``.

    ``size`` ``(h, w)``: one-image prompts of that size (base crop, then the unpadded anyres tiles
    with a newline per row, resized down past ``anyres_max_N``); ``None``: images of
    several-image prompts (base crop and one newline). The same ops as transformers'
    ``LlavaOnevisionModel.pack_image_features`` with a batch dimension, so equal to it image by
    image (`tests/model/test_packing.py`); one set of kernels for the group instead of one per
    image (the trainer's batches).
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    G, crops, n, d = feats.shape
    side = math.isqrt(n)
    nl = newline.to(feats.device, feats.dtype)
    if size is None or crops == 1:
        return torch.cat([feats[:, 0], nl[None, None].expand(G, 1, d)], dim=1)
    rows, cols = anyres_tile_grid(cfg, *size)
    x = feats[:, 1:].reshape(G, rows, cols, side, side, d).permute(0, 5, 1, 3, 2, 4)
    x = x.reshape(G * d, rows * side, cols * side)                 # [G*d, H, W]
    x = unpad_image(x, list(size))
    h, w = x.shape[1:]
    x = x.reshape(G, d, h, w)
    max_patches = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(h * w / (max_patches * side ** 2))
    if ratio > 1.1:
        x = F.interpolate(x, [int(h // ratio), int(w // ratio)], mode="bilinear")
    x = torch.cat([x, nl[None, :, None, None].expand(G, d, x.shape[2], 1)], dim=-1)
    return torch.cat([feats[:, 0], x.flatten(2, 3).transpose(1, 2)], dim=1)
