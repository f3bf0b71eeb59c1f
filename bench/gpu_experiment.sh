#!/usr/bin/env bash
# The registered Scratch / Genesis (faithful) / Genesis + fix experiment at the original's scale
# (issue 17, item 6): `configs/experiment_phantom.py:faithful_gpu` (full-width network, 64x64x32
# cubes, bfloat16) in one bounded command for a GPU machine.
#
#   bash bench/gpu_experiment.sh                 # on the GPU machine, from the repository root
#   BUDGET_S=60 bash bench/gpu_experiment.sh --tiny   # the same path at tiny sizes, on a CPU
#
# Environment: WORKDIR (default runs/experiment_faithful_gpu), BUDGET_S (wall seconds before the
# run is stopped with SIGTERM, default 540: it stops at the next step, the trial in progress keeps
# its checkpoint, and a second call with the same WORKDIR continues), OUT (where the report, the
# run log and a timing summary are copied; the device tool's $OUT by default), WHEELS (a folder
# of wheels installed first, default .whl: the device image lacks grain, nibabel, ml_collections
# and tensorboardX; download them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl grain nibabel ml_collections tensorboardX array_record dm-tree
# and name .whl in the call's carry). Any further arguments are config overrides.
set -uo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${WORKDIR:-runs/experiment_faithful_gpu}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-$WORKDIR/out}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$WORKDIR"

if [[ -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

overrides=()
if [[ "${1:-}" == "--tiny" ]]; then
  shift
  # Every size down to what a CPU runs in a minute or two; the code path is the GPU run's.
  overrides=(
    "--config.experiment.trials=2"
    "--config.experiment.overrides={'model': {'width': 4, 'dtype': 'bfloat16'}, 'data': {'crop': (16, 16, 8), 'phantom_shape': (64, 64, 48), 'train_cases': 2, 'val_cases': 1, 'test_cases': 1}, 'num_steps': 4, 'eval_every': 2, 'checkpoint_every': 2, 'train': {'batch_size': 2}}"
    "--config.experiment.pretrain_overrides={'model': {'width': 4, 'dtype': 'bfloat16'}, 'data': {'crop': (16, 16, 8), 'phantom_shape': (64, 64, 48), 'phantom_subjects': 3, 'cubes_per_scan': 4}, 'num_steps': 4, 'eval_every': 2, 'checkpoint_every': 2, 'eval_batches': 1, 'train': {'batch_size': 2, 'decay_every': 80}}"
  )
fi

python3 -c "import jax; print('devices:', jax.devices())" 2>&1 | tee "$OUT/devices.txt"
start=$(date +%s)
PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=60 "$BUDGET_S" \
    python3 -m genesis_jax.main --config configs/experiment_phantom.py:faithful_gpu \
    --workdir "$WORKDIR" "${overrides[@]}" "$@" 2>&1 | tee "$OUT/experiment.log"
rc=${PIPESTATUS[0]}
end=$(date +%s)

{
  echo "exit code $rc after $((end - start)) s (budget ${BUDGET_S} s; 124/143 = stopped by the budget)"
  for f in "$WORKDIR"/pretrain*/summary.json; do
    [[ -f "$f" ]] && echo "$f: $(tr -d '\n ' < "$f" | cut -c1-300)"
  done
  echo "finished trials: $(find "$WORKDIR" -name eval.json | wc -l)"
} | tee "$OUT/timing.txt"
for f in "$WORKDIR"/results_faithful_gpu.md "$WORKDIR"/results_faithful_gpu.json \
         "$WORKDIR"/results_faithful_gpu.png; do
  [[ -f "$f" ]] && cp "$f" "$OUT/"
done
exit "$rc"
