"""The image caches (the worker's visual tokens, the front end's processed images): exact keys,
LRU within the byte bound, copies in and out, a clear error for a bad bound."""

from __future__ import annotations

import pytest
import torch

from visor_vllm.engine import vision_cache
from visor_vllm.engine.vision_cache import (DEFAULT_MB, PROCESSOR_DEFAULT_MB, VisionCache,
                                            VisionCacheConfigError, budget_bytes, image_key,
                                            images_key, processed_images)


def test_key_is_exact_content_and_size():
    a = torch.rand(2, 3, 8, 8)
    b = a.clone()
    b[1, 2, 7, 7] += 1e-6                                    # one pixel, barely
    assert image_key(a, (10, 20)) == image_key(a.clone(), (10, 20))
    assert image_key(a, (10, 20)) != image_key(b, (10, 20))
    assert image_key(a, (10, 20)) != image_key(a, (20, 10))  # anyres unpadding depends on it
    assert image_key(a, (10, 20)) != image_key(a.half(), (10, 20))


def test_lru_within_the_byte_bound():
    item = torch.zeros(16, 4)                                # 256 bytes
    cache = VisionCache(max_bytes=600)
    for k in (b"a", b"b"):
        cache.put(k, item + ord(k))
    assert cache.get(b"a") is not None                       # a is now the most recent
    cache.put(b"c", item)                                    # over 600: b goes, not a
    assert cache.get(b"b") is None and cache.get(b"a") is not None and len(cache) == 2
    assert cache.bytes == 512 and cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1
    cache.put(b"huge", torch.zeros(1000))                    # bigger than the bound: not kept
    assert cache.get(b"huge") is None and cache.bytes == 512
    torch.testing.assert_close(cache.get(b"a"), item + ord("a"))


def test_entries_are_copies_on_the_cpu():
    t = torch.ones(3)
    cache = VisionCache(1 << 20)
    cache.put(b"k", t)
    t += 1                                                   # the caller's tensor changes later
    assert cache.get(b"k").tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("raw,want", [(None, DEFAULT_MB << 20), ("", DEFAULT_MB << 20),
                                      ("0", 0), ("1.5", 3 << 19), ("64", 64 << 20)])
def test_budget_from_the_environment(raw, want):
    assert budget_bytes({} if raw is None else {"VISOR_VISION_CACHE_MB": raw}) == want


@pytest.mark.parametrize("raw", ["lots", "-1", "nan", "inf"])
def test_a_bad_budget_is_a_named_error(raw):
    with pytest.raises(VisionCacheConfigError, match="VISOR_VISION_CACHE_MB"):
        budget_bytes({"VISOR_VISION_CACHE_MB": raw})


@pytest.mark.parametrize("raw,want", [(None, PROCESSOR_DEFAULT_MB << 20), ("0", 0), ("8", 8 << 20)])
def test_processor_budget_from_its_own_variable(raw, want):
    env = {} if raw is None else {"VISOR_PROCESSOR_CACHE_MB": raw}
    assert budget_bytes(env, "VISOR_PROCESSOR_CACHE_MB", PROCESSOR_DEFAULT_MB) == want
    with pytest.raises(VisionCacheConfigError, match="VISOR_PROCESSOR_CACHE_MB"):
        budget_bytes({"VISOR_PROCESSOR_CACHE_MB": "-2"}, "VISOR_PROCESSOR_CACHE_MB")


def test_images_key_is_exact_pixels_mode_size_order_and_context():
    from PIL import Image

    a = Image.new("RGB", (5, 4), (10, 20, 30))
    b = a.copy()
    b.putpixel((4, 3), (10, 20, 31))                         # one channel of one pixel
    key = images_key([a], "ctx")
    assert key == images_key([a.copy()], "ctx")
    assert key != images_key([b], "ctx")
    assert key != images_key([a], "other processor")
    assert key != images_key([a.convert("RGBA")], "ctx")
    assert key != images_key([Image.new("RGB", (4, 5), (10, 20, 30))], "ctx")  # same bytes, transposed
    assert images_key([a, b], "ctx") != images_key([b, a], "ctx")
    assert images_key([a, a], "ctx") != key                  # several images: another preprocessing
    assert images_key([a, torch.zeros(3, 4, 5)], "ctx") is None  # not an image: no caching


