#!/usr/bin/env bash
# Start N genesis_jax processes on this machine, wired together by jax.distributed.
#
#   launch/local.sh -n 2 [--cpu-devices 2 | --gpus-per-process 1] [--port 12355] [--dry-run] -- \
#       --config configs/pretrain_genesis.py --workdir runs/local2 [--config.train.batch_size=2 ...]
#
# Process i gets GENESIS_COORDINATOR=127.0.0.1:PORT, GENESIS_NUM_PROCESSES=N, GENESIS_PROCESS_ID=i
# (read by genesis_jax.train.distributed.initialize). --cpu-devices K gives each process K CPU
# devices (JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=K): a multi-host rehearsal on one box.
# --gpus-per-process K gives process i the GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES).
# Output of process i goes to LOG_DIR/process_i.log (default <workdir>/launch_logs, or
# ./launch_logs when the workdir is a bucket path); process 0 is also echoed to the terminal.
# If one process fails the others are stopped and its exit status is returned. Ctrl-C or
# SIGTERM asks every process once to save a checkpoint and stop (exit 143), and waits for them.
# DRY_RUN=1 or --dry-run prints the commands instead of running them.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, shq

num=2
port="${GENESIS_PORT:-12355}"
cpu_devices=""
gpus_per_process=""
dry_run="${DRY_RUN:-0}"
python_bin="${PYTHON:-python}"
log_dir="${LOG_DIR:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --gpus-per-process) gpus_per_process="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (arguments for genesis_jax.main go after --)" >&2; usage 2 ;;
  esac
done
main_args=("$@")
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n must be a positive integer, got '$num'" >&2; exit 2; }
[[ ${#main_args[@]} -gt 0 ]] || { echo "local.sh: give the genesis_jax.main arguments after --" >&2; usage 2; }

# The log folder sits next to the run when the workdir is a local path.
workdir=""
for ((k = 0; k < ${#main_args[@]}; k++)); do
  case "${main_args[k]}" in
    --workdir=*) workdir="${main_args[k]#--workdir=}" ;;
    --workdir) workdir="${main_args[k + 1]:-}" ;;
  esac
done
if [[ -z "$log_dir" ]]; then
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then log_dir="$workdir/launch_logs"; else log_dir="launch_logs"; fi
fi

env_for() {  # The environment of process $1, as NAME=value words.
  local i="$1"
  local words=("GENESIS_COORDINATOR=127.0.0.1:$port" "GENESIS_NUM_PROCESSES=$num" "GENESIS_PROCESS_ID=$i")
  if [[ -n "$cpu_devices" ]]; then
    words+=("JAX_PLATFORMS=cpu" "JAX_NUM_CPU_DEVICES=$cpu_devices")
  fi
  if [[ -n "$gpus_per_process" ]]; then
    local first=$((i * gpus_per_process)) ids=() g
    for ((g = first; g < first + gpus_per_process; g++)); do ids+=("$g"); done
    words+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]}")")
  fi
  printf '%s\n' "${words[@]}"
}

if [[ "$dry_run" == 1 ]]; then
  quoted="$(printf '%q ' "${main_args[@]}")"
  q_log="$(printf '%q' "$log_dir")"
  echo "mkdir -p $q_log"
  for ((i = 0; i < num; i++)); do
    mapfile -t words < <(env_for "$i")
    echo "env ${words[*]} $python_bin -m genesis_jax.main ${quoted% } > $q_log/process_$i.log 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
signalled=" "
stop_all() {  # SIGTERM to each process once: a second one would end it without its checkpoint.
  local p
  for p in "${pids[@]}"; do
    [[ "$signalled" == *" $p "* ]] && continue
    signalled+="$p "
    kill "$p" 2>/dev/null || true
  done
}
# Ctrl-C or SIGTERM: the processes (which ignore the terminal's SIGINT, being background jobs of
# this script) get one SIGTERM, finish their step, save a checkpoint and exit 143; wait for them.
trap 'echo "local.sh: stopping: each process saves a checkpoint, then exits" >&2; stop_all' INT TERM
for ((i = 0; i < num; i++)); do
  mapfile -t words < <(env_for "$i")
  env "${words[@]}" "$python_bin" -m genesis_jax.main "${main_args[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: started $num processes (pids ${pids[*]}); logs in $log_dir/" >&2
tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
tail_pid=$!

# Poll: reap each process as it ends; the first failure stops the rest.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
    rc=0
    wait "$p" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $p exited with status $rc; stopping the others (see $log_dir/)" >&2
      stop_all
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} == 0)) || sleep 1
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
