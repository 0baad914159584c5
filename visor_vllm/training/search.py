"""Viable-configuration search (paper Sec. 4.2.3 step 2, Appendix A): which SA subsets to keep.

What. `search` evaluates every subset of the optional SA layers (the always-on ones fixed), or
a candidate list, on validation data: accuracy per family (Fig. 6's heatmap data) and prefill
FLOPs relative to dense LLaVA-OV (the FLOP model, at the data's own token counts). `viable`
picks the set to keep; `write_configs` writes it into a copy of the checkpoint as
``sa_configs`` (cheapest first), resizing the router's output layer.

The rule (documented, since the paper gives it only in words: "those that maintain high
accuracy at least in certain cases"): keep a configuration if

* it is on the accuracy/FLOPs frontier (no cheaper-or-equal configuration is more accurate
  overall), or
* on some family it beats every strictly cheaper configuration by more than ``tolerance``
  (default 0.02) -- it is worth its extra cost for some kind of question;

and always keep the cheapest and the costliest (the budgets ``min`` and ``max``). With
``test="paired"`` (the default when the rows carry per-question results, as `search` returns
them) "more accurate" and "beats" must also be significant on the same questions
(`visor_vllm.training.stats.significantly_better`, an exact McNemar test): 100 questions a family
against a 2-point rule otherwise keep configurations on noise. ``test="point"`` compares the
accuracies as measured.

Footguns. Only SA-capable layers can be searched: a layer the checkpoint's schedule marks
``text`` has no trained SA path. Router rows of configurations that are new to the
checkpoint start at zero; train the router afterwards (`visor_vllm.training.router`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from visor_vllm.training.stats import TESTS, significantly_better


def subsets(cfg) -> list[list[int]]:
    """Every configuration: the always-on layers plus any subset of the optional ones."""
    always, optional = list(cfg.always_on_sa_layers), list(cfg.optional_sa_layers)
    out = []
    for k in range(len(optional) + 1):
        for extra in itertools.combinations(optional, k):
            out.append(sorted(always + list(extra)))
    return out


def search(checkpoint: str | Path, data: str | Path, candidates=None, batch_size: int = 64,
           max_samples: int | None = None) -> dict:
    from visor_vllm.model.config import VisorConfig
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops
    from visor_vllm.training.data import prompt_lengths
    from visor_vllm.training.evaluate import evaluate

    cfg = VisorConfig.from_pretrained(str(checkpoint))
    configs = [sorted(c) for c in candidates] if candidates else subsets(cfg)
    ev = evaluate(checkpoint, data, configs, batch_size, max_samples, keep_records=True)
    nv, nt = prompt_lengths(checkpoint, data)
    dense = dense_prefill_flops(cfg, nv, nt)
    rows = [{"sa_layers": c["sa_layers"], "sa_layers_1based": [i + 1 for i in c["sa_layers"]],
             "flops_vs_dense": prefill_flops(cfg, nv, nt, c["sa_layers"]) / dense,
             "accuracy": c["accuracy"], "accuracy_ci": c["accuracy_ci"],
             "families": c["families"], "families_ci": c["families_ci"], "groups": c["groups"],
             "_correct": _per_question(c["records"])}
            for c in ev["configs"]]
    families = sorted(rows[0]["families"]) if rows else []
    return {"checkpoint": str(checkpoint), "data": str(data), "image_tokens": nv,
            "text_tokens": nt, "configs": rows,
            "heatmap": {"rows": [r["sa_layers_1based"] for r in rows], "columns": families,
                        "accuracy": [[r["families"][f] for f in families] for r in rows]}}


def _per_question(records: list[dict]) -> dict[str, list[float]]:
    """0/1 per question, overall (``""``) and per family, in the data's order."""
    out: dict[str, list[float]] = {"": []}
    for r in records:
        out[""].append(float(r["correct"]))
        out.setdefault(r["family"], []).append(float(r["correct"]))
    return out


