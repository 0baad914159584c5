"""`visor-vllm plot`: the paper's pictures from this project's own outputs (matplotlib, PNG).

What. One subcommand per picture, each a pure function from parsed JSON (or a config) to a
matplotlib ``Figure``, and a CLI that reads the file and saves the PNG:

| kind | input | picture |
|---|---|---|
| ``flops`` | ``--preset`` or ``--config DIR`` | LLM prefill FLOPs vs visual tokens, each configuration and dense (paper Fig. 10) |
| ``heatmap`` | ``visor-vllm search`` JSON | accuracy per configuration x question family (Fig. 6) |
| ``routing`` | ``visor-vllm eval`` JSON (or a recipe ``report.json``) | SA layers the router picked, per family (Fig. 7) |
| ``accuracy`` | ``eval`` JSON, ``search`` JSON or ``report.json`` | accuracy vs LLM FLOPs per configuration, router and dense (Fig. 8) |
| ``bench`` | ``benchmarks/bench_vs_llava.py`` JSON | VISOR / LLaVA-OV ratios per budget and concurrency |
| ``seeds`` | ``visor-vllm report --out`` JSON (or a run's ``seeds.json``) | accuracy vs LLM FLOPs of every seed: configurations, router, dense |

Why here. The pictures read evaluation and search output, so they live with evaluation; they
import matplotlib lazily (the ``plot`` extra) and use the Agg backend, so they work headless.

Footguns. ``routing`` needs receipts (``visor`` in responses: a server with the middleware);
``accuracy`` from ``eval`` JSON places budgets on the x axis by the receipts' FLOPs, so passes
without receipts (a dense server) are drawn as the dense reference line, not as points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("flops", "heatmap", "routing", "accuracy", "bench", "seeds")


class PlotInputError(ValueError):
    """The input file is not the kind of output this picture is drawn from."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# The pictures: data in, Figure out
# ---------------------------------------------------------------------------------------------

