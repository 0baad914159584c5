"""``visor-vllm report RUN_DIR...``: the paper's three findings over many seeds, in one table.

What. `seed_row` reads one recipe run's ``report.json`` (`visor_vllm.evaluation.recipe`) and
states, per seed: which of the three findings held (judged on the served numbers when the run
served, on the offline ones otherwise: the report's own ``findings``), dense easy/hard with
their 95 % intervals, the router's accuracy as a fraction of the costliest configuration's and
its FLOPs as a fraction of the costliest's and of dense, the mean SA layers it spent on easy
and hard, the machines it ran on (`visor_vllm.training.machine`; minutes and trained numbers
both depend on the CPU), and the run's wall time (``--reuse-training``: none for a run that
reused every model, those were that run's minutes; for one that retrained VISOR on a reused
dense model, its own plus the source's seconds for what it reused).

Beside them, the router's bound (``router_bound_flops_vs_max``,
`visor_vllm.training.labels.cheapest_mix`): the fewest FLOPs vs max that any per-family choice
of the evaluated configurations needs to keep 99 % of max's accuracy on these same questions
(questions per family from the served receipts, or for an offline run from its own data
split, `offline_questions`); above 0.7 the router target is out of reach of per-family
routing on that seed, whatever the labels. The router's ratio to max carries its paired 95 %
interval where the run kept one (`visor_vllm.training.stats.ratio_interval`; runs from before
2026-12-06 did not): a seed at 98.5 % whose interval holds 99 % missed on noise the test
questions cannot tell apart, which the table shows and the findings do not excuse.
`aggregate` counts the seeds each finding held on (and those whose bound is within the
target) and the range of the router's ratios;
`markdown` prints both as docs/training.md's table; `points` keeps every seed's
accuracy-vs-FLOPs points for ``visor-vllm plot seeds``.

Runs given together need not share a recipe (a campaign may join runs from several
directories): each row carries its ``recipe`` (the run's ``recipe_config``, a key added to the
recipe since taking its default) and ``preset``, and the table's recipe line names every value
in which a seed's recipe differs from the first recorded one.

The findings and their tolerances are `visor_vllm.training.pipeline.findings`, unchanged: a
seed that misses one is reported as missing it.

Footguns. A directory holding ``seed-*/report.json`` stands for all its seeds; runs without a
router (one configuration) have no finding 3.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from visor_vllm.training.labels import cheapest_mix
from visor_vllm.training.machine import label
from visor_vllm.training.data import load_records
from visor_vllm.training.pipeline import (ABSENT, costliest, recipe_value_differences,
                                          recorded_config, row_flops, run_hosts, run_seconds)

TARGET_ACCURACY_RATIO = 0.99   # the router keeps >= 99 % of the costliest configuration's ...
TARGET_FLOPS_VS_MAX = 0.7      # ... at <= 0.7x its FLOPs (the synthetic-findings issue)


class ReportInputError(ValueError):
    """A path that holds no recipe report.json."""


def find_reports(paths: list[str | Path]) -> list[Path]:
    """Every ``report.json`` named: run dirs, report files, or parents of ``seed-*`` runs."""
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif (p / "report.json").exists():
            out.append(p / "report.json")
        elif sorted(p.glob("seed-*/report.json")):
            out += sorted(p.glob("seed-*/report.json"),
                          key=lambda f: int(f.parent.name.split("-")[1]))
        else:
            raise ReportInputError(f"{p}: no report.json (nor seed-*/report.json) there")
    return out


def _served(report: dict) -> bool:
    """Whether the report's findings were judged on the served numbers."""
    return report.get("findings", {}).get("source") == "served"


def _sources(report: dict) -> tuple[list[dict], dict, dict | None]:
    """``(configurations, dense, router)`` as the report's findings judged them: the served
    numbers when the run served, the offline ones otherwise."""
    served = _served(report)
    table = report["served"]["configs"] if served else report.get("configs", [])
    dense = report["served"]["dense"] if served else report["dense"]
    router = (report.get("router") or {}).get("served" if served else "offline")
    return table, dense, router


