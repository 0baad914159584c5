"""scripts/visual_update_ablation.py: the hooks freeze the visual tokens and nothing else."""

import torch

from visor_vllm.training.data import SampleEncoder, collate, load_records, default_image_folder
from visor_vllm.training.model import dense_hidden
from visor_vllm.training.trainer import load_model


def test_frozen_layers_leave_the_visual_tokens_and_change_the_text(dense_ckpt, synth_data,
                                                                   load_script):
    ablation = load_script("visual_update_ablation")
    data = synth_data / "test.jsonl"
    enc = SampleEncoder(dense_ckpt)
    batch = collate([enc.encode(r, default_image_folder(data)) for r in load_records(data)[:3]],
                    pad_id=0)
    model = load_model("dense", dense_ckpt).eval()
    image = batch.input_ids == model.config.image_token_id
    with torch.no_grad():
        plain, _ = dense_hidden(model, batch)
        seen = {}
        first = model.model.language_model.layers[0]
        def keep_input(_module, args, kwargs):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        grab = first.register_forward_pre_hook(keep_input, with_kwargs=True)
        handles = ablation.frozen_visual_updates(model, list(range(len(
            model.model.language_model.layers))))
        frozen, _ = dense_hidden(model, batch)
        grab.remove()
        for h in handles:
            h.remove()
        again, _ = dense_hidden(model, batch)
    # every layer frozen: the visual tokens leave the stack as they entered it (before the
    # final norm, which dense_hidden applies to all tokens alike)
    norm = model.model.language_model.norm
    torch.testing.assert_close(frozen[image], norm(seen["x"])[image])
    assert not torch.allclose(frozen[~image], plain[~image])  # the text read other visual states
    torch.testing.assert_close(again, plain)  # the handles come off
