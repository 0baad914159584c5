"""Router training: features once, labels that depend on the question, the same choice served."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from visor_vllm.training.data import EncodedDataset, SampleEncoder, load_records
from visor_vllm.training.model import TrainingError
from visor_vllm.training.router import (load_with_features, route, routing_features, train_router,
                                       train_router_on_data)
from visor_vllm.training.synthetic import write_dataset
from visor_vllm.training.trainer import load_model

EASY, HARD = 0, 7  # configuration indices of the synthetic preset: [0] and [0, 2, 4, 6]


@pytest.fixture(scope="module")
def two_family_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("route") / "data", seed=5, n_train=1, n_val=40,
                         n_test=1, families=["colour_at", "vsame"], progress=False)


def _labels(data):
    recs = load_records(data / "val.jsonl")
    return {i: EASY if r["family"] == "colour_at" else HARD for i, r in enumerate(recs)}


def test_features_are_the_references_router_input(visor_ckpt_synth, two_family_data):
    model = load_model("stage2", visor_ckpt_synth)
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(two_family_data / "val.jsonl")[:6], enc, two_family_data)
    feats, owner = routing_features(model, ds, enc.tokenizer.pad_token_id, batch_size=4)
    assert owner.tolist() == list(range(6))                     # one routing token each
    picked = route(model, feats, owner)
    with torch.no_grad():
        for i in range(6):
            s = ds[i]
            ref = model(s.input_ids, s.pixel_values, s.image_sizes)
            torch.testing.assert_close(model.router(feats[owner == i]), ref.router_logits,
                                       atol=1e-5, rtol=1e-4)
            assert picked[i] == ref.config_index


def test_router_learns_question_dependent_labels(visor_ckpt_synth, two_family_data):
    model = load_model("stage2", visor_ckpt_synth)
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(two_family_data / "val.jsonl"), enc, two_family_data)
    feats, owner = routing_features(model, ds, enc.tokenizer.pad_token_id)
    report = train_router(model, feats, owner, _labels(two_family_data), steps=300)
    assert report["token_accuracy"] == 1.0
    assert report["confusion"][EASY][EASY] == 20 and report["confusion"][HARD][HARD] == 20
    assert set(route(model, feats, owner).values()) == {EASY, HARD}


def test_features_load_as_evaluation_loads_and_refuse_a_dense_checkpoint(
        visor_ckpt_synth, dense_ckpt, two_family_data):
    model = load_model("stage2", visor_ckpt_synth)
    enc = SampleEncoder(visor_ckpt_synth)
    ds = EncodedDataset(load_records(two_family_data / "val.jsonl"), enc, two_family_data)
    want = routing_features(model, ds, enc.tokenizer.pad_token_id, batch_size=8)
    _, feats, owner = load_with_features(visor_ckpt_synth, two_family_data / "val.jsonl", 8)
    torch.testing.assert_close(feats, want[0])
    assert owner.tolist() == want[1].tolist()
    with pytest.raises(TrainingError, match="dense checkpoint: a router needs a VISOR one"):
        load_with_features(dense_ckpt, two_family_data / "val.jsonl")


@pytest.mark.vllm
@pytest.mark.e2e
def test_served_router_reproduces_the_labels(tmp_path_factory, visor_ckpt_synth, two_family_data):
    import openai

    from ..serving.conftest import serving

    out = tmp_path_factory.mktemp("routed") / "ckpt"
    report = train_router_on_data(visor_ckpt_synth, two_family_data / "val.jsonl",
                                  _labels(two_family_data), out, steps=300)
    assert report["sample_accuracy"] == 1.0
    recs = load_records(two_family_data / "test.jsonl") + load_records(
        two_family_data / "val.jsonl")
    buf = io.BytesIO()
    Image.open(two_family_data / recs[0]["image"]).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with serving(tmp_path_factory, ckpt=out) as (base, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")

        def ask(*questions):
            content = [{"type": "image_url", "image_url": {"url": url}}]
            messages = [{"role": "user", "content": content + [
                {"type": "text", "text": questions[0]}]}]
            for q in questions[1:]:  # a second user turn: a second routing token votes
                messages += [{"role": "assistant", "content": "ok"},
                             {"role": "user", "content": q}]
            r = client.chat.completions.create(model="visor-tiny", max_tokens=2,
                                               temperature=0, messages=messages)
            return r.model_extra["visor"]

        easy, hard = ask("colour at 1 2"), ask("how many same below")
        assert easy["sa_layers"] == [1] and easy["budget_source"] == "router"
        assert hard["sa_layers"] == [1, 3, 5, 7]
        both = ask("colour at 1 2", "how many same below")
        assert both["sa_layers"] == [1, 3, 5, 7]   # the costliest vote wins
        capped = client.chat.completions.create(
            model="visor-tiny", max_tokens=2, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "how many same below"}]}],
            extra_body={"vllm_xargs": {"visor_budget": 1}}).model_extra["visor"]
        assert len(capped["sa_layers"]) <= 2
    json.dumps(report)
