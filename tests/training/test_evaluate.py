"""Offline evaluation: several configurations in one pass over the data equal one pass each."""

import json

from visor_vllm.training import evaluate as ev
from visor_vllm.training.data import (EncodedDataset, SampleEncoder, default_image_folder,
                                      load_records)
from visor_vllm.training.trainer import load_model


def test_one_pass_scores_every_configuration_as_separate_passes(visor_ckpt_synth, synth_data,
                                                                tmp_path, monkeypatch):
    """`evaluate` encodes each sample once for all configurations (it was once per
    configuration) and gives the records a pass per configuration gives; a bad sample is
    counted once, not once per configuration."""
    data = tmp_path / "test.jsonl"
    records = load_records(synth_data / "test.jsonl")[:12]
    bad = dict(records[0], id="gone", image="missing.png")
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:5] + [bad] + records[5:]))
    folder = default_image_folder(synth_data / "test.jsonl")
    monkeypatch.setattr(ev, "default_image_folder", lambda _: folder)
    configs = [[0], [0, 4], [0, 2, 4, 6]]

    encoded = []
    encode = SampleEncoder.encode
    monkeypatch.setattr(SampleEncoder, "encode",
                        lambda self, rec, f: encoded.append(rec.get("id")) or encode(self, rec, f))
    got = ev.evaluate(visor_ckpt_synth, data, configs, batch_size=5, keep_records=True)
    assert len(encoded) == 13  # every sample once, the bad one included
    assert got["skipped"]["skipped"] == 1 and got["skipped"]["by_reason"] == {"missing_image": 1}

    model = load_model("stage2", visor_ckpt_synth)
    enc = SampleEncoder(visor_ckpt_synth)
    for c, entry in zip(configs, got["configs"]):
        ds = EncodedDataset(load_records(data), enc, folder)
        alone = ev.score(model, "visor", ds, enc.tokenizer.pad_token_id, c, batch_size=5)
        assert entry["sa_layers"] == c and entry["records"] == alone
        assert [r["index"] for r in alone] == [i for i in range(13) if i != 5]


def test_shared_forward_equals_one_forward_per_configuration(visor_ckpt_synth, synth_data):
    """`visor_hidden_configs` runs the layout, the vision tower and the layers every
    configuration runs alike once; each configuration's hidden states equal `visor_hidden`'s."""
    import pytest
    import torch

    from visor_vllm.training.data import collate
    from visor_vllm.training.model import TrainingError, visor_hidden, visor_hidden_configs

    model = load_model("stage2", visor_ckpt_synth).eval()
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(synth_data / "test.jsonl"), enc, synth_data)
    batch = collate([ds[i] for i in range(6)], enc.tokenizer.pad_token_id)
    for configs in ([[0], [0, 4], [0, 2, 4, 6]], [[0, 2, 4, 6]], [[0, 2], [0, 2, 6]]):
        got = list(visor_hidden_configs(model, batch, configs))
        assert len(got) == len(configs)
        with torch.no_grad():
            for c, (hidden, lay) in zip(configs, got):
                want, want_lay = visor_hidden(model, batch, c)
                assert torch.equal(hidden, want)
                assert torch.equal(lay.text_labels, want_lay.text_labels)
    with pytest.raises(TrainingError, match="not SA-capable"):
        list(visor_hidden_configs(model, batch, [[0], [0, 1]]))
