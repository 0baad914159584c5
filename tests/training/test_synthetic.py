"""The synthetic task: deterministic, balanced, in the LLaVA conversation format."""

import json
import random

import pytest

from visor_vllm import cli
from visor_vllm.training import synthetic


def test_same_seed_same_sample_whatever_else_is_generated():
    a = synthetic.sample(3, "train", 17, synthetic.FAMILIES, 4)
    b = synthetic.sample(3, "train", 17, synthetic.FAMILIES, 4)
    c = synthetic.sample(4, "train", 17, synthetic.FAMILIES, 4)
    assert a["conversations"] == b["conversations"] and (a["image"] == b["image"]).all()
    assert (a["image"] != c["image"]).any()


def test_images_keep_their_pixels_and_stencils_are_built_once():
    """The pixels of a sample are pinned (a dataset written after a refactor is the same
    bytes: checked on seed 9's 110,800 images when the stencils became cached)."""
    import hashlib

    image = synthetic.sample(3, "train", 17, synthetic.FAMILIES, 4)["image"]
    assert hashlib.sha256(image.tobytes()).hexdigest()[:16] == "fe6830d23be8209d"
    assert synthetic._mask("circle") is synthetic._mask("circle")
    assert [int(synthetic._mask(s).sum()) for s in synthetic.SHAPES] == \
        [{"circle": 32, "square": 36, "triangle": 18, "cross": 28}[s] for s in synthetic.SHAPES]
    with pytest.raises(ValueError):  # read-only: a caller cannot corrupt the cache
        synthetic._mask("cross")[0, 0] = True
    with pytest.raises(synthetic.SyntheticTaskError):
        synthetic._mask("star")


def test_answers_follow_the_scene():
    cells = [[None] * 4 for _ in range(4)]
    cells[0][0], cells[1][0], cells[0][1] = ("red", "circle"), ("red", "square"), ("blue", "cross")
    scene = synthetic.Scene(tuple(map(tuple, cells)))
    rng = random.Random(0)
    assert synthetic.ask("vsame", scene, rng) == ("how many same below", "one")
    assert synthetic.ask("count", scene, rng)[1] in ("two", "zero", "one")
    q, a = synthetic.ask("below", scene, rng)
    assert (q, a) in {("colour below the red circle", "red"),
                      ("colour below the blue cross", "none"),
                      ("colour below the red square", "none")}


