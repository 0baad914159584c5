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
4. ``visor-init/`` -- ``visor-vllm convert`` of the dense model to the recipe's ``preset``
   (`SYNTHETIC_PRESETS`: one LLaVA-OV part, three layer schedules; CA o_proj and conv at zero,
   router biased to the costliest configuration).
5. ``visor/stage1``, ``visor/stage2`` -- the two stages (paper Sec. 4.2.3, 5.1).
6. offline evaluation of dense and of VISOR under every configuration on the test split;
7. adaptive inference (paper Sec. 4.2.3 step 2, 4.3): ``search`` of every SA subset on val and
   the viable set written into ``visor-viable/``; pseudo-labels of every viable configuration
   on the ``label`` split (``labels.json``); the router trained on them (``visor-routed/``) and
   its offline ``auto`` accuracy, SA layers and FLOPs on the test split;
8. ``report.json`` and the final, routed checkpoint in ``DIR/visor``.

Serving the result and measuring it through ``vllm serve`` is the evaluation side's
(`visor_vllm.evaluation.recipe`, which the ``visor-vllm recipe`` command runs after this).

``recipes/synthetic.yaml`` holds every hyper-parameter; its ``quick`` section overrides it for
smoke runs (``--quick``: a plumbing check in minutes -- the study found that the effects need
the dense baseline past its phase transitions, i.e. the full budget).

Footguns. Timings depend on load: run it on a quiet machine. The effects vary by seed; report
at least two (``--seed``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from visor_vllm.training import machine, synthetic
from visor_vllm.training.data import PixelStore, prompt_lengths
from visor_vllm.training.evaluate import with_ci
from visor_vllm.training.recipe import (DataSpec, RecipeError, TrainRecipe, is_number, load_yaml,
                                        stage_from_dict)


def load_recipe(name: str = "synthetic", quick: bool = False) -> dict:
    text = resources.files("visor_vllm.training").joinpath("recipes", f"{name}.yaml").read_text()
    full = load_yaml(text)
    quick_over = full.pop("quick", {})
    return _merge(full, quick_over) if quick else full


def recipe_config(quick: bool = False, overrides: dict | None = None,
                  name: str = "synthetic") -> dict:
    """The recipe a run uses: the YAML (with its ``quick`` part if asked), then ``overrides``."""
    return _merge(load_recipe(name, quick), overrides or {})


# A key is added to the recipe at a default that keeps the old behaviour, so a run recorded
# before the key existed ran with that value. When a default changes later, the value it had
# when its key was added goes here (dotted key -> value): such a run still reads as what it ran.
DEFAULTS_WHEN_ADDED = {
    "chat_template": "chatml",          # defaults changed 2026-12-06 (docs/training.md,
    "preset": "synthetic",              # "The default recipe"); each key was recorded by
    "encoder.position_table": 0.0,      # every run since the day it was added
    "labels.test": "paired",
    "data.families": None,
}


def recorded_config(quick: bool, recorded: dict) -> dict:
    """The recipe a finished run used, from its report's ``recipe_config``: keys it lacks
    take the value they had when added (`DEFAULTS_WHEN_ADDED`), else today's default."""
    cfg = recipe_config(quick, recorded)
    for dotted, value in DEFAULTS_WHEN_ADDED.items():
        *parents, key = dotted.split(".")
        have, node = recorded, cfg
        for k in parents:
            have, node = (have or {}).get(k), node.setdefault(k, {})
        if not isinstance(have, dict) or key not in have:
            node[key] = value
    return cfg


def overrides_from_sets(items: list[str], recipe: dict) -> dict:
    """``["stage2.steps=2500", "chat_template=compact"]`` -> nested overrides of ``recipe``.

    Values are YAML (``2500`` an int, ``true`` a bool, ``[1, 2]`` a list, ``2e-3`` a float:
    `load_yaml`). A key the recipe does not have is a `RecipeError` naming the keys it has
    there, and so is a value that is not a number where the recipe has one (an integer where it
    has an integer): a typo must not run a 30-minute recipe with the default silently kept, nor
    fail after its dense phase.
    """
    import yaml

    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        path = [k for k in key.strip().split(".") if k]
        if not eq or not path:
            raise RecipeError(f"--set {item!r}: give KEY=VALUE, e.g. stage2.steps=2500")
        node, where = recipe, ""
        for k in path:
            if not isinstance(node, dict) or k not in node:
                have = sorted(node) if isinstance(node, dict) else []
                raise RecipeError(f"--set {item!r}: the recipe has no {where + k!r}"
                                  + (f" (there: {', '.join(have)})" if have else ""))
            node, where = node[k], where + k + "."
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: the value is not YAML ({e})") from e
        _check_number(item, node, value)
        target = out
        for k in path[:-1]:
            target = target.setdefault(k, {})
        target[path[-1]] = value
    return out


def _check_number(item: str, current, value) -> None:
    """A `RecipeError` where the recipe's value is a number and ``value`` is not one of its kind."""
    if not is_number(current):
        return
    if is_number(current, integer=True) and not is_number(value, integer=True):
        raise RecipeError(f"--set {item!r}: an integer here (the recipe has {current!r}), "
                          f"got {value!r}")
    if not is_number(value):
        raise RecipeError(f"--set {item!r}: a number here (the recipe has {current!r}), "
                          f"got {value!r}")


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# Phase 2: the dense initial checkpoint with a frozen, cell-local, pretrained encoder
# ---------------------------------------------------------------------------------------------

def siglip_body(tower):
    """The SigLIP module holding ``embeddings`` and ``encoder`` (transformers 5 drops the
    ``vision_model`` wrapper that 4.x had)."""
    return getattr(tower, "vision_model", tower)


def make_cell_local(tower) -> None:
    """Zero every SigLIP attention output: each patch token then only sees itself."""
    for layer in siglip_body(tower).encoder.layers:
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.out_proj.bias)


