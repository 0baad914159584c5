"""Router training on frozen features (paper Sec. 4.3): labels in, a routed checkpoint out.

What.
* `routing_features` -- the hidden state of every routing token at the output of
  ``config.router_layer``, one row per routing token, with its sample index. Before that layer
  only the always-on SA layers run, so the features do not depend on the configuration: they
  are computed once, with the backbone frozen.
* `train_router` -- the router MLP (RMSNorm -> fc1 -> GELU -> fc2, the reference's `Router`)
  trained with cross-entropy on the labels (one per sample, every routing token of a sample gets
  it); full-batch AdamW. Returns accuracy against the labels and the confusion matrix.
* `route` -- what the served model will pick for each sample: every routing token votes, the
  costliest vote wins (`visor_vllm.model.plan.choose_configuration`).

Footguns. The router is re-initialised unless ``warm_start``: the converter's router is biased
to the costliest configuration, a prior that cross-entropy would have to unlearn. Labels are
configuration *indices* into the checkpoint's ``sa_configs``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from visor_vllm.model import plan
from visor_vllm.training.data import EncodedDataset, iter_batches
from visor_vllm.training.model import TrainingError, visor_hidden


@torch.no_grad()
def routing_features(model, ds: EncodedDataset, pad: int, batch_size: int = 64):
    """``(features [R, d], sample index [R])`` for the routing tokens of every usable sample."""
    cfg = model.config
    if not plan.needs_router(cfg):
        raise TrainingError("this checkpoint has one configuration: there is nothing to route")
    model.eval()
    feats, owner = [], []
    for keep, batch in iter_batches(ds, pad, batch_size):
        hidden, lay = visor_hidden(model, batch, cfg.always_on_sa_layers,
                                   upto_layer=cfg.router_layer)
        ids = lay.text_ids
        where = ids == cfg.routing_token_id                       # [B, Nt]
        mask_rows = where.nonzero()[:, 0]
        feats.append(hidden[where])
        owner.append(torch.tensor(keep)[mask_rows])
    if not feats:
        raise TrainingError("no usable sample has a routing token")
    return torch.cat(feats), torch.cat(owner)


def train_router(model, feats: torch.Tensor, owner: torch.Tensor, labels: dict[int, int],
                 steps: int = 400, lr: float = 3e-3, seed: int = 0,
                 warm_start: bool = False) -> dict:
    """Fit ``model.router`` to ``labels`` (sample index -> configuration index)."""
    n_cfg = len(model.config.sa_configs)
    keep = torch.tensor([int(o) in labels for o in owner])
    x, rows = feats[keep], owner[keep]
    y = torch.tensor([labels[int(o)] for o in rows], dtype=torch.long)
    if y.numel() == 0:
        raise TrainingError("no routing token belongs to a labelled sample")
    if int(y.max()) >= n_cfg or int(y.min()) < 0:
        raise TrainingError(f"labels must be configuration indices in [0, {n_cfg})")
    router = model.router
    if not warm_start:
        g = torch.Generator().manual_seed(seed)
        for lin in (router.fc1, router.fc2):
            bound = 1 / lin.in_features ** 0.5  # PyTorch's default Linear init, seeded
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=g)
                lin.bias.uniform_(-bound, bound, generator=g)
    for p in router.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    router.train()
    for _ in range(steps):
        loss = F.cross_entropy(router(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()
    with torch.no_grad():
        pred = router(x).argmax(-1)
    confusion = torch.zeros(n_cfg, n_cfg, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return {"token_accuracy": float((pred == y).float().mean()), "final_loss": float(loss.detach()),
            "confusion": confusion.tolist(), "tokens": int(y.numel())}


@torch.no_grad()
def route(model, feats: torch.Tensor, owner: torch.Tensor) -> dict[int, int]:
    """Sample index -> configuration index the served model picks (costliest vote wins)."""
    logits = model.router(feats)
    out = {}
    for o in owner.unique().tolist():
        out[o] = plan.choose_configuration(model.config, logits[owner == o])
    return out


def load_with_features(checkpoint: str | Path, data: str | Path, batch_size: int = 64):
    """``(model, features, owner)``: VISOR ``checkpoint`` loaded as evaluation loads it and
    ``data``'s routing features; a dense checkpoint is a `TrainingError` (nothing to route)."""
    from visor_vllm.training.evaluate import evaluation_inputs

    kind, model, ds, pad = evaluation_inputs(checkpoint, data)
    if kind != "visor":
        raise TrainingError(f"{checkpoint} is a dense checkpoint: a router needs a VISOR one "
                            "(visor-vllm convert, then train stages 1 and 2)")
    return (model, *routing_features(model, ds, pad, batch_size))


def train_router_on_data(checkpoint: str | Path, data: str | Path, labels: dict[int, int],
                         out: str | Path, steps: int = 400, lr: float = 3e-3,
                         seed: int = 0) -> dict:
    """Features of ``data`` -> router fit to ``labels`` -> ``out``, a routed copy of ``checkpoint``."""
    from visor_vllm.training.trainer import save_model

    model, feats, owner = load_with_features(checkpoint, data)
    report = train_router(model, feats, owner, labels, steps=steps, lr=lr, seed=seed)
    picked = route(model, feats, owner)
    report["sample_accuracy"] = (sum(picked[i] == labels[i] for i in picked if i in labels)
                                 / max(sum(i in labels for i in picked), 1))
    save_model("stage2", model, checkpoint, out)
    return report


def route_data(checkpoint: str | Path, data: str | Path, batch_size: int = 64) -> dict[int, int]:
    """What ``checkpoint``'s router picks for every usable sample of ``data`` (offline ``auto``)."""
    model, feats, owner = load_with_features(checkpoint, data, batch_size)
    return route(model, feats, owner)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train-router", help="fit the router to pseudo-labels (frozen backbone)")
    p.add_argument("checkpoint")
    p.add_argument("labels", help="the JSON `visor-vllm label` wrote")
    p.add_argument("--out", required=True, help="new checkpoint dir with the trained router")
    p.add_argument("--rule", choices=["family", "oracle"], default="family")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.set_defaults(func=_cli_train_router)


def _cli_train_router(args) -> int:
    import json
    import sys

    try:
        lab = json.loads(Path(args.labels).read_text())
        labels = dict(zip(lab["samples"], lab["per_sample"][args.rule]))
        report = train_router_on_data(args.checkpoint, lab["data"], labels, args.out,
                                      steps=args.steps, lr=args.lr)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "confusion"}))
    print(f"wrote {args.out}")
    return 0
