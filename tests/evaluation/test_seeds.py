"""`visor-vllm report`: one seed's row from a hand-made served report, the router's bound."""

import pytest

from visor_vllm.evaluation.seeds import aggregate, markdown, seed_row


def _served_report(router_flops: float) -> dict:
    fams = {"easy": "colour_at", "hard": "largest"}
    cfg = lambda n, fl, e, h: {"budget": f"sa:{n}", "sa_layers_1based": list(range(1, 2 * n, 2)),
                               "n_sa": n, "accuracy": (e + h) / 2, "easy": e, "hard": h,
                               "flops_vs_dense": fl, "families": {fams["easy"]: e,
                                                                  fams["hard"]: h}}
    table = [cfg(1, 0.4, 1.0, 0.6), cfg(2, 0.5, 1.0, 0.8), cfg(4, 0.7, 1.0, 0.9)]
    router = {"accuracy": 0.95, "flops_vs_dense": router_flops,
              "mean_sa_layers": {"easy": 1.0, "hard": 4.0},
              "sa_layers_histogram": {"colour_at": {"1": 100}, "largest": {"4": 100}}}
    findings = {"source": "served", "finding1_cheapest_matches_dense_on_easy": True,
                "finding2_hard_rises_with_sa_layers": True,
                "finding3_router_spends_on_hard_and_keeps_accuracy": True}
    return {"seed": 3, "findings": findings, "wall_seconds": {"total": 60.0},
            "served": {"configs": table, "dense": {"accuracy": 0.95, "easy": 1.0, "hard": 0.9}},
            "router": {"served": router}}


def test_row_states_the_router_bound_and_whether_the_target_is_within_reach():
    row = seed_row(_served_report(router_flops=0.55))
    # min on colour_at, max on largest: (0.4 + 0.7) / 2 = 0.55 = 0.786x max, at 190/190 right
    assert row["router_bound_flops_vs_max"] == pytest.approx(0.55 / 0.7, abs=1e-4)
    assert row["router_bound_choice"] == {"colour_at": [1], "largest": [1, 3, 5, 7]}
    assert row["router_flops_vs_max"] == pytest.approx(0.7857, abs=1e-4)
    assert row["router_target"] is False and row["all_three"] is True
    agg = aggregate([row])
    assert agg["router_target_held"] == 0 and agg["router_target_reachable"] == 0
    assert "within reach of a per-family router (bound <= 0.7) on 0/1" in markdown([row], agg)


def test_row_without_a_served_histogram_has_no_bound():
    report = _served_report(router_flops=0.55)
    del report["router"]["served"]["sa_layers_histogram"]
    row = seed_row(report)
    assert row["router_bound_flops_vs_max"] is None and row["router_bound_choice"] is None


def test_the_table_names_the_machines_the_seeds_ran_on():
    zen1 = {"cpu": "AMD EPYC", "cpu_family": 23, "cpu_model": 1, "cpus": 2, "isa": "avx2"}
    zen4 = {**zen1, "cpu_family": 25, "cpu_model": 17, "isa": "avx512"}
    a, b = _served_report(0.55), _served_report(0.55)
    a["hosts"] = b["hosts"] = [zen1]
    rows = [seed_row(a), seed_row(b)]
    assert rows[0]["hosts"] == ["AMD EPYC (x86 family 23 model 1), 2 CPUs, AVX2"]
    assert markdown(rows, aggregate(rows)).endswith(
        "Machine: AMD EPYC (x86 family 23 model 1), 2 CPUs, AVX2.")
    b["hosts"], b["seed"] = [zen4], 4  # another machine: each seed says its own
    b["reused_training"] = {"from": "elsewhere", "hosts": [zen1]}  # trained on Zen 1
    rows = [seed_row(a), seed_row(b)]
    text = markdown(rows, aggregate(rows))
    assert "seed 3: AMD EPYC (x86 family 23 model 1), 2 CPUs, AVX2; seed 4: AMD EPYC (x86 " \
           "family 23 model 1), 2 CPUs, AVX2 + AMD EPYC (x86 family 25 model 17)" in text
    del a["hosts"]
    assert seed_row(a)["hosts"] == []  # a report from before machines were recorded