@pytest.fixture
def processor_cache(monkeypatch):
    """A fresh front-end cache of 1 MB for the test (the process's one is made once)."""
    monkeypatch.setattr(vision_cache, "_PROCESSED", {"cache": VisionCache(1 << 20)})
    return vision_cache.processor_cache()


def test_a_processed_image_is_processed_once_and_handed_out_as_copies(processor_cache):
    from PIL import Image
    from transformers import BatchFeature

    calls = []

    def process():
        calls.append(1)
        return BatchFeature({"pixel_values": torch.ones(2, 3, 4, 4),
                             "image_sizes": torch.tensor([[4, 4]])})

    im = Image.new("RGB", (4, 4), (1, 2, 3))
    first = processed_images([im], "ctx", process, wrap=BatchFeature)
    first["pixel_values"] += 1                               # vLLM updates what it is handed
    first["passthrough"] = "x"
    again = processed_images([im.copy()], "ctx", process, wrap=BatchFeature)
    assert len(calls) == 1 and isinstance(again, BatchFeature)
    assert again.keys() == {"pixel_values", "image_sizes"}
    assert torch.equal(again["pixel_values"], torch.ones(2, 3, 4, 4))
    again["pixel_values"] += 5                               # a hit is a copy too
    third = processed_images([im], "ctx", process, wrap=BatchFeature)
    assert torch.equal(third["pixel_values"], torch.ones(2, 3, 4, 4))
    assert torch.equal(third["image_sizes"], torch.tensor([[4, 4]]))
    processed_images([im], "another call", process, wrap=BatchFeature)
    assert len(calls) == 2
    assert processor_cache.stats()["hits"] == 2 and processor_cache.stats()["misses"] == 2


def test_what_is_not_kept_is_processed_every_time(processor_cache, monkeypatch):
    """Not an image; an output that is not all torch tensors (a request may ask the processor
    for numpy: the bound could not count it); no cache at all (``VISOR_PROCESSOR_CACHE_MB=0``)."""
    import numpy as np
    from PIL import Image

    im = Image.new("RGB", (4, 4))
    cases = [([torch.zeros(3, 2, 2)], lambda: {"pixel_values": torch.zeros(1)}),
             ([im], lambda: {"pixel_values": np.zeros((1, 3, 4, 4))}),
             ([im], lambda: {"pixel_values": torch.zeros(1), "image_sizes": [[4, 4]]})]
    for images, out in cases:
        calls = []
        for _ in range(2):
            processed_images(images, "ctx", lambda: calls.append(1) or out())
        assert len(calls) == 2
    assert len(processor_cache) == 0 and processor_cache.bytes == 0
    monkeypatch.setattr(vision_cache, "_PROCESSED", {"cache": None})
    calls = []
    for _ in range(2):
        processed_images([im], "ctx", lambda: calls.append(1) or {"pixel_values": torch.zeros(1)})
    assert len(calls) == 2


def test_a_bad_processor_bound_stops_the_processor_not_a_request(monkeypatch):
    monkeypatch.setattr(vision_cache, "_PROCESSED", {})
    monkeypatch.setenv("VISOR_PROCESSOR_CACHE_MB", "lots")
    for _ in range(2):  # nothing half-made is kept: every try says it
        with pytest.raises(VisionCacheConfigError, match="VISOR_PROCESSOR_CACHE_MB='lots'"):
            vision_cache.processor_cache()


@pytest.mark.vllm
def test_the_served_processor_reads_its_bound_when_it_is_built(tmp_path, monkeypatch):
    """vLLM builds the multimodal processor at start-up (and for an offline `LLM`): that is
    where a bad ``VISOR_PROCESSOR_CACHE_MB`` fails, with its name."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import visor_vllm
    from visor_vllm.testing import write_random_tiny_checkpoint

    visor_vllm.register()
    mc = ModelConfig(model=str(write_random_tiny_checkpoint(tmp_path)), dtype="float32",
                     max_model_len=4096)
    monkeypatch.setattr(vision_cache, "_PROCESSED", {})
    monkeypatch.setenv("VISOR_PROCESSOR_CACHE_MB", "-1")
    with pytest.raises(VisionCacheConfigError, match="VISOR_PROCESSOR_CACHE_MB"):
        MULTIMODAL_REGISTRY.create_processor(mc)
    monkeypatch.setenv("VISOR_PROCESSOR_CACHE_MB", "2")
    MULTIMODAL_REGISTRY.create_processor(mc)
    assert vision_cache.processor_cache().max_bytes == 2 << 20
