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
# `_compat`, `patches`, `envs`, `host_sync`, `allocator` and the package root's registrations
# are open to everyone; `model` may use `envs` only)
SHARED = {"visor_vllm", "visor_vllm._compat", "visor_vllm.patches", "visor_vllm.envs",
          "visor_vllm.host_sync", "visor_vllm.allocator"}
MODEL_SHARED = {"visor_vllm.envs"}
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


def _is_module(dotted: str, pkg: Path = PKG) -> bool:
    """Whether ``visor_vllm.a.b`` names a module or package under ``pkg``."""
    parts = dotted.split(".")[1:]
    base = pkg.joinpath(*parts)
    return bool(parts) and (base.with_suffix(".py").exists() or (base / "__init__.py").exists())


def _imports(path: Path, pkg: Path = PKG) -> set[str]:
    """Every module ``path`` imports, lazy imports included. ``from visor_vllm.engine import
    stats`` counts as ``visor_vllm.engine.stats`` (not the package ``visor_vllm.engine``, whose
    ``__init__`` runs but imports nothing here); a name that is not a module (``from visor_vllm
    import register``) counts as its package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "visor_vllm":
                names.add(node.module)
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if _is_module(sub, pkg) else node.module)
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
            if top != "visor_vllm" or name in SHARED and sub != "model" \
                    or sub == "model" and name in MODEL_SHARED:
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
    mod.write_text("def f():\n    from visor_vllm.engine import receipts\n    import vllm.envs\n"
                   "    from visor_vllm import register\n")
    assert {"visor_vllm.engine.receipts", "vllm.envs", "visor_vllm"} <= _imports(mod)


# top-level module -> visor_vllm parts (subpackages or top-level modules) it may import
TOP = {
    "__init__": {"model", "engine", "patches", "envs"},  # the two registrations
    "_compat": set(),
    "envs": set(),            # every layer reads the environment through it
    "host_sync": set(),
    "allocator": {"envs"},    # tcmalloc / glibc for the CLI, its servers and training
    "graph_replay": {"host_sync"},  # the CUDA-graph contract on CPU (tests use it)
    "patches": {"envs"},      # the ledger knows third-party internals, not the package
    "testing": {"model", "checkpoints"},
    "cli": set(ALLOWED) | {"visor_vllm", "allocator"},  # wires every sub-command
}


def test_every_top_level_module_has_a_rule():
    assert {p.stem for p in PKG.glob("*.py")} == set(TOP), "a new top-level module needs a rule"


@pytest.mark.parametrize("mod", sorted(TOP))
def test_top_level_import_direction(mod):
    bad = []
    for name in _imports(PKG / f"{mod}.py"):
        if name.split(".")[0] != "visor_vllm" or name == "visor_vllm" and mod == "cli":
            continue
        part = name.split(".")[1] if "." in name else "visor_vllm"
        if part not in TOP[mod] and part != mod:
            bad.append(f"{mod}.py imports {name}")
    assert not bad, "import direction violated:\n" + "\n".join(bad)


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (lazy imports included)."""
    mods = {}
    for p in root.rglob("*.py"):
        name = ".".join((package, *p.relative_to(root).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = p
    return {m: {n for n in _imports(p, root) if n in mods} - {m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_the_package():
    assert _cycles(_graph(PKG, "visor_vllm")) == []


def test_the_cycle_check_sees_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "visor_vllm"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from visor_vllm import y\n")
    (pkg / "y.py").write_text("from visor_vllm.a import x\n")
    assert _cycles(_graph(pkg, "visor_vllm")) == [["visor_vllm.a.x", "visor_vllm.y"]]
