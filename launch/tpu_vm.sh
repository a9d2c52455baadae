#!/usr/bin/env bash
# Runs lsp_jax on a Cloud TPU VM, one host or a pod: create, set up, train, watch, stop, delete.
# Every command on the TPU goes to all of its workers at once (gcloud ... --worker=all), and
# every worker writes its own log, ~/lsp_jax_logs/train_<hostname>.log.
set -euo pipefail

# On every worker, relative to the login user's home directory.
readonly REMOTE_REPO='lsp_jax'
readonly REMOTE_VENV='lsp_jax_venv'
readonly REMOTE_LOGS='lsp_jax_logs'
readonly PID_FILE_NAME='train.pid'

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [ARGS]

Commands:
  create              create the TPU VM (QUEUED=1: as a queued resource; SPOT=1: a Spot VM)
  wait                wait until the TPU (or its queued resource) is ready
  setup               copy or clone REPO to every worker, then run launch/setup.sh on each
  train [OVERRIDES]   start `lsp-jax train --config $CONFIG --workdir $WORKDIR OVERRIDES`
                      on every worker in the background; OVERRIDES are --config.a.b=v flags
  logs [-f] [-n N]    last N lines (default 50) of every worker's log, each line prefixed
                      with its host; -f follows; WORKER=3 shows worker 3 only
  logs --fetch DIR    copy every worker's log file into the local folder DIR
  status              state of the TPU (and queued resource) and of training on each worker
  stop                stop training on every worker (SIGTERM, then SIGKILL after 60 s)
  ssh [COMMAND...]    no COMMAND: interactive shell on worker ${WORKER:-0};
                      with COMMAND: run it on every worker (or on WORKER)
  delete              delete the TPU VM (QUEUED=1: the queued resource and its TPU)

Environment:
  TPU_NAME            name of the TPU VM (required)
  ZONE                zone, e.g. us-west4-a (required)
  PROJECT             Google Cloud project (default: gcloud's configured project)
  ACCELERATOR_TYPE    for create, e.g. v5litepod-8 (one host) or v5litepod-32 (8 hosts)
  RUNTIME_VERSION     TPU software version; default from ACCELERATOR_TYPE:
                      v5litepod/v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                      v6e v2-alpha-tpuv6e, v2/v3/v4 tpu-ubuntu2204-base
  SPOT=1              create a Spot TPU (preemptible; recreate it and train again to resume)
  QUEUED=1            use queued resources (create, wait, status and delete must agree)
  QUEUED_RESOURCE_ID  queued resource name (default: $TPU_NAME-qr)
  CREATE_ARGS         extra flags for the create command, e.g. "--reserved"
  REPO                for setup: a git URL (cloned on the workers; REPO_REF picks a branch,
                      tag or commit) or a local lsp_jax folder (copied with scp; in a git
                      checkout only the files git tracks or would track, not runs/)
  CONFIG              for train: config file inside the repo, e.g. configs/lsp_llama3_2_3b.py
  WORKDIR             for train: checkpoint/log folder all hosts share, e.g. gs://BUCKET/run;
                      training with the same WORKDIR resumes from its last checkpoint
  TRAIN_ENV           for train: extra KEY=VALUE words put in the environment of lsp-jax
  LIBTPU_INIT_ARGS    for train: passed on to the workers when set
  FOREGROUND=1        for train: stay attached and stream the output (ends with the ssh)
  DRY_RUN=1           print every command ("+ gcloud ...") instead of running it

Paths in OVERRIDES are read on the workers, relative to ~/lsp_jax.
EOF
}

die() {
  printf 'tpu_vm.sh: error: %s\n' "$*" >&2
  exit 1
}

# Prints a command as one shell-quoted line starting with "+", then runs it unless DRY_RUN=1.
# The line goes to stdout for a dry run (so it can be read back) and to stderr otherwise.
run() {
  local line
  line="+$(printf ' %q' "$@")"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "$line"
  else
    printf '%s\n' "$line" >&2
    "$@"
  fi
}

require_tpu() {
  : "${TPU_NAME:?set TPU_NAME to the TPU VM name, e.g. TPU_NAME=lsp-v5e-32}"
  : "${ZONE:?set ZONE to the TPU zone, e.g. ZONE=us-west4-a}"
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then GCLOUD_FLAGS+=("--project=$PROJECT"); fi
}

queued() { [[ "${QUEUED:-0}" == 1 ]]; }
queued_resource_id() { printf '%s\n' "${QUEUED_RESOURCE_ID:-$TPU_NAME-qr}"; }

default_runtime_version() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION." ;;
  esac
}

# Runs one shell command line on every worker (or on $WORKER when allow_one_worker is given).
ssh_workers() {
  local command="$1" worker="all"
  if [[ "${2:-}" == allow_one_worker ]]; then worker="${WORKER:-all}"; fi
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
    --command="$command"
}

