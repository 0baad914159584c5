"""`visor-vllm recipe synthetic`, shrunk to seconds: every phase runs and the report is complete.

This is plumbing only: accuracies at this size are chance (docs/training.md has the full runs).
"""

import json

import pytest

from visor_vllm.training.pipeline import findings, run_synthetic

# the recipe's defaults (five SA-capable layers, nine families, 8 questions an image), tiny
TINY = {"data": {"n_train": 48, "n_val": 18, "n_test": 36, "n_label": 18}, "encoder": {"steps": 3},
        "dense": {"steps": 3, "batch_size": 4}, "stage1": {"steps": 2, "batch_size": 4},
        "stage2": {"steps": 4, "batch_size": 4}, "eval": {"batch_size": 16},
        "router": {"steps": 20}, "serve": {"budgets": ["auto", "configs"], "max_samples": 16},
        "save_every": 2, "log_every": 1}


def test_recipe_runs_every_phase_and_reports(tmp_path):
    report = run_synthetic(tmp_path / "r", quick=True, progress=False, overrides=TINY)
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["loss_curve"] == report["loss_curve"]
    assert [len(report["loss_curve"][s]) for s in ("dense", "stage1", "stage2")] == [3, 2, 4]
    assert set(report["dense"]) >= {"easy", "hard", "families", "easy_ci", "hard_ci"}
    lo, hi = report["dense"]["hard_ci"]
    assert lo <= report["dense"]["hard"] <= hi  # every accuracy carries its 95 % interval
    assert all(c["accuracy_ci"] and c["easy_ci"] for c in report["configs"])
    assert report["search"]["test"] == "paired" and report["labels"]["test"] == "point"
    assert len(report["configs"]) == 16  # every configuration stage 2 trained
    flops = [c["prefill_flops_vs_dense"] for c in report["configs"]]
    assert flops[0] == min(flops) and flops[-1] == max(flops) < 1
    assert all(c["easy"] is not None and c["hard"] is not None for c in report["configs"])
    assert report["encoder"]["colour"] >= 0 and report["image_tokens"] == 36
    # adaptive inference: search on val -> viable set -> labels -> router, all in the report
    viable = report["search"]["viable"]
    assert viable[0] == [0] and viable[-1] == [0, 2, 3, 5, 6]
    assert len(report["search"]["heatmap"]["rows"]) == 16
    assert set(report["labels"]["family"]) == set(report["dense"]["families"])
    assert set(report["labels"]["pooled"]) == set(report["dense"]["families"])
    on_disk_labels = json.loads((tmp_path / "r" / "labels.json").read_text())
    per = on_disk_labels["per_sample"]  # what `labels.rule` picks from: every rule is there
    assert set(per) == {"family", "oracle", "pooled"} and len(per["pooled"]) == len(per["family"])
    offline = report["router"]["offline"]
    assert set(offline["mean_sa_layers"]) == {"easy", "hard"} and 0 < offline["flops_vs_dense"] < 1
    assert "finding3_router_spends_on_hard_and_keeps_accuracy" in report["findings"]
    # the router's accuracy over max's carries a paired interval (None if max got nothing right)
    ci = report["findings"]["router_vs_costliest"]["accuracy_ratio_ci"]
    assert ci == offline["accuracy_vs_max_ci"]
    ratio = report["findings"]["router_vs_costliest"]["accuracy_ratio"]
    # centred on the router's ratio to the very configuration the findings call max
    assert ci is None if ratio is None else abs((ci[0] + ci[1]) / 2 - ratio) < 2e-4
    served = json.loads((tmp_path / "r" / "visor" / "config.json").read_text())
    assert served["sa_configs"] == viable  # DIR/visor is the routed checkpoint
    assert (tmp_path / "r" / "data" / "label.jsonl").read_text().count("\n") == 18
    # a rerun resumes: finished phases are not redone
    again = run_synthetic(tmp_path / "r", quick=True, progress=False, overrides=TINY)
    assert "dense" in again["wall_seconds"] and again["wall_seconds"]["dense"] < 5
    assert "data_label" not in again["wall_seconds"]
    # ... and its cumulative seconds still count the first invocation's work
    cum = again["wall_seconds_cumulative"]
    assert cum["total"] == round(report["wall_seconds"]["total"] + again["wall_seconds"]["total"], 1)
    assert cum["visor"] >= report["wall_seconds"]["visor"] and "data" in cum


