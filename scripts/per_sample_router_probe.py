"""Issue 29's optional target, probed offline: does a per-sample router beat the per-family one?

What. For each finished `visor-vllm recipe synthetic` run directory: the routing-token features
of the label and test splits (`visor_vllm.training.router.routing_features`, the backbone of
``visor-viable``), an MLP (LayerNorm -> 256 GELU -> one logit per viable configuration) fit
with BCE to the label split's per-sample correctness under every viable configuration
(``labels.json``'s records), and a sample sent to the configuration ``c`` minimising
``FLOPs_c / FLOPs_max + lam * (p_max - p_c)``. Swept over ``lam``, each point is scored with
the *served* answers of every configuration (``served.json``: what the server answered for
that question under that configuration); the per-family router is the served ``auto`` pass.
Prints one JSON line a run: the per-family router's (accuracy / max, FLOPs / max), the
per-sample curve and its accuracy at the per-family router's FLOPs (interpolated).

Why a probe, not a label rule. The rule written before it ran
(docs/training.md#a-per-sample-router-probed-offline-not-kept) asked it to win on >= 3 of 5
seeds; it won on 1, so nothing of it is in the package.

Footguns. Needs the run's ``labels.json`` and ``served.json`` with samples (the recipe keeps
both); ~40 s a run on 2 cores. Usage::

    python scripts/per_sample_router_probe.py /work/runs/p5/seed-0 /work/runs/p5/seed-1 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from visor_vllm.evaluation.served import budgets_for
from visor_vllm.training.router import load_with_features

LAMBDAS = [0, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 80, 120, 200, 400, 1000, 1e9]


def features(run: Path, split: str):
    _, feats, owner = load_with_features(run / "visor-viable", run / "data" / f"{split}.jsonl",
                                         128)
    return feats, owner  # one routing token a sample


def probe(run: Path) -> dict:
    lab = json.loads((run / "labels.json").read_text())
    srv = json.loads((run / "served.json").read_text())
    cfgs = lab["configs"]
    fl = torch.tensor(lab["flops"], dtype=torch.float)
    fl = fl / fl.max()                                                   # [C] FLOPs / max
    full = max(range(len(cfgs)), key=lambda i: (len(cfgs[i]), i))
    xl, ol = features(run, "label")                                      # [N, d], [N]
    xt, ot = features(run, "test")
    yl = torch.tensor([[lab["records"][c][i]["correct"] for c in range(len(cfgs))]
                       for i in ol.tolist()], dtype=torch.float)         # [N, C]
    passes = {p["budget"]: {s["index"]: s for s in p["samples"]} for p in srv["visor"]["passes"]}
    names = [name for name, _ in budgets_for(cfgs, ["configs"])]        # the served passes
    yt = torch.tensor([[passes[n][i]["correct"] for n in names] for i in ot.tolist()],
                      dtype=torch.float)                                 # [M, C] served
    auto = passes["auto"]
    index = {tuple(i + 1 for i in c): k for k, c in enumerate(cfgs)}    # 1-based receipt -> c
    family_acc = sum(auto[i]["correct"] for i in ot.tolist()) / len(ot) / float(yt[:, full].mean())
    family_fl = float(sum(fl[index[tuple(auto[i]["sa_layers"])]] for i in ot.tolist()) / len(ot))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.LayerNorm(xl.shape[1]), torch.nn.Linear(xl.shape[1], 256),
                              torch.nn.GELU(), torch.nn.Linear(256, len(cfgs)))
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(600):
        loss = F.binary_cross_entropy_with_logits(mlp(xl), yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(mlp(xt))                                       # [M, C]
    curve = []
    for lam in LAMBDAS:
        pick = (fl[None, :] + lam * (p[:, full:full + 1] - p)).argmin(1)
        acc = yt[torch.arange(len(yt)), pick].mean() / yt[:, full].mean()
        curve.append((float(fl[pick].mean()), float(acc), lam))
    curve.sort()
    at = None
    for (f0, a0, _), (f1, a1, _) in zip(curve, curve[1:]):
        if f0 <= family_fl <= f1:
            at = a0 if f1 == f0 else a0 + (a1 - a0) * (family_fl - f0) / (f1 - f0)
            break
    return {"run": str(run), "viable": len(cfgs),
            "family_router_acc_flops_vs_max": [round(family_acc, 4), round(family_fl, 4)],
            "per_sample_acc_vs_max_at_equal_flops": None if at is None else round(at, 4),
            "per_sample_wins": None if at is None else at > family_acc,
            "curve_flops_acc_lambda": [[round(f, 4), round(a, 4), lam] for f, a, lam in curve]}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(probe(Path(arg))), flush=True)
