"""A/B of genesis_jax's layer code against an earlier revision, one process, steps interleaved.

  PYTHONPATH=. python bench/bench_layers_ab.py --rev 0ecf5ff --reps 5

Loads `genesis_jax/models/layers.py` (and `kernels.py`, where the revision has it) as they were
at git revision --rev, compiles the full-width U-Net train step of bench_model_cpu.py once with
the old layers (every function and class that the working tree's `layers` or `kernels` also
names swapped in while tracing) and once with the working tree's, then alternates single steps
of the two for --reps pairs. --winograd_min_macs sets the Winograd threshold of both (older
revisions read it from their module global, which this sets). On this 2-core machine whole-process timings drift by 10-20% over
minutes; interleaving steps in one process makes the comparison of two genesis_jax versions
much tighter than two separate runs (it is not used for the torch comparison, where sharing a
process slowed genesis_jax). Prints per-pair times, medians and new/old.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from genesis_jax.models import kernels, layers  # noqa: E402


def _load_module(rev: str, name: str, as_name: str):
  """genesis_jax/models/<name>.py at `rev` as module `as_name`, or None where it did not exist."""
  proc = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:genesis_jax/models/{name}.py"],
                        capture_output=True, text=True)
  if proc.returncode:
    return None
  # An old layers.py that imports kernels gets the old kernels.
  src = proc.stdout.replace("from genesis_jax.models import kernels\n",
                            "import kernels_old as kernels\n")
  path = os.path.join(tempfile.mkdtemp(), f"{as_name}.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(as_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[as_name] = module  # flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def load_old_modules(rev: str) -> list:
  """The old (kernels, layers) modules of `rev`; kernels is absent before the split."""
  old_kernels = _load_module(rev, "kernels", "kernels_old")
  return [m for m in (old_kernels, _load_module(rev, "layers", "layers_old")) if m is not None]


def _accepting_known_fields(cls):
  """Builds `cls`, dropping keyword fields it does not declare (newer fields, e.g. a threshold)."""
  known = {f.name for f in dataclasses.fields(cls)}

  def make(*args, **kw):
    return cls(*args, **{k: v for k, v in kw.items() if k in known})
  return make


def old_swaps(old_modules: list, min_macs: float | None) -> dict:
  """{(new module, name): old object} for every callable of the old modules the new ones name."""
  swaps = {}
  for old in old_modules:
    if min_macs is not None and hasattr(old, "WINOGRAD_MIN_MACS"):
      old.WINOGRAD_MIN_MACS = min_macs
    for name, obj in vars(old).items():
      if not callable(obj) or getattr(obj, "__module__", "") != old.__name__:
        continue
      if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        obj = _accepting_known_fields(obj)
      for new in (kernels, layers):
        if hasattr(new, name):
          swaps[(new, name)] = obj
  return swaps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rev", required=True, help="git revision of the old layers.py")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--winograd_min_macs", type=float, default=None,
                  help="config.model.winograd_min_macs for both revisions (0 = Winograd "
                       "wherever it applies, inf = never; default: each revision's own)")
  args = ap.parse_args()
  for k, v in MALLOC_ENV.items():
    if os.environ.get(k) != v:
      print(f"note: {k} is not set as bench_model_cpu.py sets it (set it before starting python)")
      break
  swap = old_swaps(load_old_modules(args.rev), args.winograd_min_macs)
  extra = {} if args.winograd_min_macs is None else {"winograd_min_macs": args.winograd_min_macs}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32))
  y = jnp.asarray(rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32))
  steps = {}
  for name, patch in ((args.rev, swap), ("working tree", {})):
    saved = {(m, k): getattr(m, k) for m, k in patch}
    try:
      for (m, k), v in patch.items():
        setattr(m, k, v)
      jstep, state = make_jax_step("auto", jnp.float32, **extra)
      for _ in range(2):  # compile (traces with the patched module), then one warm step
        *state, loss = jstep(*state, x, y)
        loss.block_until_ready()
    finally:
      for (m, k), v in saved.items():
        setattr(m, k, v)
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