@pytest.mark.parametrize("family", ["exists", "hpair", "vpair"])
def test_yes_no_families_are_balanced(family):
    answers = [synthetic.sample(0, "test", i, [family], 1)["conversations"][1]["value"]
               for i in range(200)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_every_family_is_easy_or_hard():
    assert set(synthetic.GROUP) == set(synthetic.FAMILIES + synthetic.OPTIONAL)
    assert set(synthetic.HARD) == {"below", "vpair", "vsame"}
    assert synthetic.OPTIONAL == ("largest", "group_at")
    assert all(synthetic.GROUP[f] == "hard" for f in synthetic.OPTIONAL)
    assert not set(synthetic.OPTIONAL) & set(synthetic.FAMILIES)  # opt-in: default unchanged


def test_largest_group_is_4_connected_and_ignores_colour():
    grid = ["XX..",
            ".X.X",
            "...X",
            "X..X"]  # groups: 3 (top left), 3 (right column), 1 (bottom left); diagonals apart
    colours = iter(["red", "blue", "green", "yellow"] * 4)
    cells = tuple(tuple((next(colours), "circle") if ch == "X" else None for ch in row)
                  for row in grid)
    scene = synthetic.Scene(cells)
    assert synthetic.largest_group(scene) == 3
    assert synthetic.ask("largest", scene, random.Random(0)) == (
        "how many in the largest group", "three")
    assert synthetic.largest_group(synthetic.Scene(((None,) * 4,) * 4)) == 0
    full = synthetic.Scene(((("red", "cross"),) * 4,) * 4)
    assert synthetic.ask("largest", full, random.Random(0))[1] == "twelve"  # 16, capped
    # opt-in through the families list; its group is written with the dataset
    rec = synthetic.sample(0, "test", 0, ["largest"], 1)
    assert rec["family"] == "largest" and rec["conversations"][1]["value"] in synthetic.NUMBERS


def test_group_at_follows_the_group_from_its_cell():
    grid = ["XX..",
            ".X.X",
            "...X",
            "X..X"]  # the same three groups as above
    cells = tuple(tuple(("red", "circle") if ch == "X" else None for ch in row) for row in grid)
    scene = synthetic.Scene(cells)
    assert [synthetic.group_size(scene, *rc) for rc in ((0, 0), (1, 1), (2, 3), (3, 0))] == [
        3, 3, 3, 1]
    assert synthetic.group_size(scene, 0, 2) == 0  # an empty cell
    assert sorted(map(len, synthetic.groups(scene))) == [1, 3, 3]
    # the query names an occupied cell, 1-based, and the answer is that cell's group
    for seed in range(30):
        q, a = synthetic.ask("group_at", scene, random.Random(seed))
        r, c = (int(x) - 1 for x in q.removeprefix("how many in the group at ").split())
        assert scene.at(r, c) is not None and a == synthetic.NUMBERS[
            synthetic.group_size(scene, r, c)]
    snake = synthetic.Scene(tuple(
        tuple(("blue", "square") if r % 2 == 0 or c == (3 if r == 1 else 0) else None
              for c in range(4)) for r in range(4)))  # rows 0 and 2 full, joined at the ends
    assert synthetic.group_size(snake, 0, 0) == 10  # a path that turns twice, every cell joined
    full = synthetic.Scene(((("red", "cross"),) * 4,) * 4)
    assert synthetic.ask("group_at", full, random.Random(0))[1] == "twelve"  # 16, capped
    empty = synthetic.Scene(((None,) * 4,) * 4)
    assert synthetic.ask("group_at", empty, random.Random(0))[1] == "zero"


def test_an_opt_in_family_is_written_with_its_group(tmp_path):
    out = synthetic.write_dataset(tmp_path / "d", n_train=2, n_val=1, n_test=9, progress=False,
                                  families=synthetic.FAMILIES + synthetic.OPTIONAL)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["groups"]["largest"] == meta["groups"]["group_at"] == "hard"
    assert meta["families"][-2:] == ["largest", "group_at"]


def test_cli_writes_llava_jsonl(tmp_path):
    out = tmp_path / "d"
    assert cli.main(["data", "synth", str(out), "--n-train", "5", "--n-val", "2", "--n-test",
                     "8", "--turns", "3"]) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 5 and len(train[0]["conversations"]) == 6
    assert train[0]["conversations"][0]["value"].startswith("<image>\n")
    assert (out / train[0]["image"]).exists()
    assert {r["family"] for r in test} == set(synthetic.FAMILIES)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["groups"]["vsame"] == "hard"


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    assert cli.main(["data", "synth", str(tmp_path / "x"), "--families", "nope"]) == 2
    assert "unknown families" in capsys.readouterr().err


def test_label_split_and_add_split(tmp_path):
    from visor_vllm.training.synthetic import FAMILIES, SyntheticTaskError, add_split, write_dataset

    out = write_dataset(tmp_path / "d", n_train=2, n_val=1, n_test=1, n_label=8, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"]["label"] == {"samples": 8, "turns": 1}
    lines = [json.loads(x) for x in (out / "label.jsonl").read_text().splitlines()]
    assert [r["family"] for r in lines] == list(FAMILIES)  # one question each, families in turn
    # a later split of an existing dataset: same seed and families, its own stream
    path = add_split(out, "extra", 3)
    assert path.read_text().count("\n") == 3
    assert json.loads((out / "dataset.json").read_text())["splits"]["extra"]["samples"] == 3
    assert (out / "images" / "extra-000002.png").exists()
    with pytest.raises(SyntheticTaskError, match="dataset.json"):
        add_split(tmp_path / "nothing", "label", 3)


def test_a_split_written_by_several_processes_is_the_same_bytes(tmp_path, monkeypatch):
    """`_write_split` spreads samples over processes from `PARALLEL_FROM` on (a spawned pool)."""
    kw = dict(n_train=40, n_val=3, n_test=5, turns=8, progress=False)
    one = synthetic.write_dataset(tmp_path / "one", **kw)
    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 10)
    monkeypatch.setattr("visor_vllm.training.machine.usable_cpus", lambda: 2)
    two = synthetic.write_dataset(tmp_path / "two", **kw)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 3 + 1 + 40 + 3 + 5 and files == sorted(
        p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
