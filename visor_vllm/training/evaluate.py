"""Offline accuracy of a checkpoint on LLaVA-style data: per family, per SA configuration.

What. `evaluate(checkpoint, data)` scores every sample by greedy exact match of its answer
(`visor_vllm.training.model.answer_stats`: teacher-forced argmax at every answer token, which
*is* greedy decoding's exact match) and its answer loss, for a dense LLaVA-OV checkpoint once
or for a VISOR checkpoint under each requested configuration. Returns per-family and per-group
(easy/hard, from the dataset's ``dataset.json`` when present) accuracies and the per-sample
records (the raw material of pseudo-labels). Every configuration is scored in one pass over
the data (`score_configs`): each batch is encoded once and run under each configuration.

Why offline. The recipe measures the models it trains before any server exists, with the
trainer's own forward; accuracy *through the server* is the adaptive-inference issue's
``visor-vllm eval``. Both read the same data and the same chat template.

Footguns. One question per sample is assumed for per-family numbers (the synthetic val/test
splits); a multi-turn sample counts as correct only if every answer is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from visor_vllm.training.data import (EncodedDataset, SampleEncoder, default_image_folder,
                                      iter_batches, load_records)
from visor_vllm.training.model import answer_stats, dense_hidden, visor_hidden_configs


def dataset_groups(data: str | Path) -> dict[str, str]:
    meta = default_image_folder(data) / "dataset.json"
    return json.loads(meta.read_text()).get("groups", {}) if meta.exists() else {}


@torch.no_grad()
def score(model, kind: str, ds: EncodedDataset, pad: int, sa_layers=None,
          batch_size: int = 64) -> list[dict]:
    """Per sample: ``{"index", "family", "correct", "loss", "tokens", "prefix"}`` (bad ones skipped)."""
    return score_configs(model, kind, ds, pad, [sa_layers], batch_size)[0]


@torch.no_grad()
def score_configs(model, kind: str, ds: EncodedDataset, pad: int, configs,
                  batch_size: int = 64) -> list[list[dict]]:
    """`score` under each of ``configs`` (a list of SA-layer lists; ``[None]`` for dense), in one
    pass over the data: each batch is encoded once and run under every configuration, its
    layout, vision tower and shared first layers once (`visor_hidden_configs`). Encoding (the
    image processor and the chat template) was ~60 % of a configuration's evaluation on the
    synthetic splits, paid again for each of the 16 configurations. Memory: one batch.
    """
    model.eval()
    device = next(model.parameters()).device
    out: list[list[dict]] = [[] for _ in configs]
    for keep, batch in iter_batches(ds, pad, batch_size):
        batch = batch.to(device)
        if kind == "dense":
            runs = (dense_hidden(model, batch) for _ in configs)
            head = model.lm_head
        else:  # what every configuration shares runs once (visor_hidden_configs)
            runs = ((h, lay.text_labels) for h, lay in visor_hidden_configs(model, batch, configs))
            head = model.language_model.lm_head
        for recs, (hidden, labels) in zip(out, runs):
            ok, loss, n, prefix = answer_stats(hidden, labels, head)
            for j, i in enumerate(keep):
                recs.append({"index": i, "family": batch.meta[j].get("family", "all"),
                             "correct": bool(ok[j]), "loss": float(loss[j]), "tokens": int(n[j]),
                             "prefix": int(prefix[j])})
    return out


def summarise(records: list[dict], groups: dict[str, str]) -> dict:
    """Accuracy overall, per family and per group (the mean of its families), each with its 95 %
    Wilson interval (``*_ci``; a group's on its pooled questions)."""
    from visor_vllm.training.stats import wilson

    fam = defaultdict(list)
    for r in records:
        fam[r["family"]].append(r["correct"])
    families = {f: sum(v) / len(v) for f, v in sorted(fam.items())}
    by_group, pooled = defaultdict(list), defaultdict(lambda: [0, 0])
    for f, acc in families.items():
        g = groups.get(f, "all")
        by_group[g].append(acc)
        pooled[g][0] += sum(fam[f])
        pooled[g][1] += len(fam[f])
    k = sum(r["correct"] for r in records)
    return {"accuracy": k / max(len(records), 1),
            "accuracy_ci": wilson(k, len(records)),
            "families": families,
            "families_ci": {f: wilson(sum(v), len(v)) for f, v in sorted(fam.items())},
            "groups": {g: sum(v) / len(v) for g, v in sorted(by_group.items())},
            "groups_ci": {g: wilson(*pooled[g]) for g in sorted(by_group)},
            "samples": len(records)}


def with_ci(entry: dict) -> dict:
    """Accuracy, easy and hard of a `summarise` result (or a served pass), each with its 95 %
    interval (``*_ci``): the rows of a recipe's report."""
    g, ci = entry["groups"], entry.get("groups_ci", {})
    return {"accuracy": entry["accuracy"], "accuracy_ci": entry.get("accuracy_ci"),
            "easy": g.get("easy"), "easy_ci": ci.get("easy"),
            "hard": g.get("hard"), "hard_ci": ci.get("hard")}


def evaluation_inputs(checkpoint: str | Path, data: str | Path, max_samples: int | None = None):
    """``(kind, model, ds, pad)``: ``checkpoint`` loaded for scoring ("dense" or "visor") and
    ``data``'s samples as its encoder reads them (the first ``max_samples``), for `score`."""
    from visor_vllm.training.trainer import load_model

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    kind = "visor" if cfg.get("model_type") == "visor" else "dense"
    model = load_model("dense" if kind == "dense" else "stage2", checkpoint)
    records = load_records(data)
    if max_samples is not None:
        records = records[:max_samples]
    encoder = SampleEncoder(checkpoint)
    ds = EncodedDataset(records, encoder, default_image_folder(data))
    return kind, model, ds, encoder.tokenizer.pad_token_id


def evaluate(checkpoint: str | Path, data: str | Path, configs: list[list[int]] | None = None,
             batch_size: int = 64, max_samples: int | None = None,
             keep_records: bool = False) -> dict:
    """Accuracy of ``checkpoint`` on ``data``; VISOR: one entry per configuration."""
    kind, model, ds, pad = evaluation_inputs(checkpoint, data, max_samples)
    groups = dataset_groups(data)
    result = {"checkpoint": str(checkpoint), "kind": kind, "data": str(data)}
    if kind == "dense":
        recs = score(model, "dense", ds, pad, batch_size=batch_size)
        result["dense"] = summarise(recs, groups)
        if keep_records:
            result["dense"]["records"] = recs
    else:
        result["configs"] = []
        configs = [list(c) for c in (configs if configs is not None else model.config.sa_configs)]
        for c, recs in zip(configs, score_configs(model, "visor", ds, pad, configs, batch_size)):
            entry = {"sa_layers": list(c), **summarise(recs, groups)}
            if keep_records:
                entry["records"] = recs
            result["configs"].append(entry)
    result["skipped"] = ds.skipped.summary()
    return result