def _row(n, easy, hard, flops):
    return {"n_sa": n, "easy": easy, "hard": hard, "accuracy": (easy + hard) / 2,
            "flops_vs_dense": flops}


def test_findings_from_numbers():
    table = [_row(1, 0.80, 0.60, 0.4), _row(2, 0.80, 0.70, 0.5), _row(2, 0.80, 0.62, 0.5),
             _row(3, 0.81, 0.75, 0.6)]
    router = {"accuracy": 0.775, "mean_sa_layers": {"easy": 1.0, "hard": 2.4},
              "flops_vs_dense": 0.47}
    f = findings({"easy": 0.81, "hard": 0.75}, table, router, source="served")
    assert f["finding1_cheapest_matches_dense_on_easy"]
    assert f["hard_accuracy_by_number_of_sa_layers"] == {1: 0.6, 2: 0.66, 3: 0.75}
    assert f["finding2_hard_rises_with_sa_layers"]
    assert f["finding3_router_spends_on_hard_and_keeps_accuracy"]  # 0.775 >= 0.99 * 0.78
    # each clause of finding 3 can fail on its own
    for bad in ({"accuracy": 0.70}, {"mean_sa_layers": {"easy": 2.0, "hard": 2.0}},
                {"flops_vs_dense": 0.6}):
        assert not findings({"easy": 0.81}, table, {**router, **bad})[
            "finding3_router_spends_on_hard_and_keeps_accuracy"]
    # finding 1 fails 3 points below dense; finding 2 fails on a flat curve
    assert not findings({"easy": 0.83}, table)["finding1_cheapest_matches_dense_on_easy"]
    flat = [_row(1, 0.8, 0.7, 0.4), _row(2, 0.8, 0.705, 0.5)]
    assert not findings({"easy": 0.8}, flat)["finding2_hard_rises_with_sa_layers"]
    assert "finding3_router_spends_on_hard_and_keeps_accuracy" not in findings({"easy": .8}, flat)


@pytest.mark.vllm
@pytest.mark.e2e
def test_whole_recipe_serves_and_evaluates(tmp_path):
    """The recipe's last phase: vllm serve of DIR/visor and of the dense model, then eval."""
    from visor_vllm.evaluation.recipe import run_recipe

    report = run_recipe(tmp_path / "r", quick=True, progress=False, overrides=TINY)
    served = report["served"]
    assert served["requests"] == 16 and set(served["dense"]) >= {"easy", "hard"}
    names = [p["budget"] for p in served["passes"]]
    assert names[0] == "auto" and names[1:] == [
        "sa:" + ",".join(str(i + 1) for i in c) for c in report["search"]["viable"]]
    assert [r["n_sa"] for r in served["configs"]] == [len(c) for c in report["search"]["viable"]]
    assert all(0 < r["flops_vs_dense"] < 1 for r in served["configs"])
    router = report["router"]["served"]
    assert set(router["mean_sa_layers"]) == {"easy", "hard"}
    assert 0 < router["flop_savings_vs_dense"] < 1
    assert "accuracy_vs_max_ci" in router  # paired with max's pass (None if max got none right)
    assert report["findings"]["source"] == "served"
    assert report["findings_offline"]["source"] == "offline"
    assert "served_eval" in report["wall_seconds"] and report["hosts"]
    assert (tmp_path / "r" / "serve" / "visor.log").exists()
    assert (tmp_path / "r" / "serve" / "dense.log").exists()


