"""`visor-vllm serve`: `vllm serve` for a VISOR checkpoint, with an embedded default and CPU flags.

What. Without a model argument it serves the embedded default: a tiny random VISOR checkpoint
built locally (`visor_vllm.checkpoints.build.build_tiny`, seed 0) into ``checkpoints/visor-tiny`` the first time,
so the README's main command needs no download. With a directory it serves that one (e.g. a
converted ``visor-0.5b``; ``--load-format dummy`` is added when the directory has no weights).
It prints where it listens, then *replaces itself* with ``vllm serve`` (exec), so signals,
logs and exit codes are vLLM's own. Extra arguments after ``--`` go to ``vllm serve`` verbatim.

It preloads tcmalloc where `visor_vllm.allocator` finds one (vLLM's CPU worker asks for it) and
adds ``--middleware visor_vllm.serving.middleware.VisorMiddleware`` (per-request receipts in
responses; the ``visor:*`` metrics come from the stat-logger plugin either way) and, with
``--default-budget``, sets ``$VISOR_DEFAULT_BUDGET`` for the
engine after checking it against the checkpoint.

Why these flags. The encoder-decoder layout needs ``--max-num-batched-tokens`` at least the
largest image's token count (LLaVA-OV's profile image: 8,748 at 384 px crops), and on CPU
``--enforce-eager`` plus ``VLLM_CPU_KVCACHE_SPACE`` start the engine in seconds.

A preset name instead of a directory (``visor-vllm serve visor-0.5b``) builds that preset into
``checkpoints/<name>`` without weights (unless it exists) and serves it with dummy weights.

Footgun: plain ``vllm serve DIR`` works too (the plugin registers itself); this wrapper only
picks defaults. Flags given after ``--`` win because vLLM keeps the last occurrence.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from visor_vllm import envs

DEFAULT_DIR = Path("checkpoints/visor-tiny")
MIDDLEWARE = "visor_vllm.serving.middleware.VisorMiddleware"  # receipts in responses


def vllm_command(model: Path, host: str, port: int, name: str, extra: list[str]) -> list[str]:
    dummy = [] if any(model.glob("*.safetensors")) else ["--load-format", "dummy"]
    vllm = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    return [vllm, "serve", str(model), "--host", host, "--port", str(port),
            "--served-model-name", name, "--enforce-eager", "--max-model-len", "10000",
            "--max-num-batched-tokens", "10000", "--limit-mm-per-prompt", '{"image": 4}',
            "--middleware", MIDDLEWARE, *dummy, *extra]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a VISOR checkpoint (default: the embedded tiny "
                                            "one); arguments after -- go to vllm serve")
    p.add_argument("model", nargs="?", type=Path, help=f"checkpoint dir (default: build {DEFAULT_DIR})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="default: the directory's name")
    p.add_argument("--default-budget", default=None, metavar="BUDGET",
                   help="server-wide budget for requests that name none: auto | min | max | N | "
                        "a JSON object of vllm_xargs keys (sets $VISOR_DEFAULT_BUDGET)")
    p.add_argument("--dry-run", action="store_true", help="print the vllm command and exit")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from visor_vllm.model.config import PRESETS

    model, preset = args.model or DEFAULT_DIR, None
    if args.model is None:
        preset, what = "tiny", "the embedded default checkpoint (tiny, random, seed 0)"
    elif str(model) in PRESETS and not model.exists():
        # `visor-vllm serve visor-0.5b`: a preset name, no such directory -> real sizes, dummy
        # weights (config, tokenizer, processor only), e.g. for benchmarking
        preset, model = str(model), Path("checkpoints") / str(model)
        what = f"preset {preset} without weights (served with dummy weights)"
    if preset is not None and not (model / "config.json").exists():
        from visor_vllm.checkpoints.build import build_tiny

        print(f"building {model}: {what}")
        build_tiny(model, preset=preset, weights=preset == "tiny")
    if not (model / "config.json").exists():
        print(f"visor-vllm serve: {model} is not a checkpoint directory (no config.json)",
              file=sys.stderr)
        return 2
    import json

    try:
        kind = json.loads((model / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "visor":
        print(f"visor-vllm serve: {model} is a {kind or 'unknown'} checkpoint, not VISOR. "
              f"Convert LLaVA-OneVision with `visor-vllm convert {model} OUT --preset "
              f"visor-0.5b` (then train it: docs/training.md), or serve it as dense LLaVA-OV "
              f"with plain `vllm serve {model} --limit-mm-per-prompt "
              "'{\"image\": 2, \"video\": 0}'`", file=sys.stderr)
        return 2
    if args.default_budget is not None:
        from visor_vllm.model.budget import DEFAULT_ENV, BudgetError, default_budget
        from visor_vllm.model.config import VisorConfig

        envs.export(DEFAULT_ENV, args.default_budget)
        try:  # fail here, with the allowed forms, not later inside the engine
            default_budget(VisorConfig.from_pretrained(str(model)))
        except BudgetError as e:
            print(f"visor-vllm serve: --default-budget: {e}", file=sys.stderr)
            return 2
    extra = list(getattr(args, "passthrough", []))
    name = args.served_model_name or model.resolve().name
    cmd = vllm_command(model, args.host, args.port, name, extra)
    print(f"VISOR server for {model} as model {name!r}: http://{args.host}:{args.port}/v1 "
          f"(ready when http://{args.host}:{args.port}/health answers 200)", flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    envs.apply_server_defaults()  # KV space, image pixel cap, offline, one 5 s fetch, no redirects
    from visor_vllm import allocator

    try:  # tcmalloc first in LD_PRELOAD, as vLLM's CPU worker asks (visor_vllm.allocator)
        env = allocator.preload_environment(envs.snapshot())
    except allocator.AllocatorError as e:
        print(f"visor-vllm serve: {e}", file=sys.stderr)
        return 2
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