cmd_create() {
  require_tpu
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v5litepod-8 (one host) or v5litepod-32 (8 hosts)}"
  local runtime="${RUNTIME_VERSION:-}" extra=()
  if [[ -z "$runtime" ]]; then runtime="$(default_runtime_version "$ACCELERATOR_TYPE")"; fi
  if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
  if [[ -n "${CREATE_ARGS:-}" ]]; then
    local create_args=()
    read -r -a create_args <<<"$CREATE_ARGS"
    extra+=(${create_args[@]+"${create_args[@]}"})
  fi
  if queued; then
    run gcloud compute tpus queued-resources create "$(queued_resource_id)" \
      --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$runtime" ${extra[@]+"${extra[@]}"}
    echo "Queued; run 'launch/tpu_vm.sh wait' until the TPU is ready." >&2
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_wait() {
  require_tpu
  local describe ready
  if queued; then
    describe=(gcloud compute tpus queued-resources describe "$(queued_resource_id)"
      "${GCLOUD_FLAGS[@]}" '--format=value(state.state)')
    ready=ACTIVE
  else
    describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
      '--format=value(state)')
    ready=READY
  fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    echo "$(date +%T) $state" >&2
    case "$state" in
      "$ready") return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED)
        die "the TPU is $state; delete it and create it again." ;;
    esac
    sleep "${WAIT_SECONDS:-30}"
  done
}

is_git_url() {
  case "$1" in
    *://* | git@*:* | *.git) return 0 ;;
    *) return 1 ;;
  esac
}

# NUL-separated paths (relative to the git checkout $1) of the files git tracks or would
# track, leaving out tracked files deleted from the work tree.
source_files() {
  local path
  git -C "$1" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
      if [[ -e "$1/$path" || -L "$1/$path" ]]; then printf '%s\0' "$path"; fi
    done
}

# Puts the lsp_jax source in ~/lsp_jax on every worker.
sync_source() {
  : "${REPO:?set REPO to a git URL or a local lsp_jax folder to install on the workers}"
  if is_git_url "$REPO"; then
    local url ref
    url="$(printf '%q' "$REPO")"
    ref="$(printf '%q' "${REPO_REF:-HEAD}")"
    ssh_workers "set -e; if [ ! -d $REMOTE_REPO/.git ]; then git clone --quiet $url $REMOTE_REPO; fi; git -C $REMOTE_REPO fetch --quiet origin $ref; git -C $REMOTE_REPO checkout --quiet --force FETCH_HEAD"
    return
  fi
  [[ -d "$REPO" && -f "$REPO/setup.py" ]] ||
    die "REPO=$REPO is neither a git URL nor a local folder with setup.py."
  local tarball="${TMPDIR:-/tmp}/lsp_jax_src_$TPU_NAME.tar.gz"
  export COPYFILE_DISABLE=1 # macOS tar: no ._* resource-fork files in the archive
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Only the source: what git tracks or would track (edits and new files included), never
    # what it ignores (runs/, venvs, caches), which can be gigabytes after a laptop run.
    local file_list="${TMPDIR:-/tmp}/lsp_jax_src_$TPU_NAME.files"
    source_files "$REPO" >"$file_list"
    run tar -C "$REPO" --null --files-from="$file_list" -czf "$tarball"
  else
    run tar -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=.venv \
      --exclude=venv --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./runs \
      -czf "$tarball" .
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:lsp_jax_src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  # Unpack next to the old copy, then swap, so removed files do not linger; never under a run.
  local pid_file="\$HOME/$REMOTE_LOGS/$PID_FILE_NAME"
  ssh_workers "set -e; if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then echo \"\$(hostname): training runs; stop it before setup\" >&2; exit 1; fi; rm -rf $REMOTE_REPO.new; mkdir $REMOTE_REPO.new; tar -xzf lsp_jax_src.tar.gz -C $REMOTE_REPO.new; rm -rf $REMOTE_REPO lsp_jax_src.tar.gz; mv $REMOTE_REPO.new $REMOTE_REPO"
}

cmd_setup() {
  require_tpu
  sync_source
  ssh_workers "bash $REMOTE_REPO/launch/setup.sh --accelerator tpu --venv $REMOTE_VENV"
}

# The shell line each worker runs for `train`: its own log file, and a pid file for `stop`.
train_command() {
  # LSP_JAX_DISTRIBUTED=1: lsp_jax calls jax.distributed.initialize() (pod hosts find each
  # other through the TPU metadata; harmless on a single host).
  local env_words=(PYTHONUNBUFFERED=1 LSP_JAX_DISTRIBUTED=1) extra_env=()
  if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then env_words+=("LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"); fi
  if [[ -n "${TRAIN_ENV:-}" ]]; then
    read -r -a extra_env <<<"$TRAIN_ENV"
    env_words+=(${extra_env[@]+"${extra_env[@]}"})
  fi
  local env_part lsp_args
  env_part="$(printf ' %q' "${env_words[@]}")"
  lsp_args="$(printf ' %q' train --config "$CONFIG" --workdir "$WORKDIR" "$@")"
  local logs="\$HOME/$REMOTE_LOGS"
  local program="env$env_part \$HOME/$REMOTE_VENV/bin/lsp-jax$lsp_args"
  local prelude="set -e; mkdir -p $logs; cd \$HOME/$REMOTE_REPO; log=$logs/train_\$(hostname).log; pid_file=$logs/$PID_FILE_NAME"
  prelude+="; if [ -f \"\$pid_file\" ] && kill -0 \"\$(cat \"\$pid_file\")\" 2>/dev/null; then echo \"\$(hostname): training already runs (pid \$(cat \"\$pid_file\")); run stop first\" >&2; exit 1; fi"
  prelude+="; echo \"=== \$(date -u +%FT%TZ) lsp-jax$lsp_args\" >>\"\$log\""
  if [[ "${FOREGROUND:-0}" == 1 ]]; then
    printf '%s\n' "$prelude; set -o pipefail; $program 2>&1 | tee -a \"\$log\""
  else
    # setsid + nohup: the run survives the ssh session; the pid is its process group id.
    printf '%s\n' "$prelude; setsid nohup $program >>\"\$log\" 2>&1 </dev/null & echo \$! >\"\$pid_file\"; echo \"\$(hostname): started pid \$(cat \"\$pid_file\"), log \$log\""
  fi
}