def variance_share(h: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-group over total variance of ``h`` [N, d] grouped by ``labels`` [N] (eta^2)."""
    centred = h - h.mean(0)
    total = centred.pow(2).sum()
    groups = labels.unique()
    onehot = (labels[:, None] == groups[None]).to(h.dtype)          # [N, G]
    counts = onehot.sum(0)                                           # [G]
    means = (onehot.T @ centred) / counts[:, None]                   # [G, d]
    return float((counts[:, None] * means.pow(2)).sum() / total.clamp_min(1e-12))


def pretrain_encoder(model, processor, steps: int, lr: float, batch_size: int, seed: int,
                     progress: bool = True, position: bool = False,
                     position_weight: float = 1.0, position_table: float = 0.0) -> dict:
    """Per-cell colour/shape (and, with ``position``, row/column) classification through the
    tower; returns held-out accuracy and ``share``: the fraction of the tower's per-cell output
    variance that cell position, colour and shape each explain (between-group over total).

    ``position``: each cell's token must also say where it is, as SigLIP's tokens do (its
    learned position embeddings are linearly decodable). Without it the position embedding is
    trained only not to disturb colour and shape, so "colour at r c" needs the LLM to compute an
    address from RoPE positions; VISOR's cross-attention (no RoPE, a +-3 conv) could not learn
    that in any seed of 2026-12-04, while dense learnt it on some seeds only. Footgun: at
    ``position_weight`` 1 the position codes take as much of each token's variance as colour,
    and no model learns the lookups then; the recipe keeps it off (``encoder.position``; the
    runs, with and without a lighter weight, are in docs/training.md).

    ``position_table`` > 0: SigLIP's position embedding [cells, d] is set to a 2-D factorised
    table, row + column with each entry N(0, position_table^2) (the feasibility study's encoder,
    on which VISOR's cheapest configuration learnt the lookups), and frozen: nothing trains it
    away, so every token keeps an address that is linear in row and column. 0 (the default):
    the embedding trains with the tower and pretraining washes it out (position share ~0.008).
    """
    import random

    from PIL import Image
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    make_cell_local(tower)
    d = model.config.vision_config.hidden_size
    if position_table > 0:
        table = siglip_body(tower).embeddings.position_embedding.weight
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(synthetic.GRID, d, generator=g) * position_table     # [GRID, d]
        cols = torch.randn(synthetic.GRID, d, generator=g) * position_table     # [GRID, d]
        with torch.no_grad():  # SigLIP numbers patches row-major: index = row * GRID + column
            table.copy_((rows[:, None] + cols[None]).reshape(-1, d))
    train = [p for n, p in tower.named_parameters() if ".self_attn." not in n
             and not (position_table > 0 and "position_embedding" in n)]
    for p in tower.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    heads = torch.nn.Linear(d, 5 + 5 + synthetic.GRID + synthetic.GRID)
    cells = torch.arange(synthetic.GRID * synthetic.GRID)
    row, column = cells // synthetic.GRID, cells % synthetic.GRID  # [cells], row-major
    opt = torch.optim.AdamW(train + list(heads.parameters()), lr=lr, weight_decay=0.0)

    def batch(rng, n):
        scenes = [synthetic.random_scene(rng) for _ in range(n)]
        imgs = [Image.fromarray(synthetic.render(s, rng)) for s in scenes]
        pix = processor.image_processor(imgs, return_tensors="pt")["pixel_values"][:, 0]
        labels = [synthetic.cell_labels(s) for s in scenes]
        col = torch.tensor([c for c, _ in labels])
        shp = torch.tensor([s for _, s in labels])
        return pix, col, shp

    def features(pix):                                   # [B, cells, d]
        return tower(pix, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer]

    def logits(h):
        out = heads(h)                                    # [B, cells, 10 + 2 * GRID]
        g = synthetic.GRID
        return out[..., :5], out[..., 5:10], out[..., 10:10 + g], out[..., 10 + g:]

    def ce(logit, target):                               # logit [B, cells, k], target [B|1, cells]
        return torch.nn.functional.cross_entropy(logit.flatten(0, 1),
                                                 target.expand(logit.shape[:2]).flatten())

    rng = random.Random(f"encoder/{seed}")
    tower.train()
    for _ in tqdm(range(steps), desc="encoder", disable=not progress):
        pix, col, shp = batch(rng, batch_size)
        lc, ls, lrow, lcol = logits(features(pix))
        loss = ce(lc, col) + ce(ls, shp)
        if position:
            loss = loss + position_weight * (ce(lrow, row[None]) + ce(lcol, column[None]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    with torch.no_grad():
        pix, col, shp = batch(random.Random(f"encoder-test/{seed}"), 256)
        h = features(pix)
        lc, ls, lrow, lcol = logits(h)
        occupied = col != 0
        acc = {"colour": float((lc.argmax(-1) == col).float().mean()),
               "shape": float((ls.argmax(-1) == shp).float().mean()),
               "shape_of_occupied": float((ls.argmax(-1) == shp)[occupied].float().mean())}
        if position:
            acc["row"] = float((lrow.argmax(-1) == row).float().mean())
            acc["column"] = float((lcol.argmax(-1) == column).float().mean())
        flat = h.flatten(0, 1)                           # [B * cells, d]
        acc["share"] = {k: round(variance_share(flat, lab.expand(h.shape[:2]).flatten()), 4)
                        for k, lab in (("position", cells[None]), ("colour", col),
                                       ("shape", shp))}
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
                               extra_corpus=synthetic.corpus(),
                               template=cfg.get("chat_template", "chatml"))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(raw), local_files_only=True)
    torch.manual_seed(seed)
    for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
        for m in part.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.reset_parameters()  # PyTorch's default init (see module docstring)
    enc = cfg["encoder"]
    acc = pretrain_encoder(model, load_processor(raw), enc["steps"], enc["lr"], enc["batch_size"],
                           seed, progress, bool(enc.get("position", False)),
                           float(enc.get("position_weight", 1.0)),
                           float(enc.get("position_table", 0.0)))
    save_model("dense", model, raw, out)
    shutil.rmtree(raw)
    (out / "encoder.json").write_text(json.dumps(acc, indent=2) + "\n")
    return acc


# ---------------------------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------------------------

def _data_spec(data: Path, cfg: dict) -> DataSpec:
    return DataSpec(train=str(data / "train.jsonl"), max_length=cfg.get("max_length", 512))


def _train(init: Path, data: Path, out: Path, stages: list[dict], cfg: dict,
           pixels: PixelStore) -> Path:
    from visor_vllm.training.trainer import run

    recipe = TrainRecipe(init=str(init), data=_data_spec(data, cfg),
                         output_dir=str(out), stages=[stage_from_dict(s) for s in stages],
                         seed=cfg["seed"], save_every=cfg.get("save_every", 500),
                         log_every=cfg.get("log_every", 25), compile=cfg["compile"])
    return run(recipe, pixels=pixels)


def _curve(stage_dir: Path) -> list[list[float]]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [[r["step"], round(r["loss"], 5)] for r in map(json.loads, path.read_text().splitlines())]


TRAINING_OUTPUTS = ("data", "dense-init", "dense-run", "visor-init", "visor-run")
ADAPTIVE_KEYS = ("eval", "search", "labels", "router", "serve")  # what runs after training
VISOR_STAGE_KEYS = ("stage1", "stage2")  # what only visor-run depends on
CONVERSION_KEYS = ("preset",)  # what visor-init depends on (and visor-run through it)
SYNTHETIC_PRESETS = ("synthetic", "synthetic-5sa", "synthetic-late-ca")  # one LLaVA-OV part,
                                                                    # three VISOR schedules
DENSE_PHASES = ("data", "data_label", "encoder", "dense", "convert")  # what builds the rest


ABSENT = object()  # a key one recipe config lacks (`recipe_value_differences`)


def recipe_value_differences(have: dict, want: dict, where: str = "") -> list[tuple]:
    """``(dotted key, value there, value here)`` for every value that differs between two
    recipe configs (the seed aside); a side that lacks the key has `ABSENT` there."""
    out = []
    for k in sorted(set(have) | set(want)):
        if not where and k == "seed":
            continue
        a, b = have.get(k, ABSENT), want.get(k, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_value_differences(a, b, where + k + ".")
        elif a != b:
            out.append((where + k, a, b))
    return out


def recipe_differences(have: dict, want: dict) -> list[str]:
    """`recipe_value_differences` as lines ("stage2.steps: 1500 there, 2500 here"); a key one
    side lacks reads as None there, and differs only from a value that is not None."""
    none = lambda v: None if v is ABSENT else v  # noqa: E731
    return [f"{k}: {none(a)!r} there, {none(b)!r} here"
            for k, a, b in recipe_value_differences(have, want) if none(a) != none(b)]


def reuse_training(src: str | Path, out: str | Path, cfg: dict) -> Path:
    """Start run ``out`` of recipe ``cfg`` from the trained models of finished run ``src``.

    What. Copies ``src``'s training outputs into ``out`` so `run_synthetic` there skips what
    they already hold:

    - only the `ADAPTIVE_KEYS` differ: every training output (`TRAINING_OUTPUTS`: data, the
      dense and VISOR models, their states); only the offline evaluation, search,
      pseudo-labels, router and serving rerun, so another label rule costs minutes;
    - `VISOR_STAGE_KEYS` differ too: data, the dense model and the converted one, so a stage-1
      or stage-2 change retrains only VISOR's stages (a third of a run's minutes);
    - `CONVERSION_KEYS` (the VISOR ``preset``) differ too: data and the dense model; the
      conversion reruns (seconds) and both VISOR stages retrain.

    Writes ``out/reused_training.json``: the source, the outputs taken (``outputs``), its wall
    seconds and ``seconds_reused`` (the source's seconds that built them, `DENSE_PHASES`, when
    VISOR is retrained: that run's minutes plus these are what the run would have cost alone).

    Why refuse. Any other key (or the seed) differing is refused with the key named: a run
    whose models came from another recipe would report that recipe's training under this one's
    name. The recipe's ``quick`` part is compared as a whole for the same reason.

    Footgun. The images are hard links (100k PNGs), everything else is copied; nothing later
    writes into a finished training directory, so the source is never changed.
    """
    src, out = Path(src), Path(out)
    try:
        prev = json.loads((src / "report.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{src} holds no finished run (its report.json: {e})") from e
    # a key added to the recipe after that run takes its value then (see run_seeds)
    have = recorded_config(bool(prev.get("quick")), prev.get("recipe_config") or {})
    differ = [d for d in recipe_differences(have, cfg) if _key(d) not in ADAPTIVE_KEYS]
    if have.get("seed") != cfg.get("seed"):
        differ.insert(0, f"seed: {have.get('seed')!r} there, {cfg.get('seed')!r} here")
    keys = {_key(d) for d in differ}
    if not keys <= set(VISOR_STAGE_KEYS + CONVERSION_KEYS):
        raise ValueError(f"{src} was trained with another recipe ({', '.join(differ)}); only "
                         f"{', '.join(ADAPTIVE_KEYS + VISOR_STAGE_KEYS + CONVERSION_KEYS)} may "
                         "differ when reusing its training (stage1, stage2: VISOR is "
                         "retrained; preset: converted again too)")
    retrain = bool(keys)
    outputs = (TRAINING_OUTPUTS[:-2] if keys & set(CONVERSION_KEYS) else
               TRAINING_OUTPUTS[:-1] if retrain else TRAINING_OUTPUTS)
    missing = [d for d in outputs if not (src / d).is_dir()]
    if missing:
        raise ValueError(f"{src} lacks {', '.join(missing)}: nothing to reuse")
    present = [d for d in TRAINING_OUTPUTS if (out / d).exists()]
    if present:
        raise ValueError(f"{out} already has {', '.join(present)}: reuse into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for d in outputs:
        shutil.copytree(src / d, out / d, symlinks=True,
                        **({"copy_function": os.link} if d == "data" else {}))
    marker = {"from": str(src.resolve()), "outputs": list(outputs),
              "wall_seconds": run_seconds(prev), "hosts": run_hosts(prev),
              **({"seconds_reused": _dense_seconds(prev, "visor-init" in outputs)}
                 if retrain else {})}
    (out / "reused_training.json").write_text(json.dumps(marker, indent=1) + "\n")
    return out


def _check_schedule(visor_init: Path, want) -> None:
    """Refuse to resume ``visor_init`` (and the stages trained from it) under another preset
    (``want``, its `VisorConfig`): the conversion would be kept and evaluated as the new
    schedule."""
    path = visor_init / "config.json"
    if not path.exists():
        return
    have = json.loads(path.read_text())
    if (have.get("layer_types"), have.get("sa_configs")) != (want.layer_types, want.sa_configs):
        raise RecipeError(f"{visor_init} was converted to another layer schedule than this "
                          f"preset's ({have.get('layer_types')}); resume it with its own "
                          "preset, or start a new directory (--reuse-training keeps the dense model)")


def _key(difference: str) -> str:
    """The top-level recipe key of a `recipe_differences` line ("stage2.steps: ..." -> "stage2")."""
    return difference.split(":")[0].split(".")[0]


def run_seconds(report: dict) -> dict[str, float]:
    """Seconds per phase of the run behind ``report``: every invocation's (`WallLedger`), or
    this invocation's for a report written before the ledger existed."""
    return report.get("wall_seconds_cumulative") or report.get("wall_seconds") or {}


def run_hosts(report: dict) -> list[dict]:
    """The machines behind ``report``'s models and numbers: those of the runs whose training it
    reused (followed back through a chain of reuses), then its own (`WallLedger.hosts`); none
    for a report written before hosts were recorded."""
    return machine.distinct([*((report.get("reused_training") or {}).get("hosts") or []),
                             *(report.get("hosts") or [])])


def _dense_seconds(report: dict, converted: bool = True) -> float:
    """Seconds the run that built ``report``'s data and dense model spent on them
    (`DENSE_PHASES`; without ``convert`` when the conversion is not reused), following a
    chain of reuses back to it."""
    wall = run_seconds(report)
    earlier = report.get("reused_training")
    if earlier:
        if "seconds_reused" in earlier:
            return earlier["seconds_reused"]
        wall = earlier.get("wall_seconds") or {}  # it reused every model: its source's phases
    return round(sum(wall.get(k, 0.0) for k in DENSE_PHASES if converted or k != "convert"), 1)


class WallLedger:
    """Seconds per phase of every invocation into one output directory (``wall_seconds.json``).

    A report's ``wall_seconds`` is this invocation only: a resumed run would report just the
    remainder (a rerun of a finished run, seconds). ``cumulative()`` sums every invocation, lost
    work of earlier attempts included, so a resumed seed still says what it cost. Each
    invocation that ran a phase also records its machine (``host``, `machine.describe`):
    ``hosts()`` are the report's ``hosts``, since minutes and trained numbers both depend on it.
    Footgun: a phase interrupted mid-way is not recorded (it never finished).
    """

    def __init__(self, out: Path):
        self.path = Path(out) / "wall_seconds.json"
        try:
            self.runs = json.loads(self.path.read_text())["invocations"]
        except (OSError, ValueError, KeyError, TypeError):
            self.runs = []
        self.runs.append({})

    def add(self, name: str, seconds: float) -> None:
        run = self.runs[-1]
        if "host" not in run:  # where this invocation's seconds were spent (`machine`)
            run["host"] = machine.describe()
        run[name] = round(run.get(name, 0.0) + seconds, 1)
        self.path.write_text(json.dumps({"invocations": self.runs}, indent=1) + "\n")

    def hosts(self) -> list[dict]:
        """The machines that ran a phase here (`machine.describe`), each once, in order; a
        ledger older than this record has none."""
        return machine.distinct(run.get("host") for run in self.runs)

    def cumulative(self) -> dict[str, float]:
        """Seconds per phase over every invocation; ``total``: each invocation's own total, or,
        for one that stopped early, the sum of the phases it finished."""
        out: dict[str, float] = {"total": 0.0}
        for run in self.runs:
            phases = {k: v for k, v in run.items() if k not in ("total", "host")}
            for k, v in phases.items():
                out[k] = round(out.get(k, 0.0) + v, 1)
            done = run["total"] if "total" in run else sum(phases.values())
            out["total"] = round(out["total"] + done, 1)
        return out


def run_synthetic(out: str | Path, quick: bool = False, seed: int | None = None,
                  progress: bool = True, overrides: dict | None = None,
                  reuse_from: str | Path | None = None) -> dict:
    """Run the synthetic recipe into ``out``; returns (and writes) ``out/report.json``.

    ``overrides`` is merged over the recipe (after ``quick``): tests shrink it to seconds.
    ``reuse_from``: a finished run whose trained models ``out`` starts from (`reuse_training`
    says which recipe keys may differ and what is retrained then).
    """
    from visor_vllm.checkpoints.convert import convert
    from visor_vllm.model.config import get_preset
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops
    from visor_vllm.training.evaluate import evaluate
    from visor_vllm.training.labels import LABEL_TESTS, RULES
    from visor_vllm.training.stats import TESTS

    cfg = recipe_config(quick, overrides)
    if seed is not None:
        cfg["seed"] = seed
    seed = cfg["seed"]
    # the YAML has every key (overrides only change values): its defaults are the only ones
    for name, allowed in (("labels.rule", RULES), ("labels.test", LABEL_TESTS),
                          ("search.test", TESTS), ("preset", SYNTHETIC_PRESETS)):
        *section, key = name.split(".")
        value = (cfg[section[0]] if section else cfg)[key]
        if value not in allowed:  # fail now, not after training
            raise RecipeError(f"{name} is one of {allowed}, got {value!r}")
    for k in ("dense", "stage1", "stage2"):  # every stage's values now, not at its turn
        stage_from_dict({**cfg[k], "teacher": "(dense)"} if cfg[k].get("distill") else cfg[k])
    preset = cfg["preset"]
    vcfg = get_preset(preset)
    out = Path(out)
    if reuse_from is not None and not (out / "reused_training.json").exists():
        reuse_training(reuse_from, out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    ledger = WallLedger(out)
    t_all = time.time()

    def phase(name, fn):
        t = time.time()
        r = fn()
        wall[name] = round(time.time() - t, 1)
        ledger.add(name, wall[name])
        return r

    data = out / "data"
    d = cfg["data"]
    if not {"train", "val", "test"} <= set(_splits(data)):
        shutil.rmtree(data, ignore_errors=True)
        phase("data", lambda: synthetic.write_dataset(
            data, seed=seed, n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"],
            turns=d["turns"], families=d.get("families") or synthetic.FAMILIES, progress=progress,
            n_label=d.get("n_label", 0)))
    if d.get("n_label") and _splits(data).get("label", {}).get("samples") != d["n_label"]:
        phase("data_label", lambda: synthetic.add_split(data, "label", d["n_label"],
                                                        progress=progress))
    dense_init = out / "dense-init"
    if not (dense_init / "encoder.json").exists():
        phase("encoder", lambda: build_dense_init(dense_init, cfg, seed, progress))
    encoder_acc = json.loads((dense_init / "encoder.json").read_text())
    # the dense phase's processed images, reused by VISOR's stages (the same image processor)
    pixels = PixelStore(_data_spec(data, cfg).pre_encode_gb * 2 ** 30)
    dense = phase("dense", lambda: _train(dense_init, data, out / "dense-run",
                                          [cfg["dense"]], cfg, pixels))
    visor_init = out / "visor-init"
    _check_schedule(visor_init, vcfg)
    if not (visor_init / "config.json").exists():
        shutil.rmtree(visor_init, ignore_errors=True)
        phase("convert", lambda: convert(dense, visor_init, preset=preset,
                                         progress=False))
    # a stage that distils (`distill` > 0) reads the dense model above as its teacher
    stages = [{**cfg[k], "teacher": str(dense)} if cfg[k].get("distill") else cfg[k]
              for k in ("stage1", "stage2")]
    final = phase("visor", lambda: _train(visor_init, data, out / "visor-run", stages, cfg,
                                          pixels))
    pixels.clear()
    test = data / f"{cfg['eval'].get('split', 'test')}.jsonl"
    bs = cfg["eval"].get("batch_size", 128)
    n_eval = cfg["eval"].get("max_samples")
    ev = {}
    ev["dense"] = phase("eval_dense", lambda: evaluate(dense, test, batch_size=bs,
                                                       max_samples=n_eval))["dense"]
    s1 = out / "visor-run" / cfg["stage1"].get("name", "stage1") / "model"
    cheapest, costliest = vcfg.sa_configs[0], vcfg.sa_configs[-1]
    ev["converted"] = phase("eval_converted", lambda: evaluate(
        visor_init, test, [cheapest, costliest], bs, n_eval))["configs"]
    ev["stage1"] = phase("eval_stage1", lambda: evaluate(
        s1, test, [cheapest, costliest], bs, n_eval))["configs"]
    ev["stage2"] = phase("eval_stage2", lambda: evaluate(final, test, None, bs, n_eval,
                                                         keep_records=True))["configs"]

    nv, nt = prompt_lengths(final, test)
    dense_f = dense_prefill_flops(vcfg, nv, nt)
    table = []
    for c in ev["stage2"]:
        table.append({"sa_layers": c["sa_layers"], "sa_layers_1based": [i + 1 for i in c["sa_layers"]],
                      "n_sa": len(c["sa_layers"]),
                      "prefill_flops_vs_dense": round(prefill_flops(vcfg, nv, nt, c["sa_layers"])
                                                      / dense_f, 4),
                      **with_ci(c), "families": c["families"]})

    adaptive = None
    if cfg.get("router", {}).get("enabled", True) and len(vcfg.sa_configs) > 1:
        adaptive = _adaptive(out, data, final, test, ev["stage2"], table, cfg, phase, bs)
        routed = out / "visor-routed"
    else:
        routed = final
    visor_dir = out / "visor"
    shutil.rmtree(visor_dir, ignore_errors=True)
    shutil.copytree(routed, visor_dir)
    wall["total"] = round(time.time() - t_all, 1)
    ledger.add("total", wall["total"])
    report = {
        "recipe": "synthetic", "quick": quick, "seed": seed,
        "note": ("quick run: a plumbing check; the effects need the full budget" if quick
                 else "full recipe"),
        "wall_seconds": wall, "wall_seconds_cumulative": ledger.cumulative(),
        "hosts": ledger.hosts(),
        "image_tokens": nv, "text_tokens": nt,
        "loss_curve": {"dense": _curve(out / "dense-run" / "dense"),
                       "stage1": _curve(out / "visor-run" / cfg["stage1"].get("name", "stage1")),
                       "stage2": _curve(out / "visor-run" / cfg["stage2"].get("name", "stage2"))},
        "encoder": encoder_acc,
        "dense": {**with_ci(ev["dense"]), "families": ev["dense"]["families"]},
        "converted": _brief(ev["converted"]), "stage1": _brief(ev["stage1"]),
        "configs": table,
        **({"search": adaptive["search"], "labels": adaptive["labels"],
            "router": {"offline": adaptive["router"]}} if adaptive else {}),
        "findings": findings(_groups(ev["dense"]), table,
                             adaptive["router"] if adaptive else None, source="offline"),
        "recipe_config": cfg,
        **({"reused_training": json.loads((out / "reused_training.json").read_text())}
           if (out / "reused_training.json").exists() else {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _brief(entries: list[dict]) -> list[dict]:
    return [{"sa_layers": e["sa_layers"], **with_ci(e), "families": e["families"]}
            for e in entries]


def _groups(entry: dict) -> dict:
    return {"easy": entry["groups"].get("easy"), "hard": entry["groups"].get("hard"),
            "accuracy": entry["accuracy"]}


def row_flops(row: dict) -> float | None:
    """A table row's FLOPs vs dense: served rows say ``flops_vs_dense``, offline ones
    ``prefill_flops_vs_dense``."""
    return row.get("flops_vs_dense", row.get("prefill_flops_vs_dense"))


def costliest(table: list[dict]) -> dict:
    """The maximal configuration's row, the one `findings` and the reports measure the router
    against: the most SA layers, then the most FLOPs (the first of equals)."""
    return max(table, key=lambda r: (r["n_sa"], row_flops(r) or 0))


def findings(dense: dict, table: list[dict], router: dict | None = None,
             source: str = "offline") -> dict:
    """The paper's three findings, stated from the numbers (pure; offline or served ones).

    ``dense``: ``{"easy", "hard"}``; ``table``: rows with ``n_sa``, ``easy``, ``hard``,
    ``accuracy`` and a FLOP ratio (``flops_vs_dense`` or ``prefill_flops_vs_dense``);
    ``router``: ``{"easy", "hard", "accuracy", "mean_sa_layers": {"easy", "hard"},
    "flops_vs_dense"}`` of the ``auto`` budget, or None (finding 3 is then not judged); its
    optional ``accuracy_vs_max_ci`` (paired, `stats.ratio_interval`) is reported beside the
    ratio and judges nothing.
    """
    by_n: dict[int, list[float]] = {}
    for r in table:
        by_n.setdefault(r["n_sa"], []).append(r["hard"])
    hard_by_n = {n: round(sum(v) / len(v), 4) for n, v in sorted(by_n.items())}
    cheapest = min(table, key=lambda r: (r["n_sa"], row_flops(r) or 0))
    ns = sorted(hard_by_n)
    out = {
        "source": source,
        "cheapest_easy_vs_dense_easy": [cheapest["easy"], dense.get("easy")],
        "finding1_cheapest_matches_dense_on_easy":
            cheapest["easy"] is not None and dense.get("easy") is not None
            and cheapest["easy"] >= dense["easy"] - 0.02,
        "hard_accuracy_by_number_of_sa_layers": hard_by_n,
        "finding2_hard_rises_with_sa_layers":
            len(ns) > 1 and all(hard_by_n[a] <= hard_by_n[b] + 0.005 for a, b in zip(ns, ns[1:]))
            and hard_by_n[ns[-1]] > hard_by_n[ns[0]] + 0.02,
        "tolerances": "finding 1: within 2 points; finding 2: non-decreasing within 0.5 point "
                      "per step and +2 points from fewest to most SA layers; finding 3: mean SA "
                      "layers on hard > on easy, accuracy >= 99% of the costliest "
                      "configuration's, fewer FLOPs than it",
    }
    if router is not None:
        full = costliest(table)
        sa = router["mean_sa_layers"]
        out["router_vs_costliest"] = {
            "accuracy": [router["accuracy"], full["accuracy"]],
            "accuracy_ratio": round(router["accuracy"] / full["accuracy"], 4)
            if full["accuracy"] else None,
            "accuracy_ratio_ci": router.get("accuracy_vs_max_ci"),  # paired, same questions
            "flops_vs_dense": [router["flops_vs_dense"], row_flops(full)],
            "mean_sa_layers_easy_hard": [sa.get("easy"), sa.get("hard")]}
        out["finding3_router_spends_on_hard_and_keeps_accuracy"] = bool(
            sa.get("easy") is not None and sa.get("hard") is not None
            and sa["hard"] > sa["easy"]
            and router["accuracy"] >= 0.99 * full["accuracy"] - 1e-9
            and router["flops_vs_dense"] is not None and row_flops(full) is not None
            and router["flops_vs_dense"] < row_flops(full))
    return out


# ---------------------------------------------------------------------------------------------
# Adaptive inference: search -> viable set -> pseudo-labels -> router (paper Sec. 4.2.3, 4.3)
# ---------------------------------------------------------------------------------------------

def _splits(data: Path) -> dict:
    meta = data / "dataset.json"
    return json.loads(meta.read_text()).get("splits", {}) if meta.exists() else {}


def _adaptive(out: Path, data: Path, final: Path, test: Path, stage2_eval: list[dict],
              table: list[dict], cfg: dict, phase, bs: int) -> dict:
    """Search on val, write the viable set, label the label split, train the router.

    Writes ``out/search.json``, ``out/visor-viable/``, ``out/labels.json`` and
    ``out/visor-routed/``; returns the report's ``search``, ``labels`` and offline ``router``.
    The router's offline accuracy on the test split reuses stage 2's per-sample records (the
    routed checkpoint differs from stage 2's only in the router and the kept configurations);
    ``table`` (the report's rows of those records) names the configuration it is measured
    against (`costliest`).
    """
    from visor_vllm.model.config import VisorConfig
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops
    from visor_vllm.training.evaluate import dataset_groups, summarise
    from visor_vllm.training.labels import label_checkpoint
    from visor_vllm.training.router import route_data, train_router_on_data
    from visor_vllm.training.search import public, search, viable, write_configs
    from visor_vllm.training.stats import ratio_interval

    sc, lc, rc = cfg.get("search", {}), cfg.get("labels", {}), cfg.get("router", {})
    found = phase("search", lambda: search(final, data / f"{sc.get('split', 'val')}.jsonl",
                                           sc.get("candidates"), bs, sc.get("max_samples")))
    keep = viable(found["configs"], sc.get("tolerance", 0.02), sc.get("test", "paired"))
    found["viable"], found["tolerance"] = keep, sc.get("tolerance", 0.02)
    found["test"], found["configs"] = sc.get("test", "paired"), public(found["configs"])
    (out / "search.json").write_text(json.dumps(found, indent=2) + "\n")
    viable_dir = out / "visor-viable"
    shutil.rmtree(viable_dir, ignore_errors=True)
    write_configs(final, keep, viable_dir)

    label_data = data / f"{lc.get('split', 'label')}.jsonl"
    vv = VisorConfig.from_pretrained(str(viable_dir))
    lv, lt = prompt_lengths(viable_dir, label_data)
    lab = phase("labels", lambda: label_checkpoint(
        viable_dir, label_data, lc.get("ratio", 0.99), bs, lc.get("max_samples"),
        lc["test"], flops_of=lambda layers: prefill_flops(vv, lv, lt, layers)))
    (out / "labels.json").write_text(json.dumps(lab) + "\n")
    rule = lc.get("rule", "family")
    per = dict(zip(lab["samples"], lab["per_sample"][rule]))
    routed = out / "visor-routed"
    shutil.rmtree(routed, ignore_errors=True)
    fit = phase("router", lambda: train_router_on_data(
        viable_dir, label_data, per, routed, rc.get("steps", 400), rc.get("lr", 3e-3),
        cfg["seed"]))
    picked = phase("route_test", lambda: route_data(routed, test, bs))

    vcfg = VisorConfig.from_pretrained(str(routed))
    records = {tuple(e["sa_layers"]): {r["index"]: r for r in e["records"]} for e in stage2_eval}
    nv, nt = prompt_lengths(routed, test)
    dense_f = dense_prefill_flops(vcfg, nv, nt)
    groups = dataset_groups(test)
    routed_records, sa, fl = [], {}, []
    for i, c in picked.items():
        layers = vcfg.sa_configs[c]
        rec = records[tuple(layers)].get(i)  # None past eval.max_samples
        if rec is None:
            continue
        routed_records.append(rec)
        sa.setdefault(groups.get(rec["family"], "all"), []).append(len(layers))
        fl.append(prefill_flops(vcfg, nv, nt, layers) / dense_f)
    summary = summarise(routed_records, groups)  # the per-configuration table's rule
    # the configuration `findings` measures the router against, on the router's questions
    full_rec = records[tuple(costliest(table)["sa_layers"])]
    router = {"rule": rule, "label_accuracy": fit["sample_accuracy"],
              "token_accuracy": fit["token_accuracy"], "confusion": fit["confusion"],
              **with_ci(summary),
              "accuracy_vs_max_ci": ratio_interval(
                  [r["correct"] for r in routed_records],
                  [full_rec[r["index"]]["correct"] for r in routed_records])
              if routed_records else None,
              "mean_sa_layers": {g: sum(v) / len(v) for g, v in sorted(sa.items())},
              "flops_vs_dense": sum(fl) / max(len(fl), 1)}
    label_brief = {"rule": rule, "ratio": lab["ratio"], "test": lab["test"],
                   "data": str(label_data),
                   "configs": lab["configs"],
                   "family": {f: {"config": v["config"], "sa_layers": lab["configs"][v["config"]],
                                  "accuracy": v["accuracy"], "kept": v["kept"]}
                              for f, v in lab["family"].items()},
                   "pooled": {f: lab["configs"][c] for f, c in sorted(lab["pooled"].items())},
                   "oracle_histogram": _histogram(lab["per_sample"]["oracle"], len(lab["configs"]))}
    search_brief = {"data": found["data"], "tolerance": found["tolerance"], "test": found["test"],
                    "viable": keep,
                    "viable_1based": [[i + 1 for i in c] for c in keep],
                    "heatmap": found["heatmap"],
                    "flops_vs_dense": [round(r["flops_vs_dense"], 4) for r in found["configs"]]}
    return {"search": search_brief, "labels": label_brief, "router": router}


def _histogram(labels: list[int], n: int) -> list[int]:
    h = [0] * n
    for c in labels:
        h[c] += 1
    return h