def _wall_seconds(report: dict, reused: dict | None) -> float | None:
    """The run's minutes: its own; plus the source's dense phases where it reused only those
    (VISOR retrained); none where it reused every model (those minutes were the source's)."""
    own = run_seconds(report).get("total")
    if not reused:
        return own
    if "seconds_reused" in reused and own is not None:
        return round(own + reused["seconds_reused"], 1)
    return None


def _recipe(report: dict) -> dict | None:
    """The recipe the run used, keys added since then at their defaults then
    (`recorded_config`, as `reuse_training` reads an older run); none for a report without
    one (hand-made, or older than the key)."""
    if not report.get("recipe_config"):
        return None
    return recorded_config(bool(report.get("quick")), report["recipe_config"])


def offline_questions(run_dir: Path, report: dict) -> dict[str, int] | None:
    """Questions per family of the split the run's offline evaluation read: its
    ``data/<eval.split>.jsonl`` read as `visor_vllm.training.evaluate.evaluate` reads it
    (`load_records`, the first ``eval.max_samples``), one question per record under its
    ``family`` (as `visor_vllm.training.evaluate.summarise` counts; a multi-turn record is one
    question of family ``mixed``). None where that file is not there (a report copied away from
    its run) or a record cannot be read: no bound, the report goes on.

    Footgun: a record the evaluation skipped (too long for ``max_length``, image missing) is
    still counted here; the synthetic recipe's prompts are a fifth of ``max_length``."""
    ev = (_recipe(report) or {}).get("eval", {})
    path = Path(run_dir) / "data" / f"{ev.get('split', 'test')}.jsonl"
    try:
        records = load_records(path)[:ev.get("max_samples")]
    except (OSError, ValueError):  # DataError: not there
        return None
    if any(not isinstance(r, dict) or "_bad" in r for r in records):  # a line not JSON
        return None
    return dict(Counter(r.get("family", "all") for r in records))


def seed_row(report: dict, questions: dict[str, int] | None = None) -> dict:
    """One seed's line: findings, dense, router vs max and vs dense (see the module docstring).
    ``questions``: per-family question counts for the bound of an offline run."""
    f = report.get("findings", {})
    recipe = _recipe(report)
    table, dense, router = _sources(report)
    reused = report.get("reused_training")
    full = costliest(table) if table else None
    row = {"seed": report.get("seed"), "source": f.get("source"),
           "finding1": f.get("finding1_cheapest_matches_dense_on_easy"),
           "finding2": f.get("finding2_hard_rises_with_sa_layers"),
           "finding3": f.get("finding3_router_spends_on_hard_and_keeps_accuracy"),
           "dense_easy": dense.get("easy"), "dense_easy_ci": dense.get("easy_ci"),
           "dense_hard": dense.get("hard"), "dense_hard_ci": dense.get("hard_ci"),
           "hard_by_sa_layers": f.get("hard_accuracy_by_number_of_sa_layers"),
           "wall_seconds": _wall_seconds(report, reused),
           "hosts": [label(h) for h in run_hosts(report)],
           "preset": recipe.get("preset") if recipe else None, "recipe": recipe,
           **({"reused_training": reused["from"]} if reused else {})}
    if router and full:
        fr = row_flops(full)
        row.update({
            "router_accuracy": router["accuracy"], "router_accuracy_ci": router.get("accuracy_ci"),
            "max_accuracy": full["accuracy"], "max_accuracy_ci": full.get("accuracy_ci"),
            "router_accuracy_vs_max": round(router["accuracy"] / full["accuracy"], 4)
            if full["accuracy"] else None,
            "router_accuracy_vs_max_ci": router.get("accuracy_vs_max_ci"),  # paired, if kept
            "router_flops_vs_max": round(router["flops_vs_dense"] / fr, 4)
            if router.get("flops_vs_dense") is not None and fr else None,
            "router_flops_vs_dense": router.get("flops_vs_dense"),
            "router_sa_layers_easy_hard": [(router.get("mean_sa_layers") or {}).get(g)
                                           for g in ("easy", "hard")]})
        row.update(_bound(table, full, router, None if _served(report) else questions))
        row["router_target"] = bool(
            row["router_accuracy_vs_max"] is not None and row["router_flops_vs_max"] is not None
            and row["router_accuracy_vs_max"] >= TARGET_ACCURACY_RATIO
            and row["router_flops_vs_max"] <= TARGET_FLOPS_VS_MAX)
    row["all_three"] = bool(row["finding1"] and row["finding2"] and row["finding3"])
    return row


