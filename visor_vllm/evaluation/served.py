"""``visor-vllm eval --base-url URL DATA``: accuracy measured through a running server.

What. Every sample of a LLaVA-style file (one question each, as the synthetic val/test splits)
becomes an OpenAI ``chat.completions`` request -- the image as a base64 data URL, the question
as text, ``temperature=0`` -- sent to a running ``vllm serve`` (VISOR with the middleware, or
any other model such as vLLM's own LLaVA-OneVision). The reply is scored by exact match of the
answer (stripped, case-folded), per family and easy/hard group. For VISOR every requested budget
(``min``, ``max``, ``auto``, each explicit configuration as ``visor_sa_layers``) is a separate
pass; FLOPs come from each response's ``visor`` receipt (LLM FLOPs and dense LLaVA-OV's for the
same request), so savings are what the server reports, request by request.

Why through the server. What is measured is what users get: the chat template, the routing
token, vLLM's kernels, budgets and router as served. The request format is the one lmms-eval's
``openai`` backend sends (docs/training.md shows a local lmms-eval task against the server).

Footguns. Concurrency (``--concurrency``) and retries (``--retries``, on connection errors and
5xx only; a 4xx is a bad request and is reported, never retried). A server without the
middleware returns no ``visor`` object: accuracy is still measured, FLOPs are ``None``.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from visor_vllm.training.data import default_image_folder, load_records, record_messages
from visor_vllm.training.evaluate import dataset_groups, summarise


def _image_url(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def requests_for(data: str | Path) -> list[dict]:
    """``[{"messages", "answer", "family"}]``: the first question and answer of every sample."""
    folder = default_image_folder(data)
    out = []
    for i, rec in enumerate(load_records(data)):
        messages = record_messages(rec)
        user, answer = messages[0], messages[1]["content"][0]["text"]
        images = rec.get("image")
        images = images if isinstance(images, list) else ([images] if images else [])
        content = [{"type": "image_url", "image_url": {"url": _image_url(folder / im)}}
                   for im in images]
        content += [p for p in user["content"] if p["type"] == "text"]
        out.append({"index": i, "messages": [{"role": "user", "content": content}],
                    "answer": answer, "family": rec.get("family", "all")})
    return out


def budgets_for(sa_configs: list | None, names: list[str] | None) -> list[tuple[str, dict]]:
    """Budget passes: ``auto``, ``min``, ``max``, ``configs`` (each of ``sa_configs``), ``none``."""
    names = names or ["auto", "min", "max"]
    out = []
    for name in names:
        if name in ("auto", "min", "max"):
            out.append((name, {"visor_budget": name}))
        elif name == "configs":
            if not sa_configs:
                raise ValueError("the 'configs' pass needs the checkpoint's sa_configs "
                                 "(--checkpoint DIR)")
            for c in sa_configs:
                out.append(("sa:" + ",".join(str(i + 1) for i in c),
                            {"visor_sa_layers": [i + 1 for i in c]}))
        elif name == "none":
            out.append(("none", {}))
        else:
            raise ValueError(f"unknown budget pass {name!r}: auto, min, max, configs or none")
    return out


def _ask(client, model: str, req: dict, xargs: dict, retries: int) -> dict:
    import openai

    for attempt in range(retries + 1):
        try:
            r = client.chat.completions.create(
                model=model, messages=req["messages"], max_tokens=8, temperature=0,
                extra_body={"vllm_xargs": xargs} if xargs else None)
            text = (r.choices[0].message.content or "").strip()
            return {"text": text, "visor": (r.model_extra or {}).get("visor")}
        except (openai.APIConnectionError, openai.InternalServerError, openai.APITimeoutError):
            if attempt == retries:
                raise
            time.sleep(0.5 * 2 ** attempt)


def evaluate_served(base_url: str, data: str | Path, model: str | None = None,
                    budgets: list[str] | None = None, concurrency: int = 4, retries: int = 2,
                    groups: dict | None = None, progress: bool = True,
                    sa_configs: list | None = None, max_samples: int | None = None,
                    keep_samples: bool = False) -> dict:
    import openai
    from tqdm.auto import tqdm

    client = openai.OpenAI(base_url=base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith(
        "/v1") else "/v1"), api_key="none", timeout=120)
    model = model or client.models.list().data[0].id
    reqs = requests_for(data)[:max_samples]
    groups = groups or dataset_groups(data)
    passes = budgets_for(sa_configs, budgets)
    result = {"base_url": base_url, "model": model, "data": str(data), "passes": []}
    for name, xargs in passes:
        with ThreadPoolExecutor(concurrency) as pool, tqdm(
                total=len(reqs), desc=name, disable=not progress) as bar:
            def one(req):
                out = _ask(client, model, req, xargs, retries)
                bar.update()
                return out
            answers = list(pool.map(one, reqs))
        samples = [{"index": r["index"], "family": r["family"], "answer": a["text"],
                    "correct": _correct(a["text"], r["answer"]),
                    "sa_layers": (a["visor"] or {}).get("sa_layers")}
                   for r, a in zip(reqs, answers)]
        flops = dense = 0
        sa_hist = defaultdict(lambda: defaultdict(int))
        have_receipts = all(a["visor"] for a in answers)
        for req, a in zip(reqs, answers):
            if a["visor"]:
                flops += a["visor"]["visor_flops"]
                dense += a["visor"]["dense_flops"]
                sa_hist[req["family"]][len(a["visor"]["sa_layers"])] += 1
        summary = summarise(samples, groups)  # the offline evaluation's per-family/group rule
        result["passes"].append({
            "budget": name, "xargs": xargs,
            "accuracy": summary["accuracy"], "accuracy_ci": summary["accuracy_ci"],
            "families": summary["families"], "families_ci": summary["families_ci"],
            "groups": summary["groups"], "groups_ci": summary["groups_ci"],
            "visor_flops": flops if have_receipts else None,
            "dense_flops": dense if have_receipts else None,
            "flops_vs_dense": flops / dense if have_receipts and dense else None,
            "sa_layers_histogram": {f: dict(h) for f, h in sa_hist.items()},
            "mean_sa_layers": ({g: _mean_sa(sa_hist, groups, g) for g in summary["groups"]}
                               if have_receipts else None),
            "requests": len(reqs),
            **({"samples": samples} if keep_samples else {})})
    return result


def _correct(reply: str, answer: str) -> bool:
    """Exact match, stripped and case-folded (a trailing full stop forgiven)."""
    return reply.strip().lower().rstrip(".") == answer.strip().lower()


def _mean_sa(hist, groups, group):
    n = s = 0
    for f, h in hist.items():
        if groups.get(f, "all") == group:
            for k, c in h.items():
                n += c
                s += k * c
    return s / n if n else None


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy and FLOPs through a running server")
    p.add_argument("data")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the first)")
    p.add_argument("--budgets", default="auto,min,max",
                   help="comma list of auto, min, max, configs (each viable configuration, needs "
                        "--checkpoint), none (no vllm_xargs: any model, e.g. LLaVA-OV)")
    p.add_argument("--checkpoint", help="the served VISOR checkpoint dir (for --budgets configs)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cli_eval)


def _cli_eval(args) -> int:
    configs = None
    if args.checkpoint:
        configs = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("sa_configs")
    try:
        res = evaluate_served(args.base_url, args.data, args.model,
                              [b for b in args.budgets.split(",") if b], args.concurrency,
                              args.retries, sa_configs=configs, max_samples=args.max_samples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for p in res["passes"]:
        print(f"{p['budget']:>16}  acc {p['accuracy']:.3f}  groups {p['groups']}  "
              f"flops/dense {p['flops_vs_dense']}")
    return 0
