#!/usr/bin/env bash
# Kubernetes: an indexed Job (one pod per host, all of its GPUs) plus a headless Service that
# gives pod 0 a stable DNS name for the jax.distributed coordinator.
#
#   launch/k8s.sh STEP [options] [-- --config.field=value ...]
#     STEP: render (print the manifest) | apply | logs (process 0) | delete
#   launch/k8s.sh apply --name genesis --image REGISTRY/genesis_jax:latest --hosts 4 --gpus 8 \
#       --config configs/pretrain_genesis.py --workdir /runs/genesis --pvc genesis-runs
#   launch/k8s.sh apply --dry-run ...   # or DRY_RUN=1: print manifest and kubectl commands only
#
# Pod i runs process i: GENESIS_COORDINATOR=NAME-0.NAME:PORT, GENESIS_NUM_PROCESSES=HOSTS and
# JOB_COMPLETION_INDEX (set by Kubernetes) as the process id.
# Options: --name (default genesis), --namespace, --image (an image with this repository
# installed, `pip install -e .[io,cuda]`), --hosts (pods, default 2), --gpus (per pod, default 8;
# 0 for CPU pods), --port (default 1234), --config, --workdir, --pvc CLAIM (a ReadWriteMany volume
# mounted at /runs; leave empty when the image mounts shared storage itself).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, shq

name=genesis
namespace=""
image=""
hosts=2
gpus=8
port=1234
config=""
workdir=""
pvc=""
dry_run="${DRY_RUN:-0}"

[[ $# -gt 0 ]] || usage 2
step="$1"; shift
[[ "$step" == -h || "$step" == --help ]] && usage 0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --pvc) pvc="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "k8s.sh: unknown option '$1' (config overrides go after --)" >&2; usage 2 ;;
  esac
done
overrides=("$@")
case "$step" in render|apply|logs|delete) ;; *) echo "k8s.sh: unknown step '$step'" >&2; usage 2 ;; esac
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || { echo "k8s.sh: --hosts must be a positive integer" >&2; exit 2; }
[[ "$gpus" =~ ^[0-9]+$ ]] || { echo "k8s.sh: --gpus must be a non-negative integer" >&2; exit 2; }
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || {
  echo "k8s.sh: --name '$name' must be a DNS label (lower case, digits, '-')" >&2; exit 2; }

kubectl_ns=(kubectl)
[[ -n "$namespace" ]] && kubectl_ns+=(--namespace="$namespace")

json_string() {  # A YAML-safe double-quoted scalar (JSON string syntax is valid YAML).
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}

render() {
  [[ -n "$image" && -n "$config" && -n "$workdir" ]] || {
    echo "k8s.sh: --image, --config and --workdir are required" >&2; exit 2; }
  local args=(--config "$config" --workdir "$workdir" "${overrides[@]+"${overrides[@]}"}") a items=()
  for a in "${args[@]}"; do items+=("$(json_string "$a")"); done
  local arg_list
  arg_list="[$(IFS=,; echo "${items[*]}")]"
  arg_list="${arg_list//\",\"/\", \"}"
  cat <<EOF
# Rendered by launch/k8s.sh. Headless Service: pod i of the Job is reachable as $name-i.$name.
apiVersion: v1
kind: Service
metadata:
  name: $name
spec:
  clusterIP: None
  publishNotReadyAddresses: true  # Pod 0's name must resolve before anything reports ready.
  selector:
    job-name: $name
  ports:
  - name: coordinator
    port: $port
---
apiVersion: batch/v1
kind: Job
metadata:
  name: $name
spec:
  completionMode: Indexed  # Pods get JOB_COMPLETION_INDEX = 0 .. hosts-1: the process id.
  completions: $hosts
  parallelism: $hosts
  backoffLimit: 0  # A lost process stalls the others; fail fast, re-apply to resume.
  template:
    spec:
      subdomain: $name
      restartPolicy: Never
      terminationGracePeriodSeconds: 120  # SIGTERM: finish the step, save a checkpoint.
      containers:
      - name: genesis
        image: $(json_string "$image")
        command: ["python", "-m", "genesis_jax.main"]
        args: $arg_list
        env:
        - name: GENESIS_COORDINATOR
          value: "$name-0.$name:$port"
        - name: GENESIS_NUM_PROCESSES
          value: "$hosts"
        ports:
        - containerPort: $port
EOF
  if ((gpus > 0)); then
    cat <<EOF
        resources:
          limits:
            nvidia.com/gpu: $gpus
EOF
  fi
  cat <<EOF
        volumeMounts:
        - name: dshm  # grain worker processes pass batches through shared memory.
          mountPath: /dev/shm
EOF
  if [[ -n "$pvc" ]]; then
    cat <<EOF
        - name: runs
          mountPath: /runs
EOF
  fi
  cat <<EOF
      volumes:
      - name: dshm
        emptyDir:
          medium: Memory
EOF
  if [[ -n "$pvc" ]]; then
    cat <<EOF
      - name: runs
        persistentVolumeClaim:
          claimName: $pvc
EOF
  fi
}

show() {  # Print a command the way a person would type it (still valid shell).
  echo "+ $(shq "$@")"
}

case "$step" in
  render)
    render ;;
  apply)
    manifest="$(render)"
    if [[ "$dry_run" == 1 ]]; then
      show "${kubectl_ns[@]}" apply -f -
      echo "$manifest"
    else
      show "${kubectl_ns[@]}" apply -f -
      echo "$manifest" | "${kubectl_ns[@]}" apply -f -
    fi ;;
  logs)
    # Process 0's pod (the index label exists from Kubernetes 1.28 on).
    cmd=("${kubectl_ns[@]}" logs -f -l "job-name=$name,batch.kubernetes.io/job-completion-index=0")
    show "${cmd[@]}"
    [[ "$dry_run" == 1 ]] || "${cmd[@]}" ;;
  delete)
    cmd=("${kubectl_ns[@]}" delete "job,service" "$name" --ignore-not-found)
    show "${cmd[@]}"
    [[ "$dry_run" == 1 ]] || "${cmd[@]}" ;;
esac
