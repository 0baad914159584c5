"""VISOR is LLaVA-OneVision plus sparsity: with every layer SA and no CA it *is* LLaVA-OV.

A tiny llava-hf checkpoint goes through the real converter into the degenerate schedule
(``layer_types = ["self"] * L``, one configuration running every layer); the reference model
then matches transformers' `LlavaOnevisionForConditionalGeneration` logits in fp32 on a prompt
whose image comes first (vision_first is exactly LLaVA-OV's order then), anyres tiles included.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from visor_vllm.checkpoints.build import build_tiny_llava_onevision
from visor_vllm.checkpoints.files import load_processor
from visor_vllm.model.config import VisorConfig, preset_tiny
from visor_vllm.checkpoints.convert import convert
from visor_vllm.model.reference import VisorForConditionalGeneration


def all_self_schedule() -> VisorConfig:
    tiny = preset_tiny()
    n = tiny.num_layers
    return VisorConfig(vision_config=tiny.vision_config.to_dict(),
                       text_config=tiny.text_config.to_dict(),
                       image_grid_pinpoints=tiny.image_grid_pinpoints,
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       tie_word_embeddings=True, layer_types=["self"] * n,
                       sa_configs=[list(range(n))])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    src = build_tiny_llava_onevision(tmp_path_factory.mktemp("llava") / "ckpt", seed=3)
    dst = convert(src, tmp_path_factory.mktemp("visor") / "ckpt", preset=all_self_schedule(),
                  progress=False)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    return hf, VisorForConditionalGeneration.from_pretrained(str(dst)), load_processor(src)


@pytest.mark.parametrize("size", [(50, 70), (200, 90), (32, 32)])
def test_degenerate_visor_matches_llava_onevision(pair, size):
    hf, visor, proc = pair
    img = Image.fromarray(np.random.RandomState(size[0]).randint(0, 255, (*size, 3), dtype=np.uint8))
    enc = proc(images=[img], text="<image>\nWhat is in the picture?", return_tensors="pt")
    ids = enc["input_ids"]
    n_image = int((ids == hf.config.image_token_id).sum())
    assert ids[0, :n_image].eq(hf.config.image_token_id).all()  # the image comes first
    with torch.no_grad():
        want = hf(**{k: v for k, v in enc.items() if k != "batch_num_images"}).logits[0, n_image:]
        got = visor(ids, enc["pixel_values"], enc["image_sizes"])
    assert got.sa_layers == tuple(range(visor.config.num_layers))
    # The converter gives the new routing token an embedding row (tied: also an output row), so
    # that one logit column is VISOR's own; every other logit is LLaVA-OV's.
    keep = torch.ones(want.shape[-1], dtype=torch.bool)
    keep[visor.config.routing_token_id] = False
    torch.testing.assert_close(got.logits[:, keep], want[:, keep], atol=1e-4, rtol=1e-4)
