#!/usr/bin/env bash
# The project's GPU check (scripts/gpu_check.py has the details): real-size training under DDP
# and FSDP2, export, resume, and the VISOR-vs-dense speed table, as JSON lines.
#
#   bash scripts/gpu_check.sh                          # a machine with one GPU (no vLLM needed)
#   bash scripts/gpu_check.sh --cpu --preset tiny      # the CPU form (tests/test_gpu_check.py)
#   bash scripts/gpu_check.sh --wheels .whl            # first pip-install the wheels in .whl/
#                                                      # (e.g. transformers 5.19 where 5.17 is)
#   PYTHON=python3.11 bash scripts/gpu_check.sh ...    # the interpreter (default: .venv's, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) "$PY" -m pip install --quiet --no-deps "$2"/*.whl; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/scripts/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}
