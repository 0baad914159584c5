"""Pseudo-labels for the router (paper Sec. 4.3, Appendices D and G): which configuration each
training sample should get.

What. Input: per-configuration per-sample results, as `visor_vllm.training.evaluate` writes
them (``correct``, ``loss``, ``prefix`` -- answer tokens right before the first wrong one --
and ``family``). Three rules; the router trains on the one a recipe names (``labels.rule``):

* `group_labels` (the paper's; per dataset there, per question family here, Appendix G):
  within a group, keep the configurations whose accuracy is at least ``ratio`` (0.99) of the
  *full* configuration's (the costliest one), then take the one with the fewest SA layers,
  then the lowest summed answer loss, then the lower index. Every sample of the group gets it.
  ``test="paired"`` (the default) drops a configuration only when it is *significantly* below
  ``ratio`` of the full one on the group's questions (`visor_vllm.training.stats`, an exact
  McNemar test), so a 1-point difference on 300 questions does not flip a label;
  ``test="holm"`` (not the paper's) is the same test with Holm's correction over the groups:
  a configuration is tested on every group at once, so with 9 families some family looks
  significantly worse by chance 37 % of the time (at 5 % each); under Holm, 5 % at most.
  ``test="point"`` is the plain comparison of the two accuracies.
* `oracle_labels` (Appendix D): per sample, the configuration whose greedy answer matches the
  ground truth for the most tokens (counted up to the first mismatch); ties go to the fewest
  SA layers, then the lowest loss, then the lower index.

A third rule, not the paper's: `pooled_labels` (``rule: pooled``) gives each group the
configuration of `cheapest_mix`: the cheapest choice of one configuration per group whose
*pooled* accuracy keeps ``ratio`` of the full configuration's, so a group may keep less than
99 % where another pays for it. The paper's rule asks 99 % of every group and so spends SA
layers on a group for a point; a target stated on the pooled accuracy (the synthetic recipe's
router target) is what this rule optimises. It compares the accuracies as measured on the
label split (no paired test), so its mix can land a little under ``ratio`` on other questions:
the recipe's report measures it on the test split.
Scored on the very questions it is chosen on, `cheapest_mix` is also a bound: no per-family
router beats it there, so when its FLOPs are above a router target the target is out of reach
of any per-family labels (the report's ``router_bound_flops_vs_max``), not a routing failure.

Why the paper's two. The feasibility study measured that per-sample labels are dominated by
the cheapest configuration (most samples are right with it, and yes/no samples are right by
chance) and invert the easy/hard routing, while per-family labels route correctly; the oracle
stays the upper bound of what routing could reach.

Footguns. Configurations are given as 0-based layer lists; the "full" configuration is the one
with the most SA layers (ties: the later). A group whose full configuration scores 0 keeps
every configuration (99% of 0), so it gets the cheapest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from visor_vllm.training.stats import TESTS, below_pvalue, holm, significantly_below

LABEL_TESTS = TESTS + ("holm",)  # how a group's configurations are compared with the full one


def _cost_key(configs: Sequence[Sequence[int]], i: int) -> tuple[int, int]:
    return (len(configs[i]), i)


def full_index(configs: Sequence[Sequence[int]]) -> int:
    return max(range(len(configs)), key=lambda i: _cost_key(configs, i))


def _group_index(results: Sequence[Sequence[dict]]) -> dict[str, list[int]]:
    """Sample indices per group (``family``; ``"all"`` without one), in sample order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for j, rec in enumerate(results[0]):
        groups[rec.get("family", "all")].append(j)
    return groups


def _per_sample_of(by_group: Mapping[str, int], results: Sequence[Sequence[dict]]) -> list[int]:
    """A per-group choice spread over the samples."""
    return [by_group[r.get("family", "all")] for r in results[0]]


