"""Vision-tower outputs cached by image content, so a conversation's next turn skips SigLIP.

What. `VisionCache` maps a digest of one image's preprocessed pixels (and its size, which
decides anyres unpadding) to that image's projected, unpadded visual tokens ``[Nv, d]`` -- what
the VISOR decoder receives as its encoder output. Least recently used entries go first once
the cached bytes exceed the bound. `VisorForConditionalGeneration._process_image_input` looks
every image of a step up and runs the tower only on the misses.

Why. In encoder-decoder mode vLLM 0.32 disables its encoder cache, and chat clients re-send the
image with every turn, so without this each turn of a conversation about one image re-runs
the vision tower (most of a CPU first step at 0.5B size). K/V are *not* cached: they depend on
the request's configuration and live in the paged cache as before.

Footguns.
* The key is the exact pixel bytes (blake2b, 128 bit) plus the image size, never a cheap
  fingerprint: a collision would silently answer about another image.
* Entries live on the CPU whatever the model's device, outside vLLM's GPU memory profile; a
  hit is copied to the model's device. The bound is ``VISOR_VISION_CACHE_MB`` (default 256;
  ``0`` turns the cache off), per worker process; tensor-parallel ranks each hold a copy.
* Cached tensors are the model dtype's outputs; a hit returns exactly what a miss computed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from visor_vllm import envs

ENV = "VISOR_VISION_CACHE_MB"
DEFAULT_MB = 256


class VisionCacheConfigError(ValueError):
    """``VISOR_VISION_CACHE_MB`` is not a non-negative number."""


def budget_bytes(env: dict | None = None) -> int:
    """The cache bound in bytes from ``VISOR_VISION_CACHE_MB`` (0 = off)."""
    raw = envs.get(ENV, env)
    if raw is None or raw.strip() == "":
        return DEFAULT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise VisionCacheConfigError(f"{ENV}={raw!r}: expected megabytes, e.g. 256 (0 = off)") from None
    if not mb >= 0 or mb == float("inf"):
        raise VisionCacheConfigError(f"{ENV}={raw!r}: expected a finite number >= 0")
    return int(mb * (1 << 20))


def image_key(pixels: torch.Tensor, size) -> bytes:
    """Digest of one image's preprocessed crops ``[P, 3, S, S]`` and its ``(h, w)``."""
    h = hashlib.blake2b(digest_size=16)
    t = pixels.detach()
    h.update(f"{t.dtype}|{tuple(t.shape)}|{[int(x) for x in size]}".encode())
    h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class VisionCache:
    """Bounded LRU of visual tokens by `image_key`; counts hits and misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value.detach().to("cpu", copy=True)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}
