"""A/B of genesis_jax's layer code against an earlier revision, one process, steps interleaved.

  PYTHONPATH=. python bench/bench_layers_ab.py --rev 0ecf5ff --reps 5

Loads `genesis_jax/models/layers.py` as it was at git revision --rev, compiles the full-width
U-Net train step of bench_model_cpu.py once with the old layers (every function and class of the
module swapped in while tracing) and once with the working tree's, then alternates single steps
of the two for --reps pairs. On this 2-core machine whole-process timings drift by 10-20% over
minutes; interleaving steps in one process makes the comparison of two genesis_jax versions
much tighter than two separate runs (it is not used for the torch comparison, where sharing a
process slowed genesis_jax). Prints per-pair times, medians and new/old.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from bench.bench_model_cpu import MALLOC_ENV, make_jax_step  # noqa: E402
from genesis_jax.models import layers  # noqa: E402


def load_old_layers(rev: str):
  src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:genesis_jax/models/layers.py"],
                       capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "layers_old.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("layers_old", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["layers_old"] = module  # flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rev", required=True, help="git revision of the old layers.py")
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  for k, v in MALLOC_ENV.items():
    if os.environ.get(k) != v:
      print(f"note: {k} is not set as bench_model_cpu.py sets it (set it before starting python)")
      break
  old = load_old_layers(args.rev)
  swap = {name: getattr(old, name) for name in vars(old)
          if hasattr(layers, name) and callable(getattr(old, name))
          and getattr(getattr(old, name), "__module__", "") == "layers_old"}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32))
  y = jnp.asarray(rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32))
  steps = {}
  for name, patch in ((args.rev, swap), ("working tree", {})):
    saved = {k: getattr(layers, k) for k in patch}
    try:
      for k, v in patch.items():
        setattr(layers, k, v)
      jstep, state = make_jax_step("auto", jnp.float32)
      for _ in range(2):  # compile (traces with the patched module), then one warm step
        *state, loss = jstep(*state, x, y)
        loss.block_until_ready()
    finally:
      for k, v in saved.items():
        setattr(layers, k, v)
    steps[name] = [jstep, state]
    print(f"compiled {name}: loss {float(loss):.6f}", flush=True)
  times = {name: [] for name in steps}
  for _ in range(args.reps):
    for name, entry in steps.items():
      t = time.perf_counter()
      *entry[1], loss = entry[0](*entry[1], x, y)
      loss.block_until_ready()
      times[name].append(time.perf_counter() - t)
    print("  " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in steps), flush=True)
  med = {n: statistics.median(t) for n, t in times.items()}
  for n in steps:
    print(f"{n}: median {med[n]:.2f} s/step, min {min(times[n]):.2f}")
  faster = sum(b < a for a, b in zip(times[args.rev], times["working tree"]))
  print(f"new/old median: {med['working tree'] / med[args.rev]:.3f}; working tree faster in "
        f"{faster} of {args.reps} pairs (jax {jax.__version__})")


if __name__ == "__main__":
  main()