def group_labels(configs: Sequence[Sequence[int]], results: Sequence[Sequence[dict]],
                 ratio: float = 0.99, test: str = "paired") -> dict[str, dict]:
    """Per group: ``{"config": index, "accuracy": [...], "kept": [...]}``.

    ``results[c]`` lists the samples' records under configuration ``c`` (same samples, same
    order in every configuration).
    """
    if not configs or len(results) != len(configs):
        raise ValueError("one list of results per configuration is needed")
    if test not in LABEL_TESTS:
        raise ValueError(f"test is one of {LABEL_TESTS}, got {test!r}")
    n = len(results[0])
    if any(len(r) != n for r in results):
        raise ValueError("every configuration must score the same samples")
    groups = _group_index(results)
    full = full_index(configs)
    right = {g: [[float(results[c][j]["correct"]) for j in idx] for c in range(len(configs))]
             for g, idx in groups.items()} if test != "point" else {}  # [group][config][sample]
    dropped = _holm_dropped(right, full, ratio) if test == "holm" else set()
    out = {}
    for g, idx in sorted(groups.items()):
        acc = [sum(results[c][j]["correct"] for j in idx) / len(idx) for c in range(len(configs))]
        loss = [sum(results[c][j]["loss"] for j in idx) for c in range(len(configs))]
        if test == "point":
            kept = [c for c in range(len(configs)) if acc[c] >= ratio * acc[full] - 1e-12]
        elif test == "holm":
            kept = [c for c in range(len(configs)) if (g, c) not in dropped]
        else:
            kept = [c for c in range(len(configs))
                    if not significantly_below(right[g][c], right[g][full], ratio)]
        best = min(kept, key=lambda c: (len(configs[c]), loss[c], c))
        out[g] = {"config": best, "accuracy": acc, "loss": loss, "kept": kept,
                  "samples": len(idx), "test": test}
    return out


def _holm_dropped(right: Mapping[str, Sequence[Sequence[float]]], full: int,
                  ratio: float) -> set[tuple[str, int]]:
    """``(group, configuration)`` pairs below ``ratio`` of the full configuration as measured
    and significantly so after Holm's correction over the groups (one family of tests per
    configuration: "is it worse somewhere?"). ``right[g][c]``: configuration ``c``'s 0/1
    results on group ``g``. A group measured at or above the bar is a test not rejected."""
    names = sorted(right)
    dropped = set()
    for c in range(len(right[names[0]])):
        if c != full:
            p = [below_pvalue(right[g][c], right[g][full], ratio) for g in names]
            dropped |= {(g, c) for g, r in zip(names, holm(p)) if r}
    return dropped


def cheapest_mix(flops: Sequence[float], correct: Sequence[Mapping[str, int]],
                 questions: Mapping[str, int], full: int, ratio: float = 0.99) -> dict:
    """The cheapest per-group choice of configurations whose pooled accuracy is at least
    ``ratio`` of configuration ``full``'s (a bound: see the module docstring).

    ``flops[c]``: configuration ``c``'s mean cost per question (any unit; the groups' own costs
    are not known apart, so each question of a group costs the configuration's mean);
    ``correct[c][g]``: questions of group ``g`` right under ``c``; ``questions[g]``: its size.
    Returns ``{"choice": {group: c}, "flops": mean cost per question, "accuracy",
    "full_accuracy"}``. Exact: a knapsack over the number of right answers, O(groups x
    questions x configurations).
    """
    if not flops or len(correct) != len(flops) or not 0 <= full < len(flops):
        raise ValueError("one cost and one count per configuration, and a full index among them")
    groups = sorted(questions)
    if not groups or any(set(c) != set(groups) for c in correct):
        raise ValueError("every configuration needs a count for every group")
    total = sum(questions.values())
    need = ratio * sum(correct[full][g] for g in groups) - 1e-9
    best: dict[int, tuple[float, dict]] = {0: (0.0, {})}  # right answers -> (cost, choice)
    for g in groups:
        nxt: dict[int, tuple[float, dict]] = {}
        for k, (cost, choice) in best.items():
            for c in range(len(flops)):
                kk, v = k + correct[c][g], cost + flops[c] * questions[g]
                if kk not in nxt or v < nxt[kk][0]:
                    nxt[kk] = (v, {**choice, g: c})
        best = nxt
    cost, k, choice = min(((v, k, ch) for k, (v, ch) in best.items() if k >= need),
                          key=lambda t: (t[0], -t[1]))  # cheapest, then the most right
    return {"choice": choice, "flops": cost / total, "accuracy": k / total,
            "full_accuracy": sum(correct[full][g] for g in groups) / total}


