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
from `packed_grid_size`, not from transformers' LLaVA-OV processor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
