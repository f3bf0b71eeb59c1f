"""Practical fp32 peak of this CPU: large square matmuls (the best case for any conv kernel).

  PYTHONPATH=. python bench/cpu_peak.py [--n 4096] [--reps 5]

A train step of the U-Net cannot run faster than the machine's matmul rate, so this bounds what
bench_model_cpu.py can show for both genesis_jax and PyTorch. Prints GFLOP/s of numpy (its BLAS),
torch.mm (if torch is installed) and jnp.dot (XLA:CPU), best of `reps`.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best_rate(fn, flop: float, reps: int) -> float:
  fn()  # Warm-up.
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return flop / min(times) / 1e9


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  n = args.n
  flop = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  print(f"{os.cpu_count()} CPUs, fp32 {n}x{n} @ {n}x{n} ({flop / 1e9:.0f} GFLOP)")
  print(f"numpy {np.__version__}: {best_rate(lambda: a @ b, flop, args.reps):.0f} GFLOP/s")
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}): "
          f"{best_rate(lambda: torch.mm(ta, tb), flop, args.reps):.0f} GFLOP/s")
  except ImportError:
    print("torch: not installed")
  import jax
  import jax.numpy as jnp
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  print(f"jax {jax.__version__}: "
        f"{best_rate(lambda: dot(ja, jb).block_until_ready(), flop, args.reps):.0f} GFLOP/s")


if __name__ == "__main__":
  main()
