"""VISOR-TR packing: shapes and token ratios for any r >= 1."""

import pytest
import torch

from visor_vllm.model.packing import pack_tokens, packed_grid_size


@pytest.mark.parametrize("ratio", [1, 1.5, 2, 3, 4, 9])
@pytest.mark.parametrize("s2d", [1, 2])
def test_shapes_and_ratio(ratio, s2d):
    grid = torch.randn(3, 16, 27, 27)  # 3 crops, 16 channels, a SigLIP-384 grid
    out = pack_tokens(grid, ratio, s2d)
    h, w = packed_grid_size(27, 27, ratio)
    assert out.shape == (3, 16 * s2d * s2d, h, w)
    assert abs((27 * 27) / (h * w) - ratio) / ratio < 0.1  # rounding of the side only


def test_ratio_one_without_space_to_depth_is_identity():
    grid = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(pack_tokens(grid, 1, 1), grid)


def test_ratio_two_keeps_729_over_two_tokens():
    assert packed_grid_size(27, 27, 2) == (19, 19)  # 361 tokens ~ 729 / 2


@pytest.mark.parametrize("bad", [0.5, 0, float("nan"), float("inf")])
def test_bad_ratio(bad):
    with pytest.raises(ValueError, match=">= 1"):
        packed_grid_size(27, 27, bad)
