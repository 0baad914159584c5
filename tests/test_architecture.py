"""The package's import direction (docs/design.md "Architecture"), checked statically on every module.

Every ``import`` and ``from ... import`` anywhere in a module counts, including the lazy ones
inside functions: a lazy import still makes the subpackage depend on what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "visor_vllm"

# subpackage -> visor_vllm parts it may import (itself always; the top-level shared modules
# `_compat`, `patches` and the package root's `register` are open to everyone except `model`)
SHARED = {"visor_vllm", "visor_vllm._compat", "visor_vllm.patches"}
ALLOWED = {
    "model": {"model"},
    "checkpoints": {"model", "checkpoints"},
    "engine": {"model", "engine"},
    "serving": {"model", "checkpoints", "engine", "serving"},
    "training": {"model", "checkpoints", "training"},
    "evaluation": {"model", "training", "evaluation"},
}
# third-party packages a subpackage must never import
FORBIDDEN_THIRD_PARTY = {
    "model": {"vllm"},
    "checkpoints": {"vllm"},
    "training": {"vllm"},
    "evaluation": {"vllm"},
}


_PACKAGES = {f"visor_vllm.{p.name}" for p in PKG.iterdir() if (p / "__init__.py").exists()}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "visor_vllm" or node.module in _PACKAGES:
                # from visor_vllm.engine import stats -> visor_vllm.engine.stats
                names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute visor_vllm.* imports")
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_every_subpackage_has_a_rule():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs == set(ALLOWED), "a new subpackage needs a row in ALLOWED and in docs/design.md"


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_import_direction(sub):
    bad = []
    for path in _modules(sub):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_THIRD_PARTY.get(sub, ()):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
            if top != "visor_vllm" or name in SHARED and sub != "model":
                continue
            part = name.split(".")[1] if "." in name else None
            if part in ALLOWED or part is None:
                if part not in ALLOWED[sub]:
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
            elif sub == "model":  # model may not even use the shared modules
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "import direction violated:\n" + "\n".join(bad)


def test_serving_imports_only_receipts_and_stats_from_the_engine():
    """The server talks to the engine through vLLM; the receipt and stats formats are the shared
    pieces (both vLLM-free)."""
    used = {n for p in _modules("serving") for n in _imports(p) if n.startswith("visor_vllm.engine")}
    assert used <= {"visor_vllm.engine", "visor_vllm.engine.receipts", "visor_vllm.engine.stats"}, used
    for name in ("receipts", "stats"):
        assert not any(n.split(".")[0] == "vllm" for n in _imports(PKG / "engine" / f"{name}.py"))


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from visor_vllm import receipts\n    import vllm.envs\n")
    assert {"visor_vllm.receipts", "vllm.envs"} <= _imports(mod)