def test_seeds_run_one_after_another_resume_and_report(tmp_path):
    """`recipe synthetic --seeds 0,1 --no-serve`: two runs, a rerun skips them, one table."""
    from visor_vllm.evaluation.plot import render
    from visor_vllm.evaluation.recipe import run_seeds

    result = run_seeds(tmp_path / "s", [0, 1], quick=True, serve=False, progress=False,
                       overrides=TINY)
    assert [r["seed"] for r in result["rows"]] == [0, 1]
    assert result["aggregate"]["seeds"] == 2 and "all_three_held" in result["aggregate"]
    row = result["rows"][0]
    assert row["source"] == "offline" and row["dense_hard_ci"] and "router_flops_vs_max" in row
    assert "| seed |" in result["markdown"] and "Findings held:" in result["markdown"]
    stamp = (tmp_path / "s" / "seed-0" / "report.json").stat().st_mtime
    again = run_seeds(tmp_path / "s", [0, 1], quick=True, serve=False, progress=False,
                      overrides=TINY)
    assert (tmp_path / "s" / "seed-0" / "report.json").stat().st_mtime == stamp
    assert again["rows"] == result["rows"]
    assert render("seeds", tmp_path / "seeds.png", again).stat().st_size > 1000
    # one report never mixes recipes: finished seeds of another recipe are refused, by key
    other = {**TINY, "stage2": {**TINY["stage2"], "steps": 5}}
    with pytest.raises(ValueError, match=r"stage2\.steps: 4 there, 5 here"):
        run_seeds(tmp_path / "s", [0, 1], quick=True, serve=False, progress=False,
                  overrides=other)
    # a key added to the recipe after a run counts as its value then (the old behaviour),
    # also where today's default differs (pipeline.DEFAULTS_WHEN_ADDED)
    done = tmp_path / "s" / "seed-0" / "report.json"
    kept = done.read_text()
    prev = json.loads(kept)
    del prev["recipe_config"]["encoder"]["position_table"], prev["recipe_config"]["chat_template"]
    done.write_text(json.dumps(prev))
    with pytest.raises(ValueError, match=r"chat_template: 'chatml' there, 'compact' here, "
                                         r"encoder\.position_table: 0\.0 there, 1\.0 here"):
        run_seeds(tmp_path / "s", [0], quick=True, serve=False, progress=False, overrides=TINY)
    old = {**TINY, "chat_template": "chatml", "encoder": {**TINY["encoder"], "position_table": 0.0}}
    row = run_seeds(tmp_path / "s", [0], quick=True, serve=False, progress=False,
                    overrides=old)["rows"][0]
    assert row["recipe"]["chat_template"] == "chatml" and row["preset"] == "synthetic-5sa"
    done.write_text(kept)
    # another label test on the same trained models: only the adaptive part reruns
    holm = {**TINY, "labels": {"test": "holm"}}
    reused = run_seeds(tmp_path / "h", [0, 1], quick=True, serve=False, progress=False,
                       overrides=holm, reuse_from=tmp_path / "s")
    rep = json.loads((tmp_path / "h" / "seed-1" / "report.json").read_text())
    assert rep["labels"]["test"] == "holm" and rep["reused_training"]["from"].endswith("seed-1")
    assert set(rep["wall_seconds"]) >= {"search", "labels"} and "dense" in rep["wall_seconds"]
    assert rep["wall_seconds"]["dense"] < 5 and not {"data", "encoder"} & set(rep["wall_seconds"])
    src = json.loads((tmp_path / "s" / "seed-1" / "report.json").read_text())
    assert rep["dense"] == src["dense"] and rep["configs"] == src["configs"]  # the same models
    assert src["hosts"] and rep["reused_training"]["hosts"] == src["hosts"]  # trained there
    assert all(r["wall_seconds"] is None and r["reused_training"] for r in reused["rows"])
    png = next((tmp_path / "s" / "seed-0" / "data" / "images").iterdir())
    assert png.stat().st_ino == (tmp_path / "h" / "seed-0" / "data" / "images" / png.name
                                 ).stat().st_ino  # hard links: 100k images are not copied
    # a stage-2 change (here: longer, distilling the dense model) reuses data and the dense
    # model and retrains VISOR's stages only
    longer = {**TINY, "stage2": {**TINY["stage2"], "steps": 5, "distill": 0.5}}
    re2 = run_seeds(tmp_path / "v", [1], quick=True, serve=False, progress=False,
                    overrides=longer, reuse_from=tmp_path / "s")
    rep = json.loads((tmp_path / "v" / "seed-1" / "report.json").read_text())
    assert rep["reused_training"]["outputs"] == ["data", "dense-init", "dense-run", "visor-init"]
    assert rep["dense"] == src["dense"] and "visor" in rep["wall_seconds"]
    assert not {"data", "encoder", "convert"} & set(rep["wall_seconds"])
    assert len(rep["loss_curve"]["stage2"]) == 5 and len(src["loss_curve"]["stage2"]) == 4
    trained = (tmp_path / "v" / "seed-1" / "visor-run" / "recipe.yaml").read_text()
    assert "distill: 0.5" in trained and "dense-run/dense/model" in trained  # the teacher
    seconds = rep["reused_training"]["seconds_reused"]
    assert seconds > 0 and re2["rows"][0]["wall_seconds"] == round(
        rep["wall_seconds_cumulative"]["total"] + seconds, 1)
    # another VISOR schedule on the same dense model: converted again, both stages retrained
    four = {**TINY, "preset": "synthetic"}
    run_seeds(tmp_path / "p", [1], quick=True, serve=False, progress=False, overrides=four,
              reuse_from=tmp_path / "s")
    rep = json.loads((tmp_path / "p" / "seed-1" / "report.json").read_text())
    assert rep["reused_training"]["outputs"] == ["data", "dense-init", "dense-run"]
    assert rep["dense"] == src["dense"] and {"convert", "visor"} <= set(rep["wall_seconds"])
    assert not {"data", "encoder"} & set(rep["wall_seconds"])
    assert len(rep["configs"]) == 8 and max(r["n_sa"] for r in rep["configs"]) == 4
    assert json.loads((tmp_path / "p" / "seed-1" / "visor" / "config.json").read_text()
                      )["layer_types"][2:4] == ["self", "cross"]
    conv = src["wall_seconds_cumulative"].get("convert", 0.0)  # the conversion is not reused
    assert abs(rep["reused_training"]["seconds_reused"] - (seconds - conv)) < 0.15
    from visor_vllm.training.recipe import RecipeError

    with pytest.raises(RecipeError, match="another layer schedule"):  # nor resumed as another
        run_synthetic(tmp_path / "p" / "seed-1", quick=True, seed=1, progress=False,
                      overrides=TINY)
    with pytest.raises(ValueError, match=r"dense\.steps: 3 there, 2 here.*only eval, search"):
        run_seeds(tmp_path / "x", [0], quick=True, serve=False, progress=False,
                  overrides={**holm, "dense": {**TINY["dense"], "steps": 2}},
                  reuse_from=tmp_path / "s")
    with pytest.raises(ValueError, match="holds no finished run"):
        run_seeds(tmp_path / "x", [2], quick=True, serve=False, progress=False, overrides=holm,
                  reuse_from=tmp_path / "s")


