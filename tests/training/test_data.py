"""Conversations -> the tokens the server sees; bad samples are counted, never fatal."""

import json

import pytest
import torch
from PIL import Image

from visor_vllm.training.data import (IGNORE, BadSample, EncodedDataset, SampleEncoder, Skipped,
                                      collate, load_records)


@pytest.fixture(scope="module")
def encoder(visor_ckpt_synth):
    return SampleEncoder(visor_ckpt_synth)


def _record(image="img.png", turns=(("what colour", "red"),), rid="r"):
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 and image else "") + q},
                 {"from": "gpt", "value": a}]
    rec = {"id": rid, "conversations": conv}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "img.png")
    Image.new("RGB", (50, 70), "red").save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return tmp_path


@pytest.mark.parametrize("image", ["img.png", "big.png"])
def test_ids_equal_the_processors_own_expansion(encoder, folder, image):
    rec = _record(image, turns=(("colour at 1 2", "red"), ("how many blue", "three")))
    enc = encoder.encode(rec, folder)
    proc = encoder.processor
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "colour at 1 2"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "how many blue"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "three"}]}]
    text = proc.apply_chat_template(messages, tokenize=False)
    ref = proc(images=[Image.open(folder / image).convert("RGB")], text=[text],
               return_tensors="pt")
    assert torch.equal(enc.input_ids, ref["input_ids"][0])
    assert torch.equal(enc.pixel_values, ref["pixel_values"])
    # the routing token follows each question (VISOR template), as `vllm serve` renders it
    route = proc.tokenizer.convert_tokens_to_ids("<|route|>")
    assert int((enc.input_ids == route).sum()) == 2


def test_labels_are_the_answers_and_their_end_token(encoder, folder):
    enc = encoder.encode(_record(turns=(("colour at 1 2", "red"), ("how many", "three"))), folder)
    tok = encoder.tokenizer
    kept = enc.labels[enc.labels != IGNORE].tolist()
    assert tok.decode(kept) == "red<|im_end|>three<|im_end|>"


def test_compact_template_trains_on_the_same_answers_with_fewer_tokens(encoder, folder, tmp_path):
    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.training.synthetic import corpus

    src = build_tiny_llava_onevision(tmp_path / "llava", preset="synthetic",
                                     extra_corpus=corpus(), template="compact")
    compact = SampleEncoder(convert(src, tmp_path / "visor", preset="synthetic", init="random",
                                    progress=False))
    rec = _record(turns=(("colour at 1 2", "red"), ("how many", "three")))
    enc, ref = compact.encode(rec, folder), encoder.encode(rec, folder)
    kept = enc.labels[enc.labels != IGNORE].tolist()
    assert compact.tokenizer.decode(kept) == "red<|im_end|>three<|im_end|>"
    route = compact.tokenizer.convert_tokens_to_ids("<|route|>")
    assert int((enc.input_ids == route).sum()) == 2
    # ChatML spends 10 header tokens a turn and a newline after the image; compact 3 and none
    assert len(ref.input_ids) - len(enc.input_ids) == 2 * 7 + 1


def test_bad_samples_are_skipped_with_reasons(encoder, folder):
    recs = [_record(), _record("missing.png"), _record("broken.png"),
            _record(turns=(("q", ""),)), {"conversations": []},
            {"id": "2img", "image": "img.png",
             "conversations": [{"from": "human", "value": "<image><image> q"},
                               {"from": "gpt", "value": "a"}]},
            _record(turns=tuple(("colour at 1 2", "red") for _ in range(80)))]
    ds = EncodedDataset(recs, SampleEncoder(encoder.processor.tokenizer.name_or_path,
                                            max_length=300), folder)
    got = [ds[i] for i in range(len(recs))]
    assert not isinstance(got[0], Skipped)
    assert [g.reason for g in got[1:]] == ["missing_image", "corrupt_image", "no_answer",
                                           "no_conversations", "image_count_mismatch",
                                           "too_long"]
    assert ds.skipped.summary()["skipped"] == 6
    batch = collate(got, pad_id=0)
    assert len(batch) == 1 and len(batch.skipped) == 6


def test_text_only_and_several_images(encoder, folder):
    enc = encoder.encode(_record(image=None), folder)
    assert enc.pixel_values is None
    two = {"image": ["img.png", "big.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\ncompare"}, {"from": "gpt", "value": "same"}]}
    enc2 = encoder.encode(two, folder)
    n = encoder.processor.num_image_tokens + 1
    assert int((enc2.input_ids == encoder.image_token_id).sum()) == 2 * n


def test_formats_json_jsonl_datasets_parquet(tmp_path):
    recs = [_record(rid=f"r{i}") for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "{bad\n")
    assert [r["id"] for r in load_records(tmp_path / "a.json")] == ["r0", "r1", "r2"]
    lines = load_records(tmp_path / "a.jsonl")
    assert len(lines) == 4 and "_bad" in lines[3]
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"id": r["id"], "conversations": r["conversations"]}
                                     for r in recs])
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert [r["id"] for r in load_records(tmp_path / "saved")] == ["r0", "r1", "r2"]
    assert [r["id"] for r in load_records(tmp_path / "a.parquet")] == ["r0", "r1", "r2"]