def pooled_labels(configs: Sequence[Sequence[int]], results: Sequence[Sequence[dict]],
                  flops: Sequence[float], ratio: float = 0.99) -> dict[str, int]:
    """Per group: the configuration index `cheapest_mix` gives it on these results
    (``flops[c]``: configuration ``c``'s cost per question)."""
    if not configs or len(results) != len(configs) or len(flops) != len(configs):
        raise ValueError("one list of results and one cost per configuration are needed")
    groups = _group_index(results)
    correct = [{g: sum(int(bool(results[c][j]["correct"])) for j in idx)
                for g, idx in groups.items()} for c in range(len(configs))]
    mix = cheapest_mix(flops, correct, {g: len(idx) for g, idx in groups.items()},
                       full_index(configs), ratio)
    return mix["choice"]


def oracle_labels(configs: Sequence[Sequence[int]],
                  results: Sequence[Sequence[dict]]) -> list[int]:
    """Per sample: the configuration index of Appendix D's oracle."""
    if not configs or len(results) != len(configs):
        raise ValueError("one list of results per configuration is needed")
    n = len(results[0])
    labels = []
    for j in range(n):
        labels.append(min(range(len(configs)), key=lambda c: (
            -results[c][j].get("prefix", int(results[c][j]["correct"])), len(configs[c]),
            results[c][j]["loss"], c)))
    return labels


RULES = ("family", "oracle", "pooled")


def per_sample(configs, results, rule: str = "family", ratio: float = 0.99,
               test: str = "paired", flops: Sequence[float] | None = None) -> list[int]:
    """One label per sample under ``rule`` (one of `RULES`; ``pooled`` needs ``flops``)."""
    if rule not in RULES:
        raise ValueError(f"rule is one of {RULES}, got {rule!r}")
    if rule == "oracle":
        return oracle_labels(configs, results)
    if rule == "pooled":
        if flops is None:
            raise ValueError("rule 'pooled' needs each configuration's FLOPs")
        return _per_sample_of(pooled_labels(configs, results, flops, ratio), results)
    by_group = group_labels(configs, results, ratio, test)
    return _per_sample_of({g: v["config"] for g, v in by_group.items()}, results)


def label_checkpoint(checkpoint, data, ratio: float = 0.99, batch_size: int = 64,
                     max_samples: int | None = None, test: str = "paired",
                     flops_of: Callable[[list[int]], float] | None = None) -> dict:
    """Run every viable configuration on ``data``; the label rules and the raw records.
    ``flops_of(layers)``, a configuration's cost per question, adds the ``pooled`` rule."""
    from visor_vllm.training.evaluate import evaluate

    ev = evaluate(checkpoint, data, None, batch_size, max_samples, keep_records=True)
    configs = [c["sa_layers"] for c in ev["configs"]]
    flops = [flops_of(c) for c in configs] if flops_of else None
    results = [c["records"] for c in ev["configs"]]
    index = [r["index"] for r in results[0]]
    family = group_labels(configs, results, ratio, test)
    pooled = pooled_labels(configs, results, flops, ratio) if flops else None
    return {"checkpoint": str(checkpoint), "data": str(data), "ratio": ratio, "test": test,
            "configs": configs, "samples": index, "family": family,
            "per_sample": {"family": _per_sample_of({g: v["config"] for g, v in family.items()},
                                                    results),
                           "oracle": oracle_labels(configs, results),
                           **({"pooled": _per_sample_of(pooled, results)} if pooled else {})},
            "pooled": pooled,
            "flops": flops,
            "accuracy": [c["accuracy"] for c in ev["configs"]],
            "records": results, "skipped": ev["skipped"]}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("label", help="pseudo-labels: every viable configuration on DATA")
    p.add_argument("checkpoint")
    p.add_argument("data", help="LLaVA JSON/JSONL (one question per sample), datasets dir, parquet")
    p.add_argument("--out", required=True, help="labels JSON")
    p.add_argument("--ratio", type=float, default=0.99)
    p.add_argument("--test", choices=LABEL_TESTS, default="paired",
                   help="paired: below the ratio only when significantly so; holm: the same, "
                        "corrected over the groups; point: as measured")
    p.add_argument("--max-samples", type=int, default=None)
    p.set_defaults(func=_cli_label)


def _cli_label(args) -> int:
    import json
    import sys

    try:
        out = label_checkpoint(args.checkpoint, args.data, args.ratio,
                               max_samples=args.max_samples, test=args.test)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(json.dumps({g: out["configs"][v["config"]] for g, v in out["family"].items()}))
    return 0
