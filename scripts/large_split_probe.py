"""Issue 29's router target, measured against a large fresh split: label noise or the checkpoint?

What. For each finished `visor-vllm recipe synthetic` run directory: a new split ``big`` of
``--per-family`` one-question samples a family (its own stream of the run's seed and families,
written next to the run, not into it), every viable configuration of ``visor-viable`` and the
dense model scored on it offline. Then, with the run's configuration costs (``labels.json``):

* ``run_labels``: the run's own per-family labels (the served router's) scored on the split:
  accuracy / max's with a paired 95 % interval, FLOPs / max's;
* ``point_a_on_b`` / ``point_b_on_a``: the paper's rule (99 % of the maximal configuration,
  per family, as measured) chosen on one half of the split and scored on the other: what the
  paper's rule gives with 2,400 label questions a family (the default's: 600) and no winner's
  curse;
* ``point_all``: the rule chosen on the whole split (in sample: its accuracy is >= 99 % by
  construction; its FLOPs are the best estimate of what the paper's rule costs on this
  checkpoint);
* ``pooled_bound``: the cheapest per-family mix keeping 99 % of max's pooled accuracy on the
  whole split (`labels.cheapest_mix`);
* ``pooled_a_on_b`` / ``pooled_b_on_a``: that mix chosen on one half, scored on the other
  (added 01:10, before the first result: reported, not judged);
* per family, every configuration's accuracy with its Wilson interval, and the findings'
  quantities at this size (cheapest vs dense on easy families, hard accuracy by SA layers).

Why. On seed 0 the router misses the target on FLOPs on both host types (0.70x Xeon, 0.73x
EPYC) because the paper's rule sends hard families to the maximal configuration; the test
split's 300 questions a family put a cheaper per-family bound under 0.7x, which earlier notes
read as label noise. That reading assumes the test split is right and the label split wrong;
both are samples. A split 8x the label split tells which.

Read (written before the first result, 2026-12-08 01:03 UTC): on a seed where ``point_a_on_b``
and ``point_b_on_a`` both cost more than 0.7x max's FLOPs, the paper's rule cannot meet the
router target on that checkpoint whatever its label split (the cause is the checkpoint: its
hard families need the costly configurations to keep 99 %), and "label noise" is withdrawn
there; where both cost <= 0.7x at >= 99 % of max's accuracy, a larger label split is the
remedy to run through the server. Mixed halves: undecided at this size.

``--all-configs`` scores every SA subset instead of the viable ones (the search's choice), with
each configuration's cost from the FLOP model at the label split's token counts (as the
recipe's labels): whether the search dropped a cheaper configuration that keeps 99 % of max on
a family. ``--max-samples`` scores the split's first samples only (families in turn, so the
first 9 x K are K a family).

Footguns. Writes ``--per-family`` x families PNGs (43,200 at 4,800: ~0.4 GB) under ``--out``;
~6 minutes a run on 2 cores at 4,800 a family and five configurations (measured 2026-12-08 on
a 2-vCPU EPYC; ``--all-configs`` scores 16). Usage::

    python scripts/large_split_probe.py --out /work/runs/big /work/runs/e01/seed-0 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from visor_vllm.training import synthetic
from visor_vllm.training.evaluate import evaluate
from visor_vllm.training.labels import _group_index, full_index, group_labels, pooled_labels
from visor_vllm.training.stats import ratio_interval, wilson


def _split(run: Path, out: Path, per_family: int) -> Path:
    """The ``big`` split next to the run: its dataset.json (seed, families), new images."""
    data = out / "data"
    meta = json.loads((run / "data" / "dataset.json").read_text())
    n = per_family * len(meta["families"])
    done = json.loads((data / "dataset.json").read_text()) if (data / "dataset.json").exists() \
        else {}
    if done.get("splits", {}).get("big", {}).get("samples") == n and (data / "big.jsonl").exists():
        return data / "big.jsonl"
    if data.exists():
        shutil.rmtree(data)
    (data / "images").mkdir(parents=True)
    meta["splits"] = {}
    (data / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return synthetic.add_split(data, "big", n, turns=1, progress=False)


def _score(results, configs, choice: dict[str, int], flops, idx: dict[str, list[int]]) -> dict:
    """A per-family choice scored on the samples ``idx`` (family -> sample positions)."""
    full = full_index(configs)
    a, b, cost = [], [], 0.0
    for g, js in sorted(idx.items()):
        a += [float(results[choice[g]][j]["correct"]) for j in js]
        b += [float(results[full][j]["correct"]) for j in js]
        cost += flops[choice[g]] * len(js)
    n = len(a)
    return {"labels": {g: [i + 1 for i in configs[c]] for g, c in sorted(choice.items())},
            "accuracy": round(sum(a) / n, 4), "max_accuracy": round(sum(b) / n, 4),
            "accuracy_ratio": round(sum(a) / sum(b), 4), "accuracy_ratio_ci": ratio_interval(a, b),
            "flops_vs_max": round(cost / n / flops[full], 4)}


def _all_configs(run: Path) -> tuple[list[list[int]], list[float]]:
    """Every SA subset of the run's checkpoint and its FLOPs (the recipe's `flops_of`)."""
    from visor_vllm.model.config import VisorConfig
    from visor_vllm.model.flops import prefill_flops
    from visor_vllm.training.data import prompt_lengths
    from visor_vllm.training.search import subsets

    ckpt = run / "visor-viable"
    cfg = VisorConfig.from_pretrained(str(ckpt))
    nv, nt = prompt_lengths(ckpt, run / "data" / "label.jsonl")
    configs = subsets(cfg)
    return configs, [float(prefill_flops(cfg, nv, nt, c)) for c in configs]


def probe(run: Path, out: Path, per_family: int, batch_size: int, all_configs: bool = False,
          max_samples: int | None = None) -> dict:
    t0 = time.time()
    big = _split(run, out, per_family)
    t_data = time.time() - t0
    lab = json.loads((run / "labels.json").read_text())
    rep = json.loads((run / "report.json").read_text())
    configs, flops = lab["configs"], lab["flops"]
    if all_configs:
        configs, flops = _all_configs(run)
        assert all(flops[configs.index(c)] == f for c, f in zip(lab["configs"], lab["flops"]))
    ev = evaluate(run / "visor-viable", big, configs, batch_size, max_samples, keep_records=True)
    assert [c["sa_layers"] for c in ev["configs"]] == configs
    dense = evaluate(run / "dense-run" / "dense" / "model", big, batch_size=batch_size,
                     max_samples=max_samples, keep_records=True)
    t_eval = time.time() - t0 - t_data
    results = [c["records"] for c in ev["configs"]]
    idx = _group_index(results)                        # family -> sample positions
    half_a = {g: js[: len(js) // 2] for g, js in idx.items()}
    half_b = {g: js[len(js) // 2:] for g, js in idx.items()}

    def on(sub):
        """Every configuration's records of the samples ``sub``."""
        return [[results[c][j] for g in sorted(sub) for j in sub[g]] for c in range(len(configs))]

    def point_on(sub):
        return {g: v["config"] for g, v in group_labels(configs, on(sub), 0.99, "point").items()}

    def pooled_on(sub):
        return pooled_labels(configs, on(sub), flops, 0.99)

    full = full_index(configs)
    run_choice = {g: configs.index(v["sa_layers"]) for g, v in rep["labels"]["family"].items()}
    correct = [{g: sum(int(results[c][j]["correct"]) for j in js) for g, js in idx.items()}
               for c in range(len(configs))]
    groups = json.loads((big.parent / "dataset.json").read_text())["groups"]
    dense_fam = {g: sum(int(r["correct"]) for r in dense["dense"]["records"] if r["family"] == g)
                 for g in idx}
    fam = {g: {"questions": len(js), "dense": [round(dense_fam[g] / len(js), 4),
                                                wilson(dense_fam[g], len(js))],
               "configs": [[round(correct[c][g] / len(js), 4), wilson(correct[c][g], len(js))]
                           for c in range(len(configs))],
               "run_label": [i + 1 for i in configs[run_choice[g]]]}
           for g, js in sorted(idx.items())}
    easy = [g for g in idx if groups[g] == "easy"]
    hard = [g for g in idx if groups[g] == "hard"]
    n_easy, n_hard = sum(len(idx[g]) for g in easy), sum(len(idx[g]) for g in hard)
    by_sa: dict[int, float] = {}
    for c, cfg in enumerate(configs):  # finding 2 reads the best configuration of each size
        acc = sum(correct[c][g] for g in hard) / n_hard
        by_sa[len(cfg)] = max(by_sa.get(len(cfg), 0.0), round(acc, 4))
    cheapest = min(range(len(configs)), key=lambda c: (len(configs[c]), flops[c]))
    return {"run": str(run), "seed": rep["seed"], "host": rep["hosts"][-1]["cpu"],
            "per_family": len(idx[next(iter(idx))]), "all_configs": all_configs,
            "configs_1based": [[i + 1 for i in c] for c in configs],
            "flops_vs_max": [round(f / flops[full], 4) for f in flops],
            "served_router": _served(rep),
            "run_labels": _score(results, configs, run_choice, flops, idx),
            "point_a_on_b": _score(results, configs, point_on(half_a), flops, half_b),
            "point_b_on_a": _score(results, configs, point_on(half_b), flops, half_a),
            "point_all": _score(results, configs, point_on(idx), flops, idx),
            "pooled_bound": _score(results, configs, pooled_on(idx), flops, idx),
            "pooled_a_on_b": _score(results, configs, pooled_on(half_a), flops, half_b),
            "pooled_b_on_a": _score(results, configs, pooled_on(half_b), flops, half_a),
            "findings_at_this_size": {
                "cheapest_easy_vs_dense_easy": [
                    round(sum(correct[cheapest][g] for g in easy) / n_easy, 4),
                    round(sum(dense_fam[g] for g in easy) / n_easy, 4)],
                "hard_by_sa_layers": dict(sorted(by_sa.items()))},
            "families": fam,
            "correct": {"order": "the split's samples in order; one string of 0/1 a configuration",
                        "dense": "".join(str(int(r["correct"])) for r in dense["dense"]["records"]),
                        "configs": ["".join(str(int(r["correct"])) for r in res)
                                    for res in results],
                        "family": [r["family"] for r in results[0]]},
            "minutes_data": round(t_data / 60, 2),
            "minutes_eval": round(t_eval / 60, 2)}


def _served(rep: dict) -> dict:
    """The served router's figures as the run's report gives them."""
    r = rep["findings"]["router_vs_costliest"]
    fl = r["flops_vs_dense"]
    return {"accuracy_ratio": r["accuracy_ratio"], "flops_vs_max": round(fl[0] / fl[1], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-family", type=int, default=4800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--max-samples", type=int)
    args = p.parse_args()
    for run in args.runs:
        res = probe(run, args.out / f"{run.parent.name}-{run.name}", args.per_family,
                    args.batch_size, args.all_configs, args.max_samples)
        tag = "-all" if args.all_configs else ""
        path = args.out / f"{run.parent.name}-{run.name}{tag}.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: res[k] for k in ("seed", "served_router", "run_labels",
                                              "point_a_on_b", "point_b_on_a", "point_all",
                                              "pooled_bound", "pooled_a_on_b", "pooled_b_on_a",
                                              "findings_at_this_size")}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