cmd_train() {
  require_tpu
  : "${CONFIG:?set CONFIG to a config file in the repo, e.g. CONFIG=configs/lsp_llama3_2_3b.py}"
  : "${WORKDIR:?set WORKDIR to a folder all hosts share, e.g. WORKDIR=gs://BUCKET/lsp_3b}"
  if [[ "${1:-}" == -- ]]; then shift; fi
  local arg
  for arg in "$@"; do
    [[ "$arg" == --config.* ]] || die "train takes --config.a.b=value overrides only, got '$arg'."
  done
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "tpu_vm.sh: warning: WORKDIR=$WORKDIR is not gs://; on a pod every host must see the same WORKDIR." >&2
  fi
  ssh_workers "$(train_command "$@")"
  echo "Follow with: launch/tpu_vm.sh logs -f" >&2
}

cmd_logs() {
  require_tpu
  local follow="" lines=50 fetch_dir=""
  while (($#)); do
    case "$1" in
      -f | --follow) follow=" -F"; shift ;;
      -n) lines="${2:?-n needs a number of lines}"; shift 2 ;;
      --fetch) fetch_dir="${2:?--fetch needs a local folder}"; shift 2 ;;
      *) die "unknown logs argument '$1'; use -f, -n N or --fetch DIR." ;;
    esac
  done
  [[ "$lines" =~ ^[0-9]+$ ]] || die "-n needs a number of lines, got '$lines'."
  if [[ -n "$fetch_dir" ]]; then
    run mkdir -p "$fetch_dir"
    # Every worker's file has its own host name, so all of them land side by side.
    run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_LOGS/train_*.log" "$fetch_dir/" \
      "${GCLOUD_FLAGS[@]}" --worker="${WORKER:-all}"
    return
  fi
  ssh_workers "tail -n $lines$follow \$HOME/$REMOTE_LOGS/train_\$(hostname).log | sed -u \"s/^/[\$(hostname)] /\"" \
    allow_one_worker
}

cmd_status() {
  require_tpu
  if queued; then
    run gcloud compute tpus queued-resources describe "$(queued_resource_id)" "${GCLOUD_FLAGS[@]}" \
      --format='yaml(state)'
  fi
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --format='yaml(state,health,acceleratorType,runtimeVersion,schedulingConfig)'
  local pid_file="\$HOME/$REMOTE_LOGS/$PID_FILE_NAME"
  ssh_workers "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then echo \"\$(hostname): training (pid \$(cat $pid_file))\"; else echo \"\$(hostname): not training\"; fi; tail -n 1 \$HOME/$REMOTE_LOGS/train_\$(hostname).log 2>/dev/null || true" \
    allow_one_worker || echo "tpu_vm.sh: could not reach every worker (preempted or still starting?)" >&2
}

cmd_stop() {
  require_tpu
  local pid_file="\$HOME/$REMOTE_LOGS/$PID_FILE_NAME"
  ssh_workers "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then pid=\$(cat $pid_file); kill -TERM -- -\$pid 2>/dev/null || kill -TERM \$pid; for _ in \$(seq 60); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; if kill -0 \$pid 2>/dev/null; then kill -KILL -- -\$pid 2>/dev/null || kill -KILL \$pid; fi; echo \"\$(hostname): stopped pid \$pid\"; else echo \"\$(hostname): no training running\"; fi; rm -f $pid_file"
}

cmd_ssh() {
  require_tpu
  if (($# == 0)); then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="${WORKER:-0}"
  else
    ssh_workers "$*" allow_one_worker
  fi
}

cmd_delete() {
  require_tpu
  if queued; then
    # --force deletes the TPU nodes of the queued resource first.
    run gcloud compute tpus queued-resources delete "$(queued_resource_id)" "${GCLOUD_FLAGS[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

main() {
  local command="${1:-}"
  if (($#)); then shift; fi
  case "$command" in
    create | wait | setup | train | logs | status | stop | ssh | delete) "cmd_$command" "$@" ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$command'." ;;
  esac
}

main "$@"
