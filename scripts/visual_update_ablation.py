"""Which of the dense model's layers must update the visual tokens? (a probe for VISOR's schedule)

What. For each finished `visor-vllm recipe synthetic` run directory: the dense LLaVA-OV model
(``dense-run/dense/model``) scored on the test split (teacher-forced exact match per family,
`visor_vllm.training.evaluate.evaluate`) with the visual tokens *frozen* at a set of layers:
at each such layer their output is their input, while the text tokens run the layer as usual
(they still attend to the visual tokens). Prints one line per run and layer set: the
per-family accuracy.

Why. A VISOR CA layer never updates the visual tokens, and stage 1 trains the new modules only
(the LLM frozen), so an update the dense model makes at a layer that becomes CA is one stage 1
cannot put back; what the text reads there, the CA module can learn. Freezing the update is
that loss alone. Measured 2026-12-07 (docs/training.md, "The layers that become CA"): at the
default's CA layers (2, 5, 8, 1-based) seed 5's dense model loses every vertical
family, the families VISOR lost on that seed; at 6, 7, 8 no family moves more than 2 points
on ten of eleven dense models.

Footguns. ``--layers`` are 1-based, ``;`` between sets, ``none`` for the unmodified model; the
image tokens are found by the checkpoint's image token id. ~5 s a set on 2 cores (2,700
questions). Do not run it beside a training run on a 2-core machine: two 2-thread processes
spin against each other (OpenMP) and both slow down ~20x. Usage::

    python scripts/visual_update_ablation.py RUN_DIR... --layers "none;2,5,8;6,7,8" [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILIES = ["colour_at", "shape_at", "exists", "count", "hpair", "below", "vpair", "vsame",
            "largest"]


def frozen_visual_updates(model, layers: list[int]):
    """Hooks on ``model`` (transformers' LLaVA-OV) that keep the visual tokens' hidden states
    unchanged through the 0-based ``layers``; returns the handles (``.remove()`` them)."""
    state = {}
    image_id = model.config.image_token_id

    def remember(_module, _args, kwargs):
        state["mask"] = (kwargs["input_ids"] == image_id).unsqueeze(-1)  # [B, N, 1]

    def freeze(_module, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = out[0] if isinstance(out, tuple) else out
        kept = h_out * ~state["mask"] + h_in * state["mask"]
        return (kept, *out[1:]) if isinstance(out, tuple) else kept

    handles = [model.model.register_forward_pre_hook(remember, with_kwargs=True)]
    blocks = model.model.language_model.layers
    handles += [blocks[i].register_forward_hook(freeze, with_kwargs=True) for i in layers]
    return handles


def ablate(run: Path, sets: list[list[int]], batch_size: int = 128) -> dict:
    """``{"1-based set" | "none": {family: accuracy}}`` of ``run``'s dense model: loaded and
    its test split encoded once, scored under each set's hooks as `evaluate` scores it."""
    from visor_vllm.training.data import pre_encode
    from visor_vllm.training.evaluate import dataset_groups, evaluation_inputs, score, summarise

    dense, test = run / "dense-run" / "dense" / "model", run / "data" / "test.jsonl"
    _, model, ds, pad = evaluation_inputs(dense, test)
    ds = pre_encode(ds, range(len(ds)))
    groups, out = dataset_groups(test), {}
    for layers in sets:
        handles = frozen_visual_updates(model, [i - 1 for i in layers])
        try:
            records = score(model, "dense", ds, pad, batch_size=batch_size)
        finally:
            for h in handles:
                h.remove()
        fam = summarise(records, groups)["families"]
        out[",".join(map(str, layers)) or "none"] = {f: round(fam[f], 4) for f in sorted(fam)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--layers", default="none;2,5,8;6,7,8")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sets = [[] if s.strip() == "none" else [int(x) for x in s.split(",")]
            for s in args.layers.split(";")]
    result = {}
    for run in map(Path, args.runs):
        result[str(run)] = rows = ablate(run, sets)
        for name, fam in rows.items():
            print(f"{run.name} frozen at {name:<8}",
                  " ".join(f"{f} {fam[f]:.2f}" for f in FAMILIES if f in fam), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
