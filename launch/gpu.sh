#!/usr/bin/env bash
# Trains lsp_jax on one multi-GPU node: sets up a CUDA 12 venv (idempotent), sets XLA's GPU
# flags and runs `lsp-jax train`, writing ~/lsp_jax_logs/train_<hostname>.log. slurm.sbatch
# runs this script once per node.
set -euo pipefail

# Commonly recommended XLA flags for transformer training on NVIDIA GPUs (all known to
# jaxlib 0.10; XLA aborts on an unknown flag, so check any new one with the installed jaxlib):
#   latency hiding scheduler: overlap collectives with compute;
#   cuBLAS rather than Triton for matmuls: the more predictable choice across GPU generations;
#   pipelined FSDP collectives and while-loop double buffering: overlap the per-layer
#   all-gathers/reduce-scatters of the scanned layers with the previous layer's compute.
readonly GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_triton_gemm=false
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
)

usage() {
  cat <<'EOF'
Usage: CONFIG=configs/NAME.py WORKDIR=DIR launch/gpu.sh [--config.a.b=value ...]

Environment:
  CONFIG        config file, relative to the repository root (required)
  WORKDIR       checkpoints and metrics; the same WORKDIR resumes the run (required)
  VENV          venv to create or reuse (default ~/lsp_jax_venv)
  LOG_DIR       where train_<hostname>.log goes (default ~/lsp_jax_logs)
  SKIP_SETUP=1  do not run launch/setup.sh --accelerator cuda12 first
  XLA_FLAGS     appended after this script's GPU flags (so yours win)
  XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default 0.9)
  DRY_RUN=1     print the commands ("+ cmd ...") instead of running them
EOF
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

main() {
  if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    usage
    return 0
  fi
  : "${CONFIG:?set CONFIG to a config file, e.g. CONFIG=configs/lsp_llama3_2_3b.py}"
  : "${WORKDIR:?set WORKDIR to the run folder, e.g. WORKDIR=\$HOME/runs/lsp_3b}"
  if [[ "${1:-}" == -- ]]; then shift; fi
  local script_dir repo_dir
  script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  repo_dir="$(cd "$script_dir/.." && pwd)"
  local venv="${VENV:-$HOME/lsp_jax_venv}" log_dir="${LOG_DIR:-$HOME/lsp_jax_logs}"

  if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
    run bash "$script_dir/setup.sh" --accelerator cuda12 --venv "$venv"
  fi
  local xla_flags="${GPU_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
  local train=(env "XLA_FLAGS=$xla_flags"
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" PYTHONUNBUFFERED=1
    "$venv/bin/lsp-jax" train --config "$CONFIG" --workdir "$WORKDIR" "$@")
  cd "$repo_dir"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    run "${train[@]}"
    return 0
  fi
  mkdir -p "$log_dir"
  local log
  log="$log_dir/train_$(hostname).log"
  echo "=== $(date -u +%FT%TZ) lsp-jax train on $(hostname), log $log" | tee -a "$log"
  "${train[@]}" 2>&1 | tee -a "$log"
}

main "$@"
