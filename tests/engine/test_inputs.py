"""`visor_vllm.engine.inputs`: oversized images reach vLLM's 400 check instead of PIL's 500, and
zero-sized images fail with a clear message before transformers divides by zero."""

from __future__ import annotations

import io
import struct
import zlib

import pytest

from visor_vllm import patches
from visor_vllm.engine import inputs


def header_only_png(w: int, h: int) -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


PIL_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL.Image.MAX_IMAGE_PIXELS as shipped


@pytest.fixture
def pil_limit(monkeypatch):
    """PIL's process-global limit at its shipped default for the test, restored after it (an
    in-process vLLM engine built earlier in the session has already applied the ledger patch)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIL_DEFAULT_LIMIT)
    return Image


def test_check_images_rejects_a_zero_dimension():
    from PIL import Image

    inputs.check_images([Image.new("RGB", (3, 2)), Image.new("RGB", (1, 1))])
    for size in [(0, 0), (0, 5), (5, 0)]:
        with pytest.raises(ValueError, match=rf"image 2 is {size[0]}x{size[1]} pixels.*at least 1x1"):
            inputs.check_images([Image.new("RGB", (4, 4)), Image.new("RGB", size)])


def test_check_images_leaves_non_images_alone():
    import torch

    inputs.check_images([torch.zeros(3, 0, 0), "not an image", object()])
    inputs.check_images([])


@pytest.mark.vllm
def test_bomb_header_is_pils_500_error_before_and_vllms_400_error_after(pil_limit, monkeypatch):
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    monkeypatch.delenv("VLLM_MAX_IMAGE_PIXELS", raising=False)
    bomb = header_only_png(30000, 30000)
    # vLLM 0.32 as shipped: PIL raises first, and not a ValueError -> vLLM answers HTTP 500.
    # If this starts failing, vLLM catches it itself and ledger entry pil-bomb-check-deferred-to-vllm can go.
    with pytest.raises(Image.DecompressionBombError):
        ImageMediaIO().load_bytes(bomb)
    assert not issubclass(Image.DecompressionBombError, ValueError)
    assert patches.apply_frontend_patches() == ["pil-bomb-check-deferred-to-vllm"]
    assert Image.MAX_IMAGE_PIXELS is None
    with pytest.raises(ValueError, match="30000x30000.*exceed the maximum.*VLLM_MAX_IMAGE_PIXELS"):
        ImageMediaIO().load_bytes(bomb)
    assert patches.apply_frontend_patches() == ["pil-bomb-check-deferred-to-vllm"]  # idempotent
    # images under the limit still load
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "PNG")
    assert ImageMediaIO().load_bytes(buf.getvalue()).media.size == (7, 5)


@pytest.mark.vllm
def test_pils_check_stays_when_vllms_is_off(pil_limit, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", "0")
    default = pil_limit.MAX_IMAGE_PIXELS
    assert inputs.image_pixel_limit() == 0
    assert patches.apply_frontend_patches() == []
    assert pil_limit.MAX_IMAGE_PIXELS == default


@pytest.mark.vllm
@pytest.mark.slow
def test_processor_rejects_zero_sized_image_with_visor_message(tmp_path, pil_limit):
    """The real VisorMultiModalProcessor (offline API path: PIL images, no URL decoding)."""
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import visor_vllm
    from visor_vllm.testing import write_random_tiny_checkpoint

    visor_vllm.register()
    ckpt = write_random_tiny_checkpoint(tmp_path)
    mc = ModelConfig(model=str(ckpt), dtype="float32", max_model_len=4096,
                     limit_mm_per_prompt={"image": 2})
    proc = MULTIMODAL_REGISTRY.create_processor(mc)
    assert Image.MAX_IMAGE_PIXELS is None  # building the processor defers the bomb check
    prompt = "<image>What is it?" + proc.info.get_hf_config().routing_token
    ok = proc(prompt, proc.info.parse_mm_data({"image": Image.new("RGB", (1, 9))}))
    assert ok["mm_placeholders"]["image"]
    with pytest.raises(ValueError, match="image 1 is 0x5 pixels"):
        proc(prompt, proc.info.parse_mm_data({"image": Image.new("RGB", (0, 5))}))