def public(rows: list[dict]) -> list[dict]:
    """The rows without their per-question results (for JSON files)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def viable(rows: list[dict], tolerance: float = 0.02, test: str | None = None) -> list[list[int]]:
    """The configurations to keep (see the module docstring), cheapest first."""
    test = test or ("paired" if all("_correct" in r for r in rows) else "point")
    if test not in TESTS:
        raise ValueError(f"test is one of {TESTS}, got {test!r}")

    def better(i, j, family, margin):
        """Row i beats row j on ``family`` ("" = overall) by more than ``margin``."""
        if test == "point":
            acc = (lambda r: r["accuracy"]) if family == "" else (lambda r: r["families"][family])
            return acc(rows[i]) > acc(rows[j]) + margin + (1e-12 if margin == 0 else 0)
        return significantly_better(rows[i]["_correct"][family], rows[j]["_correct"][family],
                                    margin)

    order = sorted(range(len(rows)), key=lambda i: (rows[i]["flops_vs_dense"], i))
    keep = {order[0], order[-1]}
    best = order[0]
    for i in order[1:]:  # frontier: better than the most accurate cheaper configuration
        if rows[i]["accuracy"] > rows[best]["accuracy"]:
            if better(i, best, "", 0.0):
                keep.add(i)
            best = i
    for i in order:
        cheaper = [j for j in order if rows[j]["flops_vs_dense"] < rows[i]["flops_vs_dense"]]
        if cheaper and any(all(better(i, j, f, tolerance) for j in cheaper)
                           for f in rows[i]["families"]):
            keep.add(i)
    return [rows[i]["sa_layers"] for i in sorted(keep, key=lambda i: (
        len(rows[i]["sa_layers"]), rows[i]["flops_vs_dense"], rows[i]["sa_layers"]))]


def write_configs(checkpoint: str | Path, configs: list[list[int]], out: str | Path) -> Path:
    """A copy of ``checkpoint`` whose ``sa_configs`` are ``configs``; the router resized."""
    from visor_vllm.checkpoints.files import load_state_dict, write_checkpoint
    from visor_vllm.model.config import VisorConfig, validate_schedule

    src, out = Path(checkpoint), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; write_configs makes a new checkpoint dir")
    cfg = VisorConfig.from_pretrained(str(src))
    old = [list(c) for c in cfg.sa_configs]
    configs = [sorted(c) for c in configs]
    used = set().union(*map(set, configs))
    cfg.layer_types = [("text" if t == "self" and i not in used else t)
                       for i, t in enumerate(cfg.layer_types)]
    cfg.sa_configs = configs
    cfg.always_on_sa_layers = sorted(set.intersection(*map(set, configs)))
    validate_schedule(cfg)
    state = load_state_dict(src)
    for name in ("router.fc2.weight", "router.fc2.bias"):
        if name in state:
            w = state[name]
            rows = [w[old.index(c)] if c in old else torch.zeros_like(w[0]) for c in configs]
            state[name] = torch.stack(rows).contiguous()
    if len(configs) < 2:  # one configuration needs no router
        state = {k: v for k, v in state.items() if not k.startswith("router.")}
    return write_checkpoint(out, cfg, state, src)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("search", help="evaluate SA-layer subsets, keep the viable ones")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="search results JSON (heatmap data included)")
    p.add_argument("--write", help="also write a checkpoint with the viable set as sa_configs")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--test", choices=TESTS, default="paired",
                   help="paired: 'better' must be significant on the same questions")
    p.add_argument("--max-samples", type=int, default=None)
    p.set_defaults(func=_cli_search)


def _cli_search(args) -> int:
    import sys

    try:
        res = search(args.checkpoint, args.data, max_samples=args.max_samples)
        res["viable"] = viable(res["configs"], args.tolerance, args.test)
        res["tolerance"], res["test"] = args.tolerance, args.test
        res["configs"] = public(res["configs"])
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        if args.write:
            write_configs(args.checkpoint, res["viable"], args.write)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"viable_1based": [[i + 1 for i in c] for c in res["viable"]]}))
    return 0
