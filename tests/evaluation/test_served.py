"""`visor-vllm eval`: accuracy and FLOPs through a running `vllm serve` of a trained-format checkpoint."""

import json

import pytest

from visor_vllm.evaluation.served import budgets_for, requests_for

pytestmark = []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from visor_vllm.training.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ev") / "d", n_train=1, n_val=1, n_test=16,
                         progress=False)


def test_requests_are_the_first_question_with_its_image(data):
    reqs = requests_for(data / "test.jsonl")
    assert len(reqs) == 16
    content = reqs[0]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1]["type"] == "text" and reqs[0]["answer"]


def test_budget_passes():
    assert [n for n, _ in budgets_for([[0], [0, 2]], ["min", "configs", "none"])] == [
        "min", "sa:1", "sa:1,3", "none"]
    with pytest.raises(ValueError, match="sa_configs"):
        budgets_for(None, ["configs"])
    with pytest.raises(ValueError, match="unknown budget"):
        budgets_for(None, ["lots"])


@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.parametrize("preset, full", [("synthetic-5sa", "sa:1,3,4,6,7"),
                                          ("synthetic-late-ca", "sa:1,2,3,4,5")])
def test_eval_through_the_server(tmp_path_factory, data, preset, full):
    from visor_vllm import cli
    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.training.synthetic import corpus

    from ..serving.conftest import serving

    dense = build_tiny_llava_onevision(tmp_path_factory.mktemp("dn") / "c", preset="synthetic",
                                       extra_corpus=corpus())
    # the five-SA schedules (16 configurations, adjacent SA layers; late-CA's router after
    # layer 0): the four-SA one is served by tests/training (test_serve_trained)
    ckpt = convert(dense, tmp_path_factory.mktemp("vs") / "c", preset=preset,
                   init="random", progress=False)
    out = tmp_path_factory.mktemp("res") / "eval.json"
    with serving(tmp_path_factory, ckpt=ckpt) as (base, log):
        assert cli.main(["eval", str(data / "test.jsonl"), "--base-url", base, "--budgets",
                         "min,max,configs,auto", "--checkpoint", str(ckpt), "--out",
                         str(out)]) == 0
    res = json.loads(out.read_text())
    names = [p["budget"] for p in res["passes"]]
    assert names[:2] == ["min", "max"] and full in names and names[-1] == "auto"
    assert len(names) == 2 + 16 + 1  # min, max, every configuration, auto
    by = {p["budget"]: p for p in res["passes"]}
    assert 0 < by["min"]["flops_vs_dense"] < by["max"]["flops_vs_dense"] < 1
    assert by["min"]["mean_sa_layers"]["easy"] == 1 and by["max"]["mean_sa_layers"]["hard"] == 5
    assert set(by["min"]["groups"]) == {"easy", "hard"}
    assert all(0 <= p["accuracy"] <= 1 and p["requests"] == 16 for p in res["passes"])
