"""`visor-vllm` command line: one sub-command per concept, each defined next to its code.

Each module exposes ``add_cli(subparsers)`` and sets ``func`` on its parser; this file only
wires them, so ``visor-vllm --help`` stays cheap (heavy imports happen inside ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> sub-commands it adds (documentation only; each module registers its own)
SUBCOMMAND_MODULES = ("visor_vllm.flops", "visor_vllm.checkpoint", "visor_vllm.convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visor-vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
