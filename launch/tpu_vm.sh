#!/usr/bin/env bash
# Cloud TPU VM / pod launcher: create, install, run on all workers, fetch results, delete.
#
#   launch/tpu_vm.sh STEPS [options] [-- --config.field=value ...]
#     STEPS: create | install | run | fetch | delete | status, comma-joined (create,install,run),
#            or all (= create,install,run,fetch,delete; delete runs even if a step failed).
#   launch/tpu_vm.sh all --name genesis-v5e --zone us-west4-a --accelerator v5litepod-8 \
#       --config configs/pretrain_genesis.py --workdir runs/genesis
#   launch/tpu_vm.sh run --dry-run ...     # or DRY_RUN=1: print the gcloud commands, run nothing
#
# Options (environment fallbacks in brackets):
#   --name NAME          TPU VM name [TPU_NAME, default genesis]
#   --zone ZONE          [TPU_ZONE, default us-west4-a]
#   --project PROJECT    [GCP_PROJECT, default: gcloud's configured project]
#   --accelerator TYPE   e.g. v4-16, v5litepod-16, v5p-32 [TPU_ACCELERATOR, default v5litepod-16]
#   --version RUNTIME    TPU software version [TPU_RUNTIME, default v2-alpha-tpuv5-lite]
#   --spot               create a Spot TPU (cheaper, preemptible; resume by re-running `run`)
#   --config FILE        config file, relative to the repository root
#   --workdir DIR        run folder; on a multi-host slice it must be storage every host sees
#                        (a bucket mounted with gcsfuse at the same path on every worker, or a
#                        gs://... path where the run's code takes one): every host writes its
#                        part of each Orbax checkpoint there, and a re-run resumes from it
#   --results DIR        local folder for `fetch` [default results/NAME]
#   --stage-data SRC     `install` also copies SRC (gs://... prepared dataset) to ~/data on every
#                        worker; point --config.data.path at ../data/<name> (the job runs
#                        in ~/genesis_jax)
#   --detach             `run` starts the job under nohup and returns (log: ~/genesis_run.log
#                        on every worker; `fetch` copies worker 0's)

# shellcheck disable=SC2329  # The step_* functions are called by name: "step_$s".
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, shq

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="${TPU_NAME:-genesis}"
zone="${TPU_ZONE:-us-west4-a}"
project="${GCP_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-v5litepod-16}"
runtime="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
spot=0
config=""
workdir=""
results=""
detach=0
stage_data=""
dry_run="${DRY_RUN:-0}"

[[ $# -gt 0 ]] || usage 2
steps_arg="$1"; shift
[[ "$steps_arg" == -h || "$steps_arg" == --help ]] && usage 0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) runtime="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    --stage-data) stage_data="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option '$1' (config overrides go after --)" >&2; usage 2 ;;
  esac
done
overrides=("$@")
results="${results:-results/$name}"
[[ "$steps_arg" == all ]] && steps_arg="create,install,run,fetch,delete"
IFS=, read -r -a steps <<< "$steps_arg"
for s in "${steps[@]}"; do
  case "$s" in create|install|run|fetch|delete|status) ;;
    *) echo "tpu_vm.sh: unknown step '$s'" >&2; usage 2 ;;
  esac
done

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tarball="${TMPDIR:-/tmp}/genesis_jax-src-$name.tar.gz"

run() {  # Print the command; execute it unless this is a dry run. Steps run in subshells, so
  # a failing command ends its step (explicitly: `set -e` is off inside `... || x`).
  echo "+ $(shq "$@")"
  if [[ "$dry_run" != 1 ]]; then "$@" || exit $?; fi
}

on_all_workers() {  # Run a shell command line on every host of the TPU VM, in parallel.
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

step_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
    --accelerator-type="$accelerator" --version="$runtime" "${extra[@]+"${extra[@]}"}"
}

step_install() {
  # The working tree (uncommitted edits included), without virtualenvs, git data or runs.
  run tar -C "$repo_root" --exclude=.git --exclude='.venv*' --exclude=runs --exclude=results \
    --exclude=launch_logs --exclude=__pycache__ -czf "$tarball" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:genesis_jax-src.tar.gz" "${where[@]}" --worker=all
  # shellcheck disable=SC2016  # $HOME is expanded on the worker.
  on_all_workers 'set -e; mkdir -p ~/genesis_jax; tar -xzf ~/genesis_jax-src.tar.gz -C ~/genesis_jax;'\
' python3 -m venv ~/genesis_venv; ~/genesis_venv/bin/pip install -q -U pip;'\
' ~/genesis_venv/bin/pip install -q -e "$HOME/genesis_jax[io,tpu]"'
  if [[ -n "$stage_data" ]]; then  # Every host reads its own shard of the data from local disk.
    on_all_workers "mkdir -p ~/data && gcloud storage cp -r $(printf '%q' "$stage_data") ~/data/"
  fi
}

step_run() {
  [[ -n "$config" && -n "$workdir" ]] || { echo "tpu_vm.sh: run needs --config and --workdir" >&2; exit 2; }
  local args
  args="$(printf '%q ' --config "$config" --workdir "$workdir" "${overrides[@]+"${overrides[@]}"}")"
  # GENESIS_DISTRIBUTED=auto: JAX reads the worker list and this host's id from the TPU metadata.
  local cmd="cd ~/genesis_jax && GENESIS_DISTRIBUTED=auto ~/genesis_venv/bin/python -m genesis_jax.main ${args% }"
  if ((detach)); then
    cmd="nohup bash -c $(shq "$cmd") > ~/genesis_run.log 2>&1 < /dev/null &"
  fi
  on_all_workers "$cmd"
}

step_fetch() {
  run mkdir -p "$results"
  if [[ "$workdir" == gs://* ]]; then
    run gcloud storage cp -r "$workdir" "$results/"
  elif [[ -n "$workdir" ]]; then
    local remote="$workdir"  # Relative paths are relative to the checkout the job ran in.
    [[ "$remote" == /* ]] || remote="genesis_jax/$remote"
    run gcloud compute tpus tpu-vm scp --recurse "$name:$remote" "$results/" "${where[@]}" --worker=0
  fi
  if ((detach)); then
    run gcloud compute tpus tpu-vm scp "$name:genesis_run.log" "$results/" "${where[@]}" --worker=0
  fi
}

step_delete() {
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

step_status() {
  run gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state,health)'
}

status=0
for s in "${steps[@]}"; do
  if [[ "$s" == delete ]]; then  # Reached even after a failure: TPUs bill by the hour.
    rc=0; (step_delete) || rc=$?; ((status != 0)) || status=$rc; continue
  fi
  if ((status != 0)); then
    [[ "$s" == fetch ]] && { (step_fetch) || true; }  # Keep whatever the failed run left behind.
    continue
  fi
  ("step_$s") || status=$?
  ((status == 0)) || echo "tpu_vm.sh: step '$s' failed with status $status" >&2
done
exit "$status"