def _bound(table: list[dict], full: dict, router: dict,
           questions: dict[str, int] | None = None) -> dict:
    """The router's bound (module docstring). Questions per family come from the router's
    served histogram (every question gets one receipt), else from ``questions`` (an offline
    run's split); neither, no bound."""
    hist = router.get("sa_layers_histogram") or {}
    questions = {f: sum(h.values()) for f, h in hist.items()} or questions or {}
    rows = [r for r in table if row_flops(r) and set(r.get("families") or {}) >= set(questions)]
    if not questions or full not in rows or not row_flops(full):
        return {"router_bound_flops_vs_max": None, "router_bound_choice": None}
    b = cheapest_mix([row_flops(r) for r in rows],
                     [{f: round(r["families"][f] * n) for f, n in questions.items()} for r in rows],
                     questions, rows.index(full), TARGET_ACCURACY_RATIO)
    return {"router_bound_flops_vs_max": round(b["flops"] / row_flops(full), 4),
            "router_bound_choice": {f: rows[c].get("sa_layers_1based", rows[c]["n_sa"])
                                    for f, c in sorted(b["choice"].items())}}


def points(report: dict) -> dict:
    """A seed's accuracy-vs-FLOPs points: every configuration, the router, dense (served
    numbers when the run served)."""
    table, dense, router = _sources(report)
    return {"seed": report.get("seed"),
            "configs": [{"n_sa": r["n_sa"], "flops_vs_dense": row_flops(r),
                         "accuracy": r["accuracy"]} for r in table],
            "router": None if not router else {"flops_vs_dense": router.get("flops_vs_dense"),
                                               "accuracy": router["accuracy"]},
            "dense": dense["accuracy"]}


