"""`visor-vllm` command line: one sub-command per concept, each defined next to its code.

Each module exposes ``add_cli(subparsers)`` and sets ``func`` on its parser; this file only
wires them, so ``visor-vllm --help`` stays cheap (heavy imports happen inside ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> sub-commands it adds (documentation only; each module registers its own)
SUBCOMMAND_MODULES = ("visor_vllm.model.flops", "visor_vllm.checkpoints.build",
                      "visor_vllm.checkpoints.convert", "visor_vllm.serving.serve",
                      "visor_vllm.training.synthetic", "visor_vllm.training.trainer",
                      "visor_vllm.training.labels",
                      "visor_vllm.training.router", "visor_vllm.training.search",
                      "visor_vllm.evaluation.served",
                      "visor_vllm.evaluation.recipe", "visor_vllm.evaluation.seeds",
                      "visor_vllm.evaluation.plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visor-vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; whatever follows a bare ``--`` reaches it as ``args.passthrough``."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    if from_shell:
        _under_tcmalloc(argv)
    args.passthrough = argv[cut + 1:]
    return int(args.func(args) or 0)


def _under_tcmalloc(argv: list[str]) -> None:
    """Start this command again with tcmalloc preloaded (`visor_vllm.allocator`), once, before
    any work: the allocator of a process is chosen when it starts. Nothing to preload, or an
    exec that fails, runs the command as it is (the allocator is only speed)."""
    from visor_vllm import allocator

    try:
        cmd = allocator.reexec_command(argv)
    except allocator.AllocatorError as e:
        print(f"visor-vllm: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cmd is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(*cmd)
    except OSError as e:
        print(f"visor-vllm: running without tcmalloc ({e})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