def test_the_table_says_whether_the_seeds_share_a_recipe():
    from visor_vllm.training.pipeline import recipe_config

    a, b = _served_report(0.55), _served_report(0.55)
    assert "Recipe: not recorded." in markdown([seed_row(a)], aggregate([seed_row(a)]))
    five = recipe_config(overrides={"preset": "synthetic-5sa", "seed": 3})
    a["recipe_config"], b["recipe_config"], b["seed"] = five, {**five, "seed": 4}, 4
    rows = [seed_row(a), seed_row(b)]
    assert rows[0]["preset"] == "synthetic-5sa"
    text = markdown(rows, aggregate(rows))
    assert "Recipe: the same on every seed (preset synthetic-5sa)." in text
    # a run from before the preset key: it takes the key's default, so it is named as differing
    older = {k: v for k, v in five.items() if k != "preset"}
    b["recipe_config"] = {**older, "seed": 4, "stage2": {**older["stage2"], "steps": 2500}}
    rows = [seed_row(a), seed_row(b)]
    assert rows[1]["preset"] == "synthetic"
    assert ("Recipe of seed 3 (preset synthetic-5sa); the others differ as follows: seed 4: "
            "preset='synthetic', stage2.steps=2500.") in markdown(rows, aggregate(rows))
    a["recipe_config"]["extra"] = None  # a key one run has (even null) and the other lacks
    rows = [seed_row(a), seed_row(b)]
    assert "seed 4: extra absent, preset=" in markdown(rows, aggregate(rows))
    assert markdown([], aggregate([])) == "No seeds."


def test_offline_rows_are_not_counted_as_out_of_the_bounds_reach():
    served, offline = _served_report(0.55), _served_report(0.55)
    del offline["router"]["served"]["sa_layers_histogram"]  # as an offline run: no bound
    rows = [seed_row(offline)]
    assert ("no per-family bound computed (it needs a router and the questions per family)."
            in markdown(rows, aggregate(rows)))
    rows = [seed_row(served), seed_row(offline)]
    assert ("within reach of a per-family router (bound <= 0.7) on 0/1 seeds with a bound "
            "computed (1 without).") in markdown(rows, aggregate(rows))
    # a served run's bound comes from its receipts only, never from counts passed for offline
    counts = {"colour_at": 100, "largest": 100}
    assert seed_row(offline, counts)["router_bound_flops_vs_max"] is None


def test_an_offline_run_gets_its_bound_from_its_own_split(tmp_path):
    import json

    from visor_vllm.evaluation.seeds import offline_questions, report

    rep = _served_report(0.55)
    rep["findings"]["source"] = "offline"  # the offline numbers: configs/dense/router at top level
    rep["configs"], rep["dense"] = rep["served"].pop("configs"), rep.pop("served")["dense"]
    rep["router"] = {"offline": {k: v for k, v in rep["router"]["served"].items()
                                 if k != "sa_layers_histogram"}}
    rep["recipe_config"] = {"eval": {"split": "val", "max_samples": 150}}
    run = tmp_path / "seed-3"
    (run / "data").mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(rep))
    lines = [json.dumps({"family": f, "families": [f]}) for f in ["colour_at", "largest"] * 100]
    lines.insert(1, "")  # a blank line is no record (as `load_records` reads the split)
    (run / "data" / "val.jsonl").write_text("\n".join(lines) + "\n")
    assert offline_questions(run, rep) == {"colour_at": 75, "largest": 75}  # the first 150
    row = report([run])["rows"][0]
    # as the served test's bound: min on colour_at, max on largest, 0.786x max
    assert row["router_bound_flops_vs_max"] == pytest.approx(0.55 / 0.7, abs=1e-4)
    assert row["router_bound_choice"] == {"colour_at": [1], "largest": [1, 3, 5, 7]}
    # one question per record under its family, as the evaluation counts a multi-turn record
    (run / "data" / "val.jsonl").write_text(json.dumps(
        {"family": "mixed", "families": ["colour_at", "colour_at", "largest"]}) + "\n")
    assert offline_questions(run, rep) == {"mixed": 1}
    (run / "data" / "val.jsonl").write_text("{not json\n")  # unreadable: no bound, no failure
    assert offline_questions(run, rep) is None and report([run])["rows"][0][
        "router_bound_flops_vs_max"] is None
    assert offline_questions(tmp_path / "elsewhere", rep) is None


def test_the_router_ratio_shows_its_paired_interval_when_the_run_kept_one():
    report = _served_report(router_flops=0.55)
    # 0.95 against max's 0.95; a run from before the interval shows the ratio alone
    assert "| 1.0 |" in markdown([seed_row(report)], aggregate([seed_row(report)]))
    report["router"]["served"]["accuracy_vs_max_ci"] = [0.9912, 1.0088]
    row = seed_row(report)
    assert row["router_accuracy_vs_max"] == 1.0 and row["router_accuracy_vs_max_ci"] == [0.9912, 1.0088]
    assert "| 1.0000 [0.991, 1.009] |" in markdown([row], aggregate([row]))
