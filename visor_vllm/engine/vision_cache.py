"""Image work cached by image content, so a conversation's next turn redoes none of it.

What. Two bounded LRU caches (`VisionCache`; least recently used entries go first once the
cached bytes exceed the bound), one per process that does image work:

* the worker's: a digest of one image's preprocessed pixels (and its size, which decides
  anyres unpadding, `image_key`) -> its projected, unpadded visual tokens ``[Nv, d]``, what
  the VISOR decoder receives as its encoder output.
  `VisorForConditionalGeneration._vision_features` looks every image of a step up and runs the
  tower only on the misses. Bound: ``VISOR_VISION_CACHE_MB`` (default 256).
* the front end's (the API server, or an offline ``LLM``'s own process): a digest of a
  prompt's decoded images and the processor call (`images_key`) -> transformers' processed
  ``pixel_values`` / ``image_sizes``. `VisorMultiModalProcessor._apply_hf_processor_main` runs
  LLaVA-OV's image processor only on a miss (`processed_images`). Bound:
  ``VISOR_PROCESSOR_CACHE_MB`` (default 1024).

Why. In encoder-decoder mode vLLM 0.32 disables both its encoder cache and its multimodal
processor cache (``ModelConfig``: "Encoder-decoder model detected, disabling mm processor
cache"), and chat clients re-send the image with every turn. Without these each turn of a
conversation about one image re-runs the vision tower (most of a CPU first step at 0.5B size)
and the image processor (27 % of the API server's CPU time in the synthetic recipe's served
evaluation, 8 questions an image, py-spy 2026-12-07). K/V are *not* cached: they depend on the
request's configuration and live in the paged cache as before.

Footguns.
* Keys are exact bytes (blake2b, 128 bit) -- pixels, sizes, modes, the processor's own config
  and call -- never a cheap fingerprint: a collision would silently answer about another image.
* Entries live on the CPU whatever the model's device, outside vLLM's GPU memory profile; a
  worker hit is copied to the model's device. Bounds are per process; tensor-parallel ranks
  and each API server process hold their own copy. ``0`` turns a cache off.
* A hit returns exactly what a miss computed. Entries are stored as copies; the front end
  hands out copies too (vLLM updates the processor's output dict in place), the worker its
  entry itself (moved to the model's device; the model never writes to its encoder outputs).
  Only outputs that are all torch tensors are kept, so the bound counts every byte.
* Thread-safe: vLLM's front end processes requests on a thread pool.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from visor_vllm import envs

ENV = "VISOR_VISION_CACHE_MB"
DEFAULT_MB = 256
PROCESSOR_ENV = "VISOR_PROCESSOR_CACHE_MB"
PROCESSOR_DEFAULT_MB = 1024  # vLLM's own processor cache defaults to 4 GiB


class VisionCacheConfigError(ValueError):
    """``VISOR_VISION_CACHE_MB`` or ``VISOR_PROCESSOR_CACHE_MB`` is not a number >= 0."""


def budget_bytes(env: dict | None = None, name: str = ENV, default_mb: int = DEFAULT_MB) -> int:
    """A cache bound in bytes from the variable ``name`` (0 = off)."""
    raw = envs.get(name, env)
    if raw is None or raw.strip() == "":
        return default_mb << 20
    try:
        mb = float(raw)
    except ValueError:
        raise VisionCacheConfigError(
            f"{name}={raw!r}: expected megabytes, e.g. {default_mb} (0 = off)") from None
    if not mb >= 0 or mb == float("inf"):
        raise VisionCacheConfigError(f"{name}={raw!r}: expected a finite number >= 0")
    return int(mb * (1 << 20))


def image_key(pixels: torch.Tensor, size) -> bytes:
    """Digest of one image's preprocessed crops ``[P, 3, S, S]`` and its ``(h, w)``."""
    h = hashlib.blake2b(digest_size=16)
    t = pixels.detach()
    h.update(f"{t.dtype}|{tuple(t.shape)}|{[int(x) for x in size]}".encode())
    h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def images_key(images: Sequence, context: str) -> bytes | None:
    """Digest of a prompt's decoded images (mode, size and pixel bytes of each, in order) and
    ``context`` (what else decides the processor's output: its config, the call's arguments);
    None when an item is not a PIL image (tensors, embeddings: processed as they come)."""
    from PIL import Image

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(images)}|{context}".encode())
    for im in images:
        if not isinstance(im, Image.Image):
            return None
        h.update(f"|{im.mode}|{im.size}|".encode())
        h.update(im.tobytes())
    return h.digest()


def _nbytes(value) -> int:
    """Bytes of a tensor, or of a mapping of tensors (what `VisionCache` holds)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value.values())


def _copy(value):
    """A tensor copied to the CPU, or a mapping of tensors as a dict of such copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return {k: _copy(v) for k, v in value.items()}


class VisionCache:
    """Bounded LRU by key of tensors (`image_key`) or mappings of tensors (`images_key`);
    counts hits and misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor | Mapping] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes):
        with self._lock:
            t = self._items.get(key)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: bytes, value) -> None:
        size = _nbytes(value)
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
        value = _copy(value)  # outside the lock: a device-to-host copy can take a while
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}


_PROCESSED: dict[str, VisionCache | None] = {}  # this process's front-end cache, made once


def processor_cache() -> VisionCache | None:
    """This process's cache of processed images (``VISOR_PROCESSOR_CACHE_MB``; None at 0)."""
    if "cache" not in _PROCESSED:
        limit = budget_bytes(name=PROCESSOR_ENV, default_mb=PROCESSOR_DEFAULT_MB)
        _PROCESSED["cache"] = VisionCache(limit) if limit else None
    return _PROCESSED["cache"]


def processed_images(images: Sequence, context: str, process, wrap=dict):
    """``process()``'s output (a mapping of tensors, e.g. transformers' ``BatchFeature``) for
    ``images``, from this process's cache when the same images met the same ``context``
    before: then ``wrap`` of a fresh dict of copied tensors."""
    cache = processor_cache()
    key = None if cache is None else images_key(images, context)
    hit = None if key is None else cache.get(key)
    if hit is not None:
        return wrap(_copy(hit))
    out = process()
    # only torch tensors are counted against the bound and copied: an output with anything
    # else (a request's ``return_tensors`` in its mm_processor_kwargs) is not kept
    if key is not None and all(isinstance(v, torch.Tensor) for v in out.values()):
        cache.put(key, dict(out))
    return out
