"""The vision-tower cache: exact keys, LRU within its byte bound, a clear error for a bad bound."""

from __future__ import annotations

import pytest
import torch

from visor_vllm.engine.vision_cache import (DEFAULT_MB, VisionCache, VisionCacheConfigError,
                                            budget_bytes, image_key)


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
