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


# -- token counts: one rule for the processor, the reference, the engine and dense LLaVA-OV ------

SIZES = [(50, 70), (40, 40), (90, 40), (32, 32), (200, 30), (31, 97), (64, 32), (300, 300)]


@pytest.mark.parametrize("ratio", [None, 2.0, 3.0, 4.0])
def test_visual_token_count_is_the_reference_feature_count(ratio):
    from visor_vllm.model.packing import visual_token_count
    from visor_vllm.testing import random_tiny_model

    model = random_tiny_model(token_packing_ratio=ratio)
    cfg, s = model.config, model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    for h, w in SIZES:
        sizes = torch.tensor([[h, w]])
        px = torch.randn(1, model.crops_per_image(sizes)[0], 3, s, s, generator=g)
        with torch.no_grad():
            n = model.embed_images(px, sizes)[0].shape[0]
        assert n == visual_token_count(cfg, h, w), (ratio, h, w)
    with torch.no_grad():  # two images in one prompt: base crop + newline each
        two = model.embed_images(torch.randn(2, 1, 3, s, s, generator=g), torch.tensor(SIZES[:2]))
    assert [x.shape[0] for x in two] == [visual_token_count(cfg, h, w, 2) for h, w in SIZES[:2]]


@pytest.mark.parametrize("ratio", [None, 2.0, 4.0])
def test_visual_token_count_is_transformers_processor_count_at_real_size(ratio, tmp_path):
    """visor-0.5b's SigLIP-384 grid (27x27; 19x19 packed by 2, 14x14 by 4) and real pinpoints."""
    from visor_vllm.checkpoints import files
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.packing import crop_tokens, visual_token_count

    cfg = get_preset("visor-0.5b")
    cfg.token_packing_ratio = ratio
    cfg.save_pretrained(tmp_path)
    files.build_tokenizer(tmp_path, routing_token=True)
    files.write_processor_files(tmp_path, cfg, files.VISOR_CHAT_TEMPLATE)
    proc = files.load_processor(tmp_path)
    assert proc.num_image_tokens == crop_tokens(cfg) == {None: 729, 2.0: 361, 4.0: 196}[ratio]
    for h, w in [(384, 384), (480, 640), (1080, 1920), (2000, 300), (333, 1200)]:
        assert visual_token_count(cfg, h, w) == proc._get_number_of_features(h, w, 384, 384)
        dense = visual_token_count(cfg, h, w, packed=False)
        if ratio is None:
            assert dense == visual_token_count(cfg, h, w)
        else:  # the packed count is about 1/ratio of dense LLaVA-OV's
            assert 0.7 < visual_token_count(cfg, h, w) * ratio / dense < 1.3


def test_visual_token_count_rejects_empty_images():
    from visor_vllm.model.config import preset_tiny
    from visor_vllm.model.packing import visual_token_count

    with pytest.raises(ValueError, match="positive"):
        visual_token_count(preset_tiny(), 0, 10)


# -- LLaVA-OV's packing of several same-size images at once (the trainer's batches) ----------

@pytest.mark.parametrize("size", [(50, 70), (200, 30), (300, 300), (190, 190), None])
def test_pack_same_size_equals_transformers_image_by_image(size):
    """Equal to transformers' pack_image_features per image, bit for bit: anyres tiles with
    unpadding, the anyres_max_9 resize (300x300, 190x190), several-image prompts (None)."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from visor_vllm.model.batch_layout import crops_per_image
    from visor_vllm.model.config import preset_tiny
    from visor_vllm.model.packing import anyres_grid_view, crop_side, pack_same_size

    cfg = preset_tiny()
    side, d, G = crop_side(cfg), 8, 3
    crops = 1 if size is None else crops_per_image(cfg, [size], 1)[0]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(G, crops, side * side, d, generator=g)
    newline = torch.randn(d, generator=g)
    got = pack_same_size(cfg, feats, size, newline)
    view = SimpleNamespace(config=anyres_grid_view(cfg, side))
    for i in range(G):
        sizes = [list(size or (32, 32))] * (1 if size else 2)
        per = [feats[i]] if size else [feats[i], feats[i]]
        ref, _ = LlavaOnevisionModel.pack_image_features(
            view, per, sizes, image_newline=newline, vision_aspect_ratio=cfg.vision_aspect_ratio)
        assert torch.equal(got[i], ref[0])