def flops_figure(cfg, text_tokens: int = 64, max_visual: int = 8748, points: int = 60):
    """Prefill LLM FLOPs vs visual tokens for every configuration of ``cfg`` and dense (Fig. 10)."""
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops

    plt = _plt()
    xs = [round(i * max_visual / (points - 1)) for i in range(points)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [dense_prefill_flops(cfg, x, text_tokens) / 1e12 for x in xs], "k--", lw=2,
            label="dense LLaVA-OV")
    configs = sorted(cfg.sa_configs, key=len)
    cmap = plt.get_cmap("viridis")
    for k, c in enumerate(configs):  # colour: few SA layers (dark) to many (light)
        label = "VISOR SA " + ",".join(str(i + 1) for i in c)
        ax.plot(xs, [prefill_flops(cfg, x, text_tokens, c) / 1e12 for x in xs], label=label,
                color=cmap(0.9 * k / max(1, len(configs) - 1)))
    ax.set(xlabel="visual tokens", ylabel="LLM prefill TFLOPs",
           title=f"Prefill FLOPs vs visual tokens ({text_tokens} text tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmap_figure(search: dict):
    """Accuracy per configuration (rows) and family (columns), from `search` output (Fig. 6)."""
    hm = search.get("heatmap")
    if not isinstance(hm, dict) or not hm.get("rows"):
        raise PlotInputError("no 'heatmap' in this file: expected `visor-vllm search` output")
    plt = _plt()
    acc, rows, cols = hm["accuracy"], hm["rows"], hm["columns"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(acc, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), ["SA " + ",".join(map(str, r)) for r in rows])
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    viable = {tuple(i + 1 for i in v) for v in search.get("viable") or []}
    for i, r in enumerate(rows):
        if tuple(r) in viable:
            ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_title("Accuracy per configuration and family" + (" (bold: viable)" if viable else ""))
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def _passes(data: dict) -> list[dict]:
    """Served passes of `visor-vllm eval` output, or of a recipe report.json (``served``)."""
    if "passes" in data:
        return data["passes"]
    served = data.get("served")
    if isinstance(served, dict) and "passes" in served:
        return served["passes"]
    raise PlotInputError("no 'passes' in this file: expected `visor-vllm eval` output "
                         "or a recipe report.json with served results")


def routing_figure(data: dict, budget: str = "auto"):
    """How many SA layers the router picked, per family (Fig. 7), from a served ``auto`` pass."""
    passes = [p for p in _passes(data) if p.get("budget") == budget]
    if not passes or not passes[0].get("sa_layers_histogram"):
        raise PlotInputError(f"no '{budget}' pass with receipts (sa_layers_histogram) in this file")
    hist = passes[0]["sa_layers_histogram"]
    plt = _plt()
    families = sorted(hist)
    counts = sorted({int(k) for h in hist.values() for k in h})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(families) + 2), 3.8))
    bottom = [0.0] * len(families)
    for n in counts:
        share = [hist[f].get(str(n), hist[f].get(n, 0)) / max(1, sum(hist[f].values()))
                 for f in families]
        ax.bar(families, share, bottom=bottom, label=f"{n} SA layer{'s' if n != 1 else ''}")
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set(ylabel="share of requests", ylim=(0, 1), title=f"Router's choice per family ({budget})")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_figure(data: dict):
    """Accuracy vs LLM FLOPs (fraction of dense) per configuration, router and dense (Fig. 8)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    if "configs" in data and "heatmap" in data:  # search output: every candidate
        pts = [(r["flops_vs_dense"], r["accuracy"], "SA " + ",".join(map(str, r["sa_layers_1based"])))
               for r in data["configs"]]
        dense = None
    else:
        pts, dense = [], None
        for p in _passes(data):
            if p.get("flops_vs_dense") is not None:
                pts.append((p["flops_vs_dense"], p["accuracy"], p["budget"]))
        served = data.get("served") if isinstance(data.get("served"), dict) else {}
        if isinstance(served.get("dense"), dict):  # a recipe report: the dense server's accuracy
            dense = served["dense"].get("accuracy")
    if not pts:
        raise PlotInputError("no configuration with FLOPs in this file (passes need receipts)")
    for x, y, label in pts:
        ax.scatter([x], [y], s=40, color="C3" if label == "auto" else "C0", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense LLaVA-OV ({dense:.3f})")
        ax.scatter([1.0], [dense], marker="s", color="k", zorder=3)
        ax.legend(fontsize=7)
    ax.set(xlabel="LLM FLOPs / dense", ylabel="accuracy", title="Accuracy per configuration")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def seeds_figure(data: dict):
    """Accuracy vs LLM FLOPs / dense for every seed: each seed's configurations (dots, joined
    cheapest to costliest), its router (star) and its dense model (square at 1.0), one colour a
    seed."""
    runs = data.get("points")
    if not runs:
        raise PlotInputError("no 'points' in this file: expected `visor-vllm report --out` JSON")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, run in enumerate(runs):
        color = f"C{k % 10}"
        cfg = sorted((c for c in run["configs"] if c["flops_vs_dense"] is not None),
                     key=lambda c: c["flops_vs_dense"])
        ax.plot([c["flops_vs_dense"] for c in cfg], [c["accuracy"] for c in cfg], "o-",
                color=color, ms=4, lw=0.8, alpha=0.8, label=f"seed {run['seed']}")
        if run.get("router") and run["router"]["flops_vs_dense"] is not None:
            ax.scatter([run["router"]["flops_vs_dense"]], [run["router"]["accuracy"]], marker="*",
                       s=140, color=color, edgecolor="k", zorder=4)
        ax.scatter([1.0], [run["dense"]], marker="s", color=color, edgecolor="k", zorder=3)
    ax.set(xlabel="LLM FLOPs / dense", ylabel="accuracy",
           title="Every seed: configurations (dots), router (star), dense (square)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bench_figure(bench: dict):
    """VISOR / LLaVA-OV ratios per (budget, concurrency) from the benchmark's JSON."""
    ratios = bench.get("ratios")
    if not ratios:
        raise PlotInputError("no 'ratios' in this file: expected benchmarks/bench_vs_llava.py output")
    plt = _plt()
    keys = [("ttft", "TTFT"), ("itl_p50", "ITL p50"), ("req_per_s", "req/s"),
            ("tok_per_s", "tok/s"), ("kv_capacity", "KV capacity")]
    labels = [f"{r['budget']} c={r['concurrency']}" for r in ratios]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.0))
    width = 0.8 / len(keys)
    for k, (key, name) in enumerate(keys):
        xs = [i + (k - len(keys) / 2 + 0.5) * width for i in range(len(ratios))]
        ax.bar(xs, [r.get(key) or 0 for r in ratios], width, label=name)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="VISOR / LLaVA-OV (same run)",
           title="Benchmark ratios (TTFT, ITL < 1 and req/s, tok/s, KV > 1 favour VISOR)")
    ax.legend(fontsize=7, ncol=len(keys))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw a paper figure from eval/search/benchmark "
                                           "output, or FLOPs from a config (PNG)",
                              description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("input", nargs="?", type=Path,
                   help="JSON file (heatmap, routing, accuracy, bench); not for flops")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    from visor_vllm.model.config import PRESETS

    p.add_argument("--preset", help=f"flops: a preset ({', '.join(PRESETS)})")
    p.add_argument("--config", type=Path, help="flops: a checkpoint directory")
    p.add_argument("--text-tokens", type=int, default=64, help="flops: text tokens (default 64)")
    p.add_argument("--max-visual-tokens", type=int, default=8748, help="flops: x range")
    p.add_argument("--budget", default="auto", help="routing: which served pass (default auto)")
    p.set_defaults(func=_cli, parser=p)


def render(kind: str, out: Path, data: dict | None = None, cfg=None, **kw) -> Path:
    fig = {"flops": lambda: flops_figure(cfg, kw.get("text_tokens", 64),
                                         kw.get("max_visual_tokens", 8748)),
           "heatmap": lambda: heatmap_figure(data),
           "routing": lambda: routing_figure(data, kw.get("budget", "auto")),
           "accuracy": lambda: accuracy_figure(data),
           "bench": lambda: bench_figure(data),
           "seeds": lambda: seeds_figure(data)}[kind]()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _plt().close(fig)
    return out


def _cli(args: argparse.Namespace) -> int:
    parser = args.parser
    cfg = data = None
    try:
        if args.kind == "flops":
            from visor_vllm.model.config import VisorConfig, get_preset

            if bool(args.preset) == bool(args.config):
                parser.error("plot flops: give exactly one of --preset or --config")
            cfg = get_preset(args.preset) if args.preset else VisorConfig.from_pretrained(str(args.config))
        else:
            if args.input is None:
                parser.error(f"plot {args.kind}: give the JSON file to draw from")
            data = json.loads(args.input.read_text())
            if not isinstance(data, dict):
                raise PlotInputError("expected a JSON object")
        out = render(args.kind, args.out, data, cfg, text_tokens=args.text_tokens,
                     max_visual_tokens=args.max_visual_tokens, budget=args.budget)
    except (OSError, ValueError, KeyError, TypeError) as e:  # PlotInputError is a ValueError
        print(f"visor-vllm plot {args.kind}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