def test_an_unknown_label_rule_fails_before_any_work(tmp_path):
    from visor_vllm.training.recipe import RecipeError

    with pytest.raises(RecipeError, match="labels.rule is one of"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "labels": {"rule": "cheapest"}})
    assert not (tmp_path / "r").exists()
    with pytest.raises(RecipeError, match="labels.test is one of"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "labels": {"test": "bonferroni"}})
    with pytest.raises(RecipeError, match="preset is one of"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "preset": "tiny"})
    with pytest.raises(RecipeError, match="search.test is one of"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "search": {"test": "holm"}})
    # a VISOR stage's values are checked before the dense phase, not after it
    with pytest.raises(RecipeError, match="stage stage2: sampling is"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "stage2": {"sampling": "cyclic"}})
    with pytest.raises(RecipeError, match="stage stage1: lr is a number, got 'fast'"):
        run_synthetic(tmp_path / "r", quick=True, progress=False,
                      overrides={**TINY, "stage1": {"lr": "fast"}})
    assert not (tmp_path / "r").exists()


def test_set_overrides_are_checked_against_the_recipe():
    from visor_vllm.training.pipeline import load_recipe, overrides_from_sets
    from visor_vllm.training.recipe import RecipeError

    recipe = load_recipe("synthetic")
    got = overrides_from_sets(["stage2.steps=2500", "chat_template=compact",
                               "encoder.position=true", "serve.budgets=[auto, min]"], recipe)
    assert got == {"stage2": {"steps": 2500}, "chat_template": "compact",
                   "encoder": {"position": True}, "serve": {"budgets": ["auto", "min"]}}
    with pytest.raises(RecipeError, match=r"no 'stage2\.step' \(there: .*steps"):
        overrides_from_sets(["stage2.step=2500"], recipe)
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        overrides_from_sets(["stage2.steps"], recipe)
    # the opt-in hard family: a list under a key whose default is null
    assert overrides_from_sets(["data.families=[colour_at, largest]"], recipe) == {
        "data": {"families": ["colour_at", "largest"]}}
    # a number where the recipe has one, read as YAML 1.2 reads it (2e-3 is not a string) ...
    assert overrides_from_sets(["stage2.lr=2e-3", "labels.ratio=1"], recipe) == {
        "stage2": {"lr": 0.002}, "labels": {"ratio": 1}}
    # ... and refused up front when it is not one (not after a 20-minute dense phase)
    for bad, match in (("stage2.lr=fast", "a number here .* got 'fast'"),
                       ("stage2.steps=2.5", "an integer here .* got 2.5"),
                       ("dense.batch_size=true", "an integer here .* got True")):
        with pytest.raises(RecipeError, match=match):
            overrides_from_sets([bad], recipe)


