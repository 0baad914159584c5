"""``visor-vllm recipe synthetic``: the paper's training recipe in miniature, end to end.

Phases, each writing under ``--out DIR`` (a rerun resumes: finished phases are kept):

1. ``data/`` -- the synthetic grid task (`visor_vllm.training.synthetic`), LLaVA JSONL + PNGs.
2. ``dense-init/`` -- a LLaVA-OneVision checkpoint of the ``synthetic`` preset: PyTorch's default
   init for the LLM and projector (transformers' N(0, 0.02) stayed on the lookup plateau in the
   feasibility study), and a **frozen, cell-local, pretrained encoder**: the 1-layer SigLIP's
   attention output is zeroed (so no cell sees another) and its patch embedding, position
   embedding and MLP are pretrained to classify each cell's colour and shape. This stands in for
   SigLIP-400M: good features, no cross-cell reasoning, which stays the LLM's job.
3. ``dense/`` -- transformers' LLaVA-OneVision trained on the task (the accuracy anchor), with the
   same trainer (`visor_vllm.training.trainer`) and recipe format as VISOR.
4. ``visor-init/`` -- ``visor-vllm convert`` of the dense model (CA o_proj and conv at zero,
   router biased to the costliest configuration).
5. ``visor/stage1``, ``visor/stage2`` -- the two stages (paper Sec. 4.2.3, 5.1).
6. evaluation of dense and of VISOR under every viable configuration on the test split;
   ``report.json`` and the final checkpoint in ``DIR/visor`` (a copy of stage 2's ``model/``).

``recipes/synthetic.yaml`` holds every hyper-parameter; its ``quick`` section overrides it for
smoke runs (``--quick``: a plumbing check in minutes -- the study found that the effects need
the dense baseline past its phase transitions, i.e. the full budget).

Footguns. Timings depend on load: run it on a quiet machine. The effects vary by seed; report
at least two (``--seed``).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from visor_vllm.training import synthetic
from visor_vllm.training.data import prompt_lengths
from visor_vllm.training.recipe import DataSpec, RecipeError, StageSpec, TrainRecipe


def load_recipe(name: str = "synthetic", quick: bool = False) -> dict:
    import yaml

    text = resources.files("visor_vllm.training").joinpath("recipes", f"{name}.yaml").read_text()
    full = yaml.safe_load(text)
    quick_over = full.pop("quick", {})
    return _merge(full, quick_over) if quick else full


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# Phase 2: the dense initial checkpoint with a frozen, cell-local, pretrained encoder
# ---------------------------------------------------------------------------------------------

def make_cell_local(tower) -> None:
    """Zero every SigLIP attention output: each patch token then only sees itself."""
    for layer in getattr(tower, "vision_model", tower).encoder.layers:  # transformers 5 drops it
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.out_proj.bias)


def pretrain_encoder(model, processor, steps: int, lr: float, batch_size: int, seed: int,
                     progress: bool = True) -> dict:
    """Per-cell colour/shape classification through the tower; returns held-out accuracy."""
    import random

    from PIL import Image
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    make_cell_local(tower)
    train = [p for n, p in tower.named_parameters() if ".self_attn." not in n]
    for p in tower.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    d = model.config.vision_config.hidden_size
    heads = torch.nn.Linear(d, 5 + 5)
    opt = torch.optim.AdamW(train + list(heads.parameters()), lr=lr, weight_decay=0.0)

    def batch(rng, n):
        scenes = [synthetic.random_scene(rng) for _ in range(n)]
        imgs = [Image.fromarray(synthetic.render(s, rng)) for s in scenes]
        pix = processor.image_processor(imgs, return_tensors="pt")["pixel_values"][:, 0]
        labels = [synthetic.cell_labels(s) for s in scenes]
        col = torch.tensor([c for c, _ in labels])
        shp = torch.tensor([s for _, s in labels])
        return pix, col, shp

    def logits(pix):
        h = tower(pix, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        out = heads(h)                                    # [B, cells, 10]
        return out[..., :5], out[..., 5:]

    rng = random.Random(f"encoder/{seed}")
    tower.train()
    for _ in tqdm(range(steps), desc="encoder", disable=not progress):
        pix, col, shp = batch(rng, batch_size)
        lc, ls = logits(pix)
        loss = (torch.nn.functional.cross_entropy(lc.flatten(0, 1), col.flatten())
                + torch.nn.functional.cross_entropy(ls.flatten(0, 1), shp.flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    with torch.no_grad():
        pix, col, shp = batch(random.Random(f"encoder-test/{seed}"), 256)
        lc, ls = logits(pix)
        occupied = col != 0
        acc = {"colour": float((lc.argmax(-1) == col).float().mean()),
               "shape": float((ls.argmax(-1) == shp).float().mean()),
               "shape_of_occupied": float((ls.argmax(-1) == shp)[occupied].float().mean())}
    for p in tower.parameters():
        p.requires_grad_(False)
    return acc


def build_dense_init(out: Path, cfg: dict, seed: int, progress: bool) -> dict:
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_vllm.checkpoints.build import build_tiny_llava_onevision
    from visor_vllm.checkpoints.files import load_processor
    from visor_vllm.training.trainer import save_model

    raw = out.with_name(out.name + "-random")
    shutil.rmtree(raw, ignore_errors=True)
    build_tiny_llava_onevision(raw, seed=seed, preset="synthetic",
                               extra_corpus=synthetic.corpus())
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(raw), local_files_only=True)
    torch.manual_seed(seed)
    for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
        for m in part.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.reset_parameters()  # PyTorch's default init (see module docstring)
    enc = cfg["encoder"]
    acc = pretrain_encoder(model, load_processor(raw), enc["steps"], enc["lr"], enc["batch_size"],
                           seed, progress)
    save_model("dense", model, raw, out)
    shutil.rmtree(raw)
    (out / "encoder.json").write_text(json.dumps(acc, indent=2) + "\n")
    return acc


# ---------------------------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------------------------

def _stage(d: dict) -> StageSpec:
    return StageSpec(**d)


def _train(init: Path, data: Path, out: Path, stages: list[dict], cfg: dict) -> Path:
    from visor_vllm.training.trainer import run

    recipe = TrainRecipe(init=str(init), data=DataSpec(train=str(data / "train.jsonl"),
                                                       max_length=cfg.get("max_length", 512)),
                         output_dir=str(out), stages=[_stage(s) for s in stages],
                         seed=cfg["seed"], save_every=cfg.get("save_every", 500),
                         log_every=cfg.get("log_every", 25))
    return run(recipe)


def _curve(stage_dir: Path) -> list[list[float]]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [[r["step"], round(r["loss"], 5)] for r in map(json.loads, path.read_text().splitlines())]


def run_synthetic(out: str | Path, quick: bool = False, seed: int | None = None,
                  progress: bool = True, overrides: dict | None = None) -> dict:
    """Run the synthetic recipe into ``out``; returns (and writes) ``out/report.json``.

    ``overrides`` is merged over the recipe (after ``quick``): tests shrink it to seconds.
    """
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops
    from visor_vllm.training.evaluate import evaluate

    cfg = _merge(load_recipe("synthetic", quick), overrides or {})
    if seed is not None:
        cfg["seed"] = seed
    seed = cfg["seed"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    t_all = time.time()

    def phase(name, fn):
        t = time.time()
        r = fn()
        wall[name] = round(time.time() - t, 1)
        return r

    data = out / "data"
    if not (data / "dataset.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        d = cfg["data"]
        phase("data", lambda: synthetic.write_dataset(
            data, seed=seed, n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"],
            turns=d["turns"], families=d.get("families", synthetic.FAMILIES), progress=progress))
    dense_init = out / "dense-init"
    if not (dense_init / "encoder.json").exists():
        phase("encoder", lambda: build_dense_init(dense_init, cfg, seed, progress))
    encoder_acc = json.loads((dense_init / "encoder.json").read_text())
    dense = phase("dense", lambda: _train(dense_init, data, out / "dense-run",
                                          [cfg["dense"]], cfg))
    visor_init = out / "visor-init"
    if not (visor_init / "config.json").exists():
        shutil.rmtree(visor_init, ignore_errors=True)
        phase("convert", lambda: convert(dense, visor_init, preset=get_preset("synthetic"),
                                         progress=False))
    final = phase("visor", lambda: _train(visor_init, data, out / "visor-run",
                                          [cfg["stage1"], cfg["stage2"]], cfg))
    test = data / f"{cfg['eval'].get('split', 'test')}.jsonl"
    bs = cfg["eval"].get("batch_size", 128)
    n_eval = cfg["eval"].get("max_samples")
    ev = {}
    ev["dense"] = phase("eval_dense", lambda: evaluate(dense, test, batch_size=bs,
                                                       max_samples=n_eval))["dense"]
    s1 = out / "visor-run" / cfg["stage1"].get("name", "stage1") / "model"
    vcfg = get_preset("synthetic")
    cheapest, costliest = vcfg.sa_configs[0], vcfg.sa_configs[-1]
    ev["converted"] = phase("eval_converted", lambda: evaluate(
        visor_init, test, [cheapest, costliest], bs, n_eval))["configs"]
    ev["stage1"] = phase("eval_stage1", lambda: evaluate(
        s1, test, [cheapest, costliest], bs, n_eval))["configs"]
    ev["stage2"] = phase("eval_stage2", lambda: evaluate(final, test, None, bs, n_eval))["configs"]
    visor_dir = out / "visor"
    shutil.rmtree(visor_dir, ignore_errors=True)
    shutil.copytree(final, visor_dir)

    nv, nt = prompt_lengths(final, test)
    dense_f = dense_prefill_flops(vcfg, nv, nt)
    table = []
    for c in ev["stage2"]:
        table.append({"sa_layers": c["sa_layers"], "sa_layers_1based": [i + 1 for i in c["sa_layers"]],
                      "n_sa": len(c["sa_layers"]),
                      "prefill_flops_vs_dense": round(prefill_flops(vcfg, nv, nt, c["sa_layers"])
                                                      / dense_f, 4),
                      "easy": c["groups"].get("easy"), "hard": c["groups"].get("hard"),
                      "accuracy": c["accuracy"], "families": c["families"]})
    wall["total"] = round(time.time() - t_all, 1)
    report = {
        "recipe": "synthetic", "quick": quick, "seed": seed,
        "note": ("quick run: a plumbing check; the effects need the full budget" if quick
                 else "full recipe"),
        "wall_seconds": wall, "image_tokens": nv, "text_tokens": nt,
        "loss_curve": {"dense": _curve(out / "dense-run" / "dense"),
                       "stage1": _curve(out / "visor-run" / cfg["stage1"].get("name", "stage1")),
                       "stage2": _curve(out / "visor-run" / cfg["stage2"].get("name", "stage2"))},
        "encoder": encoder_acc,
        "dense": {"easy": ev["dense"]["groups"].get("easy"), "hard": ev["dense"]["groups"].get("hard"),
                  "accuracy": ev["dense"]["accuracy"], "families": ev["dense"]["families"]},
        "converted": _brief(ev["converted"]), "stage1": _brief(ev["stage1"]),
        "configs": table,
        "findings": _findings(ev["dense"], table),
        "recipe_config": cfg,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _brief(entries: list[dict]) -> list[dict]:
    return [{"sa_layers": e["sa_layers"], "easy": e["groups"].get("easy"),
             "hard": e["groups"].get("hard"), "families": e["families"]} for e in entries]


def _findings(dense: dict, table: list[dict]) -> dict:
    """The paper's first two findings, stated from the numbers (the third needs the router)."""
    by_n: dict[int, list[float]] = {}
    for r in table:
        by_n.setdefault(r["n_sa"], []).append(r["hard"])
    hard_by_n = {n: round(sum(v) / len(v), 4) for n, v in sorted(by_n.items())}
    cheapest = min(table, key=lambda r: r["n_sa"])
    ns = sorted(hard_by_n)
    return {
        "cheapest_easy_vs_dense_easy": [cheapest["easy"], dense["groups"].get("easy")],
        "finding1_cheapest_matches_dense_on_easy":
            cheapest["easy"] is not None and dense["groups"].get("easy") is not None
            and cheapest["easy"] >= dense["groups"]["easy"] - 0.02,
        "hard_accuracy_by_number_of_sa_layers": hard_by_n,
        "finding2_hard_rises_with_sa_layers":
            all(hard_by_n[a] <= hard_by_n[b] + 0.005 for a, b in zip(ns, ns[1:]))
            and hard_by_n[ns[-1]] > hard_by_n[ns[0]] + 0.02,
        "tolerances": "finding 1: within 2 points; finding 2: non-decreasing within 0.5 point "
                      "per step and +2 points from fewest to most SA layers",
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("recipe", help="run a whole built-in training recipe")
    p.add_argument("name", choices=["synthetic"])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true",
                   help="smoke run in minutes (a plumbing check, not evidence)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cli_recipe)


def _cli_recipe(args) -> int:
    import sys

    try:
        report = run_synthetic(args.out, quick=args.quick, seed=args.seed)
    except (RecipeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("wall_seconds", "dense", "findings")}, indent=2))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'visor'}")
    return 0
