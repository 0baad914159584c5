"""Input checks for VISOR requests: bad images become HTTP 400s, never 500s or huge allocations.

What.
* Oversized images: vLLM's own limit (``VLLM_MAX_IMAGE_PIXELS``, `image_pixel_limit`, checked
  on the header right after ``PIL.Image.open``, before any pixel is decoded) is made the one
  that rejects them -- ledger entry ``pil-bomb-check-deferred-to-vllm`` in `visor_vllm.patches`
  turns PIL's duplicate check off while vLLM's is on, when the VISOR processor is built (the
  API server builds it at startup, before the first request).
* `check_images` rejects images the LLaVA-OV image processor cannot handle (a zero width or
  height divides by zero inside transformers) with a message that names the image; called by
  `visor_vllm.engine.vllm_model.VisorMultiModalProcessor` on every request's images.

Why. vLLM 0.32 answers a bomb-sized image with HTTP 500 because PIL's own check fires before
vLLM's (same threshold); the measurement and the fix are ledger entry 4 in `visor_vllm.patches`.

Footguns.
* ``PIL.Image.MAX_IMAGE_PIXELS`` is process-global. It is only cleared when vLLM's limit is on
  (``VLLM_MAX_IMAGE_PIXELS > 0``), and every image a VISOR server decodes from a request goes
  through vLLM's check. Other code in the same process that opens untrusted images with PIL
  no longer gets PIL's bomb check; call `image_pixel_limit` there.
* Images just under the limit are decoded in full: at the default limit (179M pixels) a 0.5 MB
  PNG can cost the API server ~2.5 GB of RAM for a few seconds (an 8000x8000 PNG measured
  +0.9 GB, 6 s on 2 cores). VISOR downsizes every image to a few 384-px tiles anyway, so
  deployments should set ``VLLM_MAX_IMAGE_PIXELS`` much lower (e.g. 16777216 = 4096*4096).
* vLLM's check reads ``VLLM_MAX_IMAGE_PIXELS`` per request, the ledger entry once when the
  processor is built: changing the variable after startup is not supported.
* `check_images` sees images after vLLM decoded them; it cannot save memory, only give a clear
  error. Over HTTP a zero-sized image never gets this far (PIL refuses to open one), so the
  check matters for the offline ``LLM`` API and custom front ends that pass ``PIL`` images.
"""

from __future__ import annotations

from collections.abc import Iterable

from visor_vllm import envs


def image_pixel_limit() -> int:
    """vLLM's limit on ``width * height`` of a request's image; ``<= 0`` means no limit."""
    return int(envs.VLLM_MAX_IMAGE_PIXELS)


def check_images(images: Iterable) -> None:
    """Raise ``ValueError`` (HTTP 400) for an image with a zero width or height.

    ``images``: PIL images or anything with ``.size == (width, height)``; other items (tensors,
    embeddings) are left to vLLM and transformers.
    """
    for i, image in enumerate(images):
        size = getattr(image, "size", None)
        if not (isinstance(size, tuple) and len(size) == 2):
            continue
        w, h = size
        if w < 1 or h < 1:
            raise ValueError(f"image {i + 1} is {w}x{h} pixels; VISOR needs images of at least "
                             "1x1 pixels")