def test_cli_set_with_an_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    import argparse

    from visor_vllm.evaluation.recipe import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["recipe", "synthetic", "--out", str(tmp_path / "r"),
                              "--set", "dense.step=10"])
    assert args.func(args) == 2
    assert "the recipe has no 'dense.step'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_wall_ledger_counts_each_invocation_once(tmp_path):
    from visor_vllm.training.pipeline import WallLedger

    first = WallLedger(tmp_path)  # interrupted: phases but no total
    first.add("data", 3.0)
    first.add("dense", 4.04)
    second = WallLedger(tmp_path)  # finished: its own total, even where rounded phases sum higher
    second.add("dense", 2.06)
    second.add("visor", 2.06)
    second.add("total", 4.1)
    cum = second.cumulative()
    assert cum["total"] == 11.1 and cum["dense"] == 6.1 and cum["data"] == 3.0
    # each invocation that ran a phase records its machine; one machine is listed once
    hosts = second.hosts()
    assert len(hosts) == 1 and hosts[0]["cpus"] >= 1 and "cpu_family" in hosts[0]
    runs = json.loads((tmp_path / "wall_seconds.json").read_text())["invocations"]
    assert all("host" in r for r in runs)
    WallLedger(tmp_path)  # an invocation that ran nothing records no machine
    for r in runs:  # a ledger written before machines were recorded
        del r["host"]
    (tmp_path / "wall_seconds.json").write_text(json.dumps({"invocations": runs}))
    old = WallLedger(tmp_path)
    assert old.hosts() == [] and old.cumulative() == cum


def test_a_run_names_the_machines_of_the_runs_it_reused():
    from visor_vllm.training.pipeline import run_hosts

    zen1 = {"cpu": "AMD EPYC", "cpu_family": 23, "cpu_model": 1, "cpus": 2, "isa": "avx2"}
    zen4 = {**zen1, "cpu_family": 25, "cpu_model": 17, "isa": "avx512"}
    assert run_hosts({}) == [] and run_hosts({"hosts": [zen4]}) == [zen4]
    # trained on Zen 1 (its reuse marker carries the source's machines), evaluated on Zen 4
    assert run_hosts({"hosts": [zen4], "reused_training": {"hosts": [zen1]}}) == [zen1, zen4]
    assert run_hosts({"hosts": [zen1], "reused_training": {"hosts": [zen1]}}) == [zen1]