def aggregate(rows: list[dict]) -> dict:
    def spread(key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return {"min": min(v), "mean": round(statistics.fmean(v), 4), "max": max(v)} if v else None

    return {"seeds": len(rows),
            **{f"{k}_held": sum(bool(r[k]) for r in rows)
               for k in ("finding1", "finding2", "finding3", "all_three")},
            "router_target_held": sum(bool(r.get("router_target")) for r in rows),
            "router_target_reachable": sum(r.get("router_bound_flops_vs_max") is not None
                                           and r["router_bound_flops_vs_max"] <= TARGET_FLOPS_VS_MAX
                                           for r in rows),
            "router_bound_known": sum(r.get("router_bound_flops_vs_max") is not None
                                      for r in rows),
            "router_accuracy_vs_max": spread("router_accuracy_vs_max"),
            "router_flops_vs_max": spread("router_flops_vs_max"),
            "router_flops_vs_dense": spread("router_flops_vs_dense"),
            "wall_seconds": spread("wall_seconds")}


def _ci(v, ci) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _ratio(v, ci) -> str:
    """A router ratio with its paired interval where the run kept one (older runs did not)."""
    if v is None:
        return "-"
    return f"{v:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else str(v)


def _num(x) -> str:
    return "-" if x is None else str(x)


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def markdown(rows: list[dict], agg: dict) -> str:
    """The per-seed table and the aggregate line (docs/training.md's format)."""
    if not rows:
        return "No seeds."
    head = ("| seed | 1: min = dense on easy | 2: hard rises with SA | 3: router | "
            "dense easy | dense hard | router acc / max | router FLOPs / max | "
            "bound FLOPs / max | SA layers easy / hard | minutes |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        sa = r.get("router_sa_layers_easy_hard") or [None, None]
        sa_txt = " / ".join("-" if x is None else f"{x:.2f}" for x in sa)
        lines.append(
            f"| {r['seed']} | {_yes(r['finding1'])} | {_yes(r['finding2'])} | "
            f"{_yes(r['finding3'])} | {_ci(r['dense_easy'], r['dense_easy_ci'])} | "
            f"{_ci(r['dense_hard'], r['dense_hard_ci'])} | "
            f"{_ratio(r.get('router_accuracy_vs_max'), r.get('router_accuracy_vs_max_ci'))} | "
            f"{_num(r.get('router_flops_vs_max'))} | "
            f"{_num(r.get('router_bound_flops_vs_max'))} | {sa_txt} | "
            f"{'-' if r['wall_seconds'] is None else round(r['wall_seconds'] / 60, 1)} |")
    n = agg["seeds"]
    lines.append("")
    lines.append(f"Findings held: 1 on {agg['finding1_held']}/{n}, 2 on {agg['finding2_held']}/{n}, "
                 f"3 on {agg['finding3_held']}/{n}; all three on {agg['all_three_held']}/{n}. "
                 f"Router >= {TARGET_ACCURACY_RATIO:.0%} of max's accuracy at <= "
                 f"{TARGET_FLOPS_VS_MAX}x its FLOPs on {agg['router_target_held']}/{n}; "
                 + _reach(agg) + ".")
    lines.append(_recipe_line(rows))
    lines.append(_hosts_line(rows))
    return "\n".join(lines)


def _reach(agg: dict) -> str:
    """The bound's count, over the seeds that have one (a run needs its per-family question
    counts: served receipts, or its data split beside the report)."""
    known, n = agg["router_bound_known"], agg["seeds"]
    if not known:
        return "no per-family bound computed (it needs a router and the questions per family)"
    return (f"within reach of a per-family router (bound <= {TARGET_FLOPS_VS_MAX}) on "
            f"{agg['router_target_reachable']}/{known}"
            + ("" if known == n else f" seeds with a bound computed ({n - known} without)"))


def _recipe_line(rows: list[dict]) -> str:
    """One recipe, or each seed's values that differ from the first recorded one (the seed
    aside)."""
    known = [r for r in rows if r.get("recipe")]
    if not known:
        return "Recipe: not recorded."
    base, notes = known[0], []
    for r in rows:
        if r is base:
            continue
        if not r.get("recipe"):
            notes.append(f"seed {r['seed']}: not recorded")
            continue
        diff = [f"{k} absent" if here is ABSENT else f"{k}={here!r}"
                for k, _, here in recipe_value_differences(base["recipe"], r["recipe"])]
        if diff:
            notes.append(f"seed {r['seed']}: " + ", ".join(diff))
    if not notes:
        return f"Recipe: the same on every seed (preset {base['preset']})."
    return (f"Recipe of seed {base['seed']} (preset {base['preset']}); the others differ as "
            "follows: " + "; ".join(notes) + ".")


def _hosts_line(rows: list[dict]) -> str:
    """Where the seeds ran: one line for one machine, else each seed's (a reused model's
    machine first)."""
    each = [" + ".join(r.get("hosts") or ["not recorded"]) for r in rows]
    if len(set(each)) == 1:
        return f"Machine: {each[0]}."
    return "Machines: " + "; ".join(f"seed {r['seed']}: {h}" for r, h in zip(rows, each)) + "."


def report(paths: list[str | Path]) -> dict:
    """Rows, aggregate, points and the markdown table of every report under ``paths``."""
    files = find_reports(paths)
    reports = [json.loads(f.read_text()) for f in files]
    rows = [seed_row(r, None if _served(r) else offline_questions(f.parent, r))
            for f, r in zip(files, reports)]
    agg = aggregate(rows)
    return {"runs": [str(f.parent) for f in files], "rows": rows, "aggregate": agg,
            "points": [points(r) for r in reports], "markdown": markdown(rows, agg)}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="the three findings over several recipe runs "
                                             "(seeds): a table and its aggregate")
    p.add_argument("runs", nargs="+", help="run dirs (or their report.json, or a dir of seed-*)")
    p.add_argument("--out", help="write the JSON (rows, aggregate, points) here too")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        out = report(args.runs)
    except (ReportInputError, OSError, KeyError, ValueError) as e:
        print(f"visor-vllm report: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(out["markdown"])
    return 0
