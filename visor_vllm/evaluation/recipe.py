"""``visor-vllm recipe synthetic``: train everything, then serve it and measure it as users get it.

What. `run_recipe` runs the training side (`visor_vllm.training.pipeline.run_synthetic`: data,
dense baseline, convert, stage 1, stage 2, search, pseudo-labels, router; offline accuracy of
every model) and then, unless ``serve=False``:

1. ``vllm serve DIR/visor`` (the routed checkpoint, with the receipts middleware) and
   `visor_vllm.evaluation.served.evaluate_served` on the test split: the ``auto`` budget (the
   router) and every viable configuration (``visor_sa_layers``), FLOPs from the receipts;
2. ``vllm serve`` of the dense LLaVA-OneVision (vLLM's own model, no VISOR code) the same way
   (both servers start at once, `visor_vllm.evaluation.launch.served_together`: a start-up is
   mostly one CPU's work, so the pair is ready in ~31 s against ~45 s one after the other on
   the 2-vCPU Xeon; the idle one costs ~3 % of a core);
3. ``report.json`` gains ``served`` (every pass, per family; agreement with the offline
   numbers), ``router.served`` (accuracy on easy and hard, mean SA layers chosen on each, FLOPs
   vs dense) and ``findings`` judged on the served numbers (the offline ones stay as
   ``findings_offline``).

Why served. The offline numbers use the trainer's forward, teacher-forced; the served ones go
through the chat template, vLLM's kernels, the first-pass router and greedy decoding. Both are
kept, and their per-sample agreement is reported, so a serving bug cannot hide.

Footguns. Serving needs the ``vllm`` CLI of this environment and two free CPU cores' worth of
patience (~120 requests/s for VISOR at 64 in flight, 2-vCPU Xeon). Server logs go to
``DIR/serve/``. Both servers are up during the VISOR passes: two KV caches of 1 GiB each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from visor_vllm.allocator import find_tcmalloc
from visor_vllm.evaluation.launch import ServerError, served_together
from visor_vllm.evaluation.served import evaluate_served
from visor_vllm.training.evaluate import with_ci
from visor_vllm.training.stats import ratio_interval
from visor_vllm.training.pipeline import (WallLedger, costliest, findings, recipe_config,
                                          recipe_differences, recorded_config, run_synthetic)


def run_recipe(out: str | Path, quick: bool = False, seed: int | None = None,
               serve: bool = True, progress: bool = True, overrides: dict | None = None,
               reuse_from: str | Path | None = None) -> dict:
    """The whole recipe into ``out``; returns (and writes) ``out/report.json``.

    ``reuse_from``: a finished run whose trained models ``out`` starts from
    (`visor_vllm.training.pipeline.run_synthetic`)."""
    if serve:  # a bad VISOR_TCMALLOC fails here, not at the servers' start after training
        find_tcmalloc()
    report = run_synthetic(out, quick=quick, seed=seed, progress=progress, overrides=overrides,
                           reuse_from=reuse_from)
    if not serve:
        return report
    out = Path(out)
    cfg = report["recipe_config"]
    t0 = time.time()
    report = serve_and_evaluate(out, report, cfg.get("serve", {}), progress)
    served_s = round(time.time() - t0, 1)
    report["wall_seconds"]["served_eval"] = served_s
    report["wall_seconds"]["total"] = round(report["wall_seconds"]["total"] + served_s, 1)
    ledger = WallLedger(out)  # a new entry: this invocation's served pass
    ledger.add("served_eval", served_s)
    ledger.add("total", served_s)
    report["wall_seconds_cumulative"] = ledger.cumulative()
    report["hosts"] = ledger.hosts()
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def serve_and_evaluate(out: Path, report: dict, sc: dict, progress: bool = True) -> dict:
    """Serve ``out/visor`` and the dense model, evaluate both; the report with ``served``."""
    data = out / "data" / f"{sc.get('split', 'test')}.jsonl"
    visor = out / "visor"
    dense = out / "dense-run" / "dense" / "model"
    configs = json.loads((visor / "config.json").read_text())["sa_configs"]
    conc = sc.get("concurrency", 64)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise ValueError(f"serve.concurrency is a number of requests >= 1, got {conc!r}")
    kw = {"concurrency": conc, "max_samples": sc.get("max_samples"),
          "progress": progress, "keep_samples": True}
    # the server schedules as many sequences as the client keeps in flight
    batch = ["--max-num-seqs", str(conc)]
    # both start at once (a start-up is mostly one CPU's work); the dense one waits idle
    with served_together([
            dict(model_dir=visor, name="visor", extra=batch, log=out / "serve" / "visor.log"),
            dict(model_dir=dense, name="dense", extra=batch, log=out / "serve" / "dense.log"),
    ]) as [(visor_url, _), (dense_url, _)]:
        v = evaluate_served(visor_url, data, "visor", sc.get("budgets", ["auto", "configs"]),
                            sa_configs=configs, **kw)
        d = evaluate_served(dense_url, data, "dense", ["none"], **kw)
    (out / "served.json").write_text(json.dumps({"visor": v, "dense": d}) + "\n")
    return merge_served(report, v, d)


def _strip(p: dict) -> dict:
    return {k: v for k, v in p.items() if k != "samples"}


def _served_layers(p: dict) -> list[tuple[int, ...]]:
    """The distinct 1-based SA layer sets the receipts of pass ``p`` report."""
    return sorted({tuple(s["sa_layers"]) for s in p.get("samples", []) if s["sa_layers"]})


def merge_served(report: dict, visor: dict, dense: dict) -> dict:
    """Pure: ``report`` with the served passes, the served router block and served findings."""
    by = {p["budget"]: p for p in visor["passes"]}
    dense_pass = dense["passes"][0]
    table = []
    for p in visor["passes"]:
        if p["budget"] == "auto":
            continue
        layers = _served_layers(p)
        table.append({"budget": p["budget"], "sa_layers_1based": list(layers[0]) if len(layers) == 1
                      else None, "n_sa": len(layers[0]) if layers else None,
                      **with_ci(p), "families": p["families"],
                      "flops_vs_dense": p["flops_vs_dense"]})
    # the same configuration under two names (min = sa:1) is one configuration
    uniq = {}
    for r in table:
        uniq.setdefault(tuple(r["sa_layers_1based"] or [r["budget"]]), r)
    table = [r for r in uniq.values() if r["n_sa"] is not None]
    served = {"data": visor["data"], "requests": dense_pass["requests"],
              "dense": {**with_ci(dense_pass), "families": dense_pass["families"]},
              "configs": table,
              "passes": [_strip(p) for p in visor["passes"]],
              "agreement_with_offline": _agreement(report, visor, dense)}
    report = {**report, "served": served}
    if "auto" in by:
        a = by["auto"]
        router = {**with_ci(a), "families": a["families"],
                  "accuracy_vs_max_ci": _paired_ratio_ci(a, by[costliest(table)["budget"]])
                  if table else None,
                  "mean_sa_layers": a["mean_sa_layers"] or {},
                  "flops_vs_dense": a["flops_vs_dense"],
                  "flop_savings_vs_dense": None if a["flops_vs_dense"] is None
                  else 1 - a["flops_vs_dense"],
                  "sa_layers_histogram": a["sa_layers_histogram"]}
        report["router"] = {**report.get("router", {}), "served": router}
    else:
        router = None
    if "findings" in report and report["findings"].get("source") == "offline":
        report["findings_offline"] = report["findings"]
    if table:
        report["findings"] = findings(served["dense"], table, router, source="served")
    return report


def _paired_ratio_ci(router: dict, full: dict) -> list[float] | None:
    """The interval of the router's accuracy over ``full``'s on the questions both passes
    answered (kept samples, joined by index); None without samples."""
    theirs = {s["index"]: s["correct"] for s in full.get("samples", [])}
    both = [(s["correct"], theirs[s["index"]]) for s in router.get("samples", [])
            if s["index"] in theirs]
    if not both:
        return None
    return ratio_interval([a for a, _ in both], [b for _, b in both])


def _agreement(report: dict, visor: dict, dense: dict) -> dict:
    """Served vs offline accuracy per configuration (the same test samples)."""
    offline = {tuple(r["sa_layers_1based"]): r["accuracy"] for r in report.get("configs", [])}
    out = {}
    for p in visor["passes"]:
        layers = _served_layers(p)
        if p["budget"] != "auto" and len(layers) == 1:
            key = layers[0]
            if key in offline and p["requests"] == report["recipe_config"]["data"]["n_test"]:
                out[p["budget"]] = {"served": p["accuracy"], "offline": offline[key]}
    if dense["passes"][0]["requests"] == report["recipe_config"]["data"]["n_test"]:
        out["dense"] = {"served": dense["passes"][0]["accuracy"],
                        "offline": report["dense"]["accuracy"]}
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="run a whole built-in recipe: train, route, serve, "
                                             "evaluate")
    p.add_argument("name", choices=["synthetic"])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true",
                   help="smoke run in minutes (a plumbing check, not evidence)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, one after another into OUT/seed-N (a rerun "
                        "skips finished seeds and resumes the rest), then OUT/seeds.json and "
                        "the table of `visor-vllm report`")
    p.add_argument("--reuse-training", default=None, metavar="FROM",
                   help="start from the trained models of finished run FROM (with --seeds: "
                        "FROM/seed-N): where only eval, search, labels, router and serve "
                        "differ, every model is reused (another label rule costs minutes); "
                        "where stage1 or stage2 differ too, data and the dense model are "
                        "reused and VISOR's stages retrained; where preset differs, VISOR is "
                        "converted again too; anything else is refused")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after training and offline evaluation (no vllm serve)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe value (repeatable; dotted keys of "
                        "visor_vllm/training/recipes/synthetic.yaml, YAML values), e.g. "
                        "--set stage2.steps=2500 --set chat_template=compact")
    p.set_defaults(func=_cli_recipe)


def run_seeds(out: str | Path, seeds: list[int], quick: bool = False, serve: bool = True,
              progress: bool = True, overrides: dict | None = None,
              reuse_from: str | Path | None = None) -> dict:
    """One run per seed into ``out/seed-N``, then `visor_vllm.evaluation.seeds.report` of all.
    ``reuse_from``: a ``--seeds`` directory whose ``seed-N`` models each run starts from."""
    from visor_vllm.evaluation.seeds import report as seeds_report

    out = Path(out)
    want = recipe_config(quick, overrides)
    for seed in seeds:
        run_dir = out / f"seed-{seed}"
        done = run_dir / "report.json"
        if done.exists():
            prev = json.loads(done.read_text())
            if bool(prev.get("quick")) != quick or prev.get("seed") != seed:
                kind = "quick" if prev.get("quick") else "full"
                raise ValueError(f"{run_dir} holds a {kind} run of seed {prev.get('seed')}; "
                                 f"this is a {'quick' if quick else 'full'} run of seed {seed}: "
                                 "give another OUT")
            # a key added to the recipe after that run takes its default then, which keeps the
            # old behaviour (the rule for adding one), so older runs still resume and report
            have = recorded_config(quick, prev.get("recipe_config", {}))
            differ = recipe_differences(have, want)
            if differ:
                raise ValueError(f"{run_dir} was run with another recipe ({', '.join(differ)}): "
                                 "one report must not mix recipes; give another OUT")
            if not serve or "served" in prev:
                continue
        run_recipe(run_dir, quick=quick, seed=seed, serve=serve, progress=progress,
                   overrides=overrides,
                   reuse_from=None if reuse_from is None else Path(reuse_from) / f"seed-{seed}")
    result = seeds_report([out / f"seed-{s}" for s in seeds])
    (out / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cli_recipe(args) -> int:
    import sys

    from visor_vllm.training.pipeline import load_recipe, overrides_from_sets
    from visor_vllm.training.recipe import RecipeError

    try:
        overrides = overrides_from_sets(args.sets, load_recipe("synthetic", args.quick))
        if args.seeds:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            if not seeds:
                raise ValueError(f"--seeds {args.seeds!r} names no seed (e.g. --seeds 0,1,2)")
            if args.seed is not None:
                raise ValueError("give --seeds (a list) or --seed (one), not both")
            result = run_seeds(args.out, seeds, quick=args.quick, serve=not args.no_serve,
                               overrides=overrides, reuse_from=args.reuse_training)
            print(result["markdown"])
            print(f"wrote {Path(args.out) / 'seeds.json'} and {Path(args.out)}/seed-*/")
            return 0
        report = run_recipe(args.out, quick=args.quick, seed=args.seed, serve=not args.no_serve,
                            overrides=overrides, reuse_from=args.reuse_training)
    except (RecipeError, ServerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report.get(k) for k in ("wall_seconds", "dense", "findings")}, indent=2))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'visor'}")
    return 0