def test_encoder_pretraining_can_teach_each_cell_its_position():
    """``encoder.position``: the cell-local tower's tokens also classify their row and column
    (held-out accuracy reported); off by default, the recipe's measured choice."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.files import load_processor
    from visor_vllm.training import synthetic
    from visor_vllm.training.pipeline import load_recipe, pretrain_encoder

    assert load_recipe()["encoder"]["position"] is False
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        build_tiny_llava_onevision(d, seed=0, preset="synthetic", extra_corpus=synthetic.corpus())
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(d, local_files_only=True)
        acc = pretrain_encoder(model, load_processor(d), 120, 1e-2, 32, 0, progress=False,
                               position=True)
    assert {"colour", "shape", "row", "column"} <= set(acc)
    assert acc["row"] > 0.9 and acc["column"] > 0.9  # chance is 0.25
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert load_recipe()["encoder"]["position_weight"] == 1.0
    # the features' variance that position takes: measured, and smaller at a lower loss weight
    with tempfile.TemporaryDirectory() as d:
        build_tiny_llava_onevision(d, seed=0, preset="synthetic", extra_corpus=synthetic.corpus())
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(d, local_files_only=True)
        light = pretrain_encoder(model, load_processor(d), 120, 1e-2, 32, 0, progress=False,
                                 position=True, position_weight=0.03)
    assert set(acc["share"]) == {"position", "colour", "shape"}
    assert light["share"]["position"] < acc["share"]["position"] / 2


def test_encoder_position_table_is_a_frozen_row_plus_column_code():
    """``encoder.position_table``: SigLIP's position embedding becomes row + column tables and
    pretraining leaves it as it is, so the tokens keep an address linear in row and column."""
    import tempfile

    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.files import load_processor
    from visor_vllm.training import synthetic
    from visor_vllm.training.pipeline import load_recipe, pretrain_encoder

    assert load_recipe()["encoder"]["position_table"] == 1.0
    shares = {}
    for scale in (0.0, 1.0):
        with tempfile.TemporaryDirectory() as d:
            build_tiny_llava_onevision(d, seed=0, preset="synthetic",
                                       extra_corpus=synthetic.corpus())
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                d, local_files_only=True)
            tower = model.model.vision_tower
            table = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
            acc = pretrain_encoder(model, load_processor(d), 40, 1e-2, 16, 0, progress=False,
                                   position_table=scale)
            shares[scale] = acc["share"]["position"]
        if scale:
            g = synthetic.GRID
            t = table.detach().reshape(g, g, -1)                      # [row, column, d]
            # additive in row and column: t[r, c] = t[r, 0] + t[0, c] - t[0, 0]
            torch.testing.assert_close(t, t[:, :1] + t[:1, :] - t[:1, :1])
            assert 0.5 < float(t.std()) < 2.0  # std of row + column at scale 1: sqrt(2)
            # the same table on a rerun of the seed (the checkpoint is reproducible)
            rows = torch.randn(g, t.shape[-1], generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(t[:, 0] - t[0, 0], rows - rows[0])
    assert shares[1.0] > 5 * shares[0.0]  # trained with the tower, position is washed out


def test_variance_share_is_the_between_group_fraction():
    import torch

    from visor_vllm.training.pipeline import variance_share

    labels = torch.tensor([0, 0, 1, 1])
    assert variance_share(torch.tensor([[1.0], [1.0], [3.0], [3.0]]), labels) == 1.0  # all between
    assert variance_share(torch.tensor([[1.0], [3.0], [1.0], [3.0]]), labels) == 0.0  # all within
    h = torch.randn(64, 5)
    g = torch.randint(0, 4, (64,))
    means = torch.stack([h[g == k].mean(0) for k in g.unique()])
    counts = torch.stack([(g == k).sum() for k in g.unique()])
    want = (counts[:, None] * (means - h.mean(0)).pow(2)).sum() / (h - h.mean(0)).pow(2).sum()
    assert abs(variance_share(h, g) - float(want)) < 1e-5


def test_the_dense_minutes_of_a_chain_of_reuses_follow_back_to_their_run():
    from visor_vllm.training.pipeline import _dense_seconds

    trained = {"wall_seconds_cumulative": {"data": 10.0, "encoder": 5.0, "dense": 100.0,
                                           "convert": 1.0, "visor": 50.0, "total": 170.0}}
    assert _dense_seconds(trained) == 116.0
    every_model = {"wall_seconds_cumulative": {"dense": 0.5, "search": 9.0},
                   "reused_training": {"wall_seconds": trained["wall_seconds_cumulative"]}}
    assert _dense_seconds(every_model) == 116.0
    visor_again = {"wall_seconds_cumulative": {"dense": 0.5, "visor": 60.0},
                   "reused_training": {"seconds_reused": 116.0, "wall_seconds": {"dense": 0.5}}}
    assert _dense_seconds(visor_again) == 116.0


def test_a_run_recorded_before_a_key_reads_as_its_value_then():
    """A finished run's ``recipe_config`` that lacks a key ran with the key's value when it was
    added (the old behaviour), not with today's default where the two differ."""
    from visor_vllm.training.pipeline import DEFAULTS_WHEN_ADDED, recipe_config, recorded_config

    today = recipe_config()
    assert recorded_config(False, today) == today  # a run with every key reads as itself
    old = {k: v for k, v in today.items() if k not in ("preset", "chat_template")}
    old["labels"] = {k: v for k, v in today["labels"].items() if k != "test"}
    old["encoder"] = {k: v for k, v in today["encoder"].items() if k != "position_table"}
    old["data"] = {k: v for k, v in today["data"].items() if k != "families"}
    got = recorded_config(False, old)
    assert (got["preset"], got["chat_template"], got["labels"]["test"]) == (
        "synthetic", "chatml", "paired")
    assert got["encoder"]["position_table"] == 0.0 and got["data"]["families"] is None
    assert got["data"]["turns"] == today["data"]["turns"]  # recorded: kept as it ran
    assert recorded_config(False, {})["labels"]["ratio"] == today["labels"]["ratio"]
    for dotted, then in DEFAULTS_WHEN_ADDED.items():  # listed only where the default moved
        node = today
        for k in dotted.split("."):
            node = node[k]
        assert node != then, dotted