def test_datasets_images_as_bytes(encoder, folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    png = (folder / "img.png").read_bytes()
    ds = datasets.Dataset.from_list([{**_record(image=None), "image": {"bytes": png}}])
    ds.save_to_disk(str(tmp_path / "s"))
    rec = load_records(tmp_path / "s")[0]
    rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
    assert encoder.encode(rec, tmp_path).pixel_values is not None


def test_unreadable_data_is_a_named_error(tmp_path):
    from visor_vllm.training.data import DataError

    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "none.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(BadSample):
        raise BadSample("x")


@pytest.mark.parametrize("processes", [1, 2])
def test_pre_encoded_samples_are_the_encoded_ones(encoder, folder, processes):
    """`pre_encode` (several worker processes, small chunks) gives every requested sample's
    tensors exactly, keeps bad samples as `Skipped` with their examples, and encodes a sample
    it was not asked for on access."""
    from visor_vllm.training.data import encoded_bytes, pre_encode

    recs = [_record("img.png" if i % 3 else "big.png", rid=f"r{i}") for i in range(9)]
    recs[4] = _record("missing.png", rid="gone")
    live = EncodedDataset(recs, encoder, folder)
    pre = pre_encode(EncodedDataset(recs, encoder, folder), [0, 1, 2, 3, 4, 5, 6, 7, 4],
                     processes=processes, chunk=2)
    assert sorted(pre.cache) == list(range(8)) and pre.complete
    assert pre[4] == Skipped("missing_image") and "gone" in pre.skipped.examples["missing_image"][0]
    assert pre.nbytes == sum(encoded_bytes(live[i]) for i in range(8))
    for i in (0, 1, 2, 3, 5, 6, 7, 8):  # 8 was not asked for: encoded on access
        a, b = pre[i], live[i]
        assert a.meta == b.meta
        for x, y in ((a.input_ids, b.input_ids), (a.labels, b.labels),
                     (a.pixel_values, b.pixel_values), (a.image_sizes, b.image_sizes)):
            assert x.dtype == y.dtype and torch.equal(x, y)
    capped = pre_encode(EncodedDataset(recs, encoder, folder), range(8), processes=processes,
                        chunk=2, limit_bytes=encoded_bytes(live[0]) + 1)
    assert sorted(capped.cache) == [0, 1] and not capped.complete  # stops past the limit
    assert capped[5].input_ids.equal(live[5].input_ids)  # the rest: encoded as drawn


def test_a_later_stage_reuses_the_processed_images_and_changes_no_byte(dense_ckpt,
                                                                     visor_ckpt_synth, folder):
    """`PixelStore`: what the dense phase's `pre_encode` processed, a VISOR encoder (its own
    template: the routing token) reuses as the very tensors, with the same bytes as its own
    encoding; an image file rewritten since, a processor with other settings, images given
    as bytes and a put past the bound are processed anew."""
    import copy
    import os
    import pickle

    from visor_vllm.training.data import PixelStore, image_processor_key, pre_encode

    recs = [_record("img.png" if i % 2 else "big.png", rid=f"r{i}") for i in range(6)]
    recs.append(_record({"bytes": (folder / "img.png").read_bytes()}, rid="bytes"))
    store = PixelStore()
    dense = SampleEncoder(dense_ckpt, pixels=store)
    first = pre_encode(EncodedDataset(recs, dense, folder), range(7), processes=2, chunk=2)
    assert len(store) == 2 and first.reused == 0  # one entry per image file; bytes: none

    visor = SampleEncoder(visor_ckpt_synth, pixels=store)
    fresh = SampleEncoder(visor_ckpt_synth)
    assert visor.image_key == dense.image_key
    later = pre_encode(EncodedDataset(recs, visor, folder), range(7), processes=2, chunk=2)
    assert later.reused == 6
    for i in range(7):
        a, b = later[i], fresh.encode(recs[i], folder)
        assert not torch.equal(a.input_ids, first[i].input_ids)  # VISOR's own template
        for x, y in zip(a.tensors, b.tensors):
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert (a.pixel_values is first[i].pixel_values) == (i < 6)  # shared, not copied
    assert visor.encode(recs[1], folder).pixel_values is first[1].pixel_values  # on access too

    Image.new("RGB", (32, 32), "green").save(folder / "img.png")  # rewritten: processed anew
    os.utime(folder / "img.png", ns=(1, 1))
    green = visor.encode(recs[1], folder).pixel_values
    assert torch.equal(green, fresh.encode(recs[1], folder).pixel_values)
    assert not torch.equal(green, first[1].pixel_values)

    other = copy.deepcopy(visor.processor.image_processor)
    other.image_mean = [0.25, 0.25, 0.25]
    assert store.get(store.key(image_processor_key(other), recs[0], folder)) is None
    assert store.get(store.key(visor.image_key, recs[0], folder)) is not None

    kept = first[0].pixel_values
    small = PixelStore(limit_bytes=kept.numel() * kept.element_size())
    assert not small.put(("k",), kept, first[0].image_sizes)  # the sizes pass the bound
    assert len(pickle.loads(pickle.dumps(store))) == 0  # a spawned worker: empty, not a copy
