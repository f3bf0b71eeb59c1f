"""Cubes/s of the combined Genesis corruption: jitted+vmapped JAX against a plain numpy version.

Both run the same recipe (docs/method.md#order-and-rates, the original's default rates) on 64x64x32
cubes, batch 32, one CPU
core each, interleaved so that load from other processes hits both alike:

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c 0 python bench/bench_corruptions.py [--reps 5] [--forced]

`--forced` also times each transform forced on (rate 1), per cube, for both.
The numpy baseline is written the way the original is (Python loops over 10,000 shuffle blocks,
`np.interp` over 100,000 Bezier samples), not a copy of its code.
"""
from __future__ import annotations

import argparse
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import comb

from genesis_jax import corruptions

SHAPE = (64, 64, 32)


# ---------------------------------------------------------------------------------------------
# The numpy baseline: one cube (x, y, z), Python `random` for scalars as the original does.

def np_flip(x, y, rate):
  for _ in range(3):
    if random.random() >= rate:
      break
    axis = random.randrange(3)
    x, y = np.flip(x, axis), np.flip(y, axis)
  return x, y


def np_local_shuffle(x, blocks=10_000):
  out = x.copy()
  sx, sy, sz = x.shape
  for _ in range(blocks):
    bx, by, bz = random.randint(1, sx // 10), random.randint(1, sy // 10), random.randint(1, sz // 10)
    ox, oy, oz = random.randint(0, sx - bx), random.randint(0, sy - by), random.randint(0, sz - bz)
    w = x[ox:ox + bx, oy:oy + by, oz:oz + bz].flatten()
    np.random.shuffle(w)
    out[ox:ox + bx, oy:oy + by, oz:oz + bz] = w.reshape(bx, by, bz)
  return out


def np_nonlinear(x, n=100_000):
  pts = [(0.0, 0.0), (random.random(), random.random()), (random.random(), random.random()),
         (1.0, 1.0)]
  t = np.linspace(0.0, 1.0, n)
  bern = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
  xs = np.dot([p[0] for p in pts], bern)
  ys = np.dot([p[1] for p in pts], bern)
  if random.random() < 0.5:
    xs = np.sort(xs)  # Decreasing map.
  else:
    xs, ys = np.sort(xs), np.sort(ys)
  return np.interp(x, xs, ys).astype(x.dtype)


def _box(s, lo_size, hi_size):
  b = [random.randint(lo, hi) for lo, hi in zip(lo_size, hi_size)]
  o = [random.randint(3, si - bi - 3) for si, bi in zip(s, b)]
  return tuple(slice(oi, oi + bi) for oi, bi in zip(o, b))


def np_inpaint(x):
  s = x.shape
  for _ in range(5):
    if random.random() >= 0.95:
      break
    box = _box(s, [n // 6 for n in s], [n // 3 for n in s])
    x[box] = np.random.rand(*x[box].shape)
  return x


def np_outpaint(x):
  s = x.shape
  orig = x
  x = np.random.rand(*s).astype(orig.dtype)
  sizes = lambda: ([n - 4 * n // 7 for n in s], [n - 3 * n // 7 for n in s])
  box = _box(s, *sizes())
  x[box] = orig[box]
  for _ in range(4):
    if random.random() >= 0.95:
      break
    box = _box(s, *sizes())
    x[box] = orig[box]
  return x


def np_corrupt(cube, p: corruptions.CorruptionParams):
  x, y = np_flip(cube, cube, p.flip_rate)
  x = np.array(x)
  if random.random() < p.local_rate:
    x = np_local_shuffle(x, p.local_blocks)
  if random.random() < p.nonlinear_rate:
    x = np_nonlinear(x)
  if random.random() < p.paint_rate:
    x = np_inpaint(x) if random.random() < 1 - p.outpaint_rate else np_outpaint(x)
  return x, np.array(y)


# ---------------------------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--forced", action="store_true", help="also time each transform forced on")
  args = ap.parse_args()
  random.seed(0)
  np.random.seed(0)
  rng = np.random.default_rng(0)
  cubes = rng.random((args.batch,) + SHAPE, dtype=np.float32)
  params = corruptions.CorruptionParams()

  fn = jax.jit(corruptions.corrupt_batch, static_argnames="params")
  xj = jnp.asarray(cubes[..., None])
  t0 = time.perf_counter()
  jax.block_until_ready(fn(jax.random.key(0), xj, params=params))
  compile_s = time.perf_counter() - t0

  tj, tn = [], []
  for r in range(args.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(r + 1), xj, params=params))
    tj.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for c in cubes:
      np_corrupt(c, params)
    tn.append(time.perf_counter() - t0)
  jax_cps = args.batch / np.median(tj)
  np_cps = args.batch / np.median(tn)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}; "
        f"batch {args.batch} of {SHAPE}, {args.reps} interleaved reps (median)")
  print(f"combined pipeline: jax {jax_cps:8.1f} cubes/s   numpy {np_cps:6.1f} cubes/s   "
        f"ratio {jax_cps / np_cps:5.1f}x   (jax compile {compile_s:.1f} s)")

  if args.forced:
    cube = cubes[0]
    ops = {
        "local shuffle": (lambda k, x: corruptions.local_shuffle(k, x), np_local_shuffle),
        "non-linear": (corruptions.nonlinear, np_nonlinear),
        "in-painting": (corruptions.inpaint, lambda x: np_inpaint(x.copy())),
        "out-painting": (corruptions.outpaint, np_outpaint),
        "flip": (lambda k, x: corruptions.flip(k, x, 1.0), lambda x: np_flip(x, x, 1.0)),
    }
    for name, (jf, nf) in ops.items():
      bj = jax.jit(jax.vmap(jf))
      keys = jax.random.split(jax.random.key(0), args.batch)
      jax.block_until_ready(bj(keys, xj))
      tj, tn = [], []
      for r in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(bj(keys, xj))
        tj.append((time.perf_counter() - t0) / args.batch)
        t0 = time.perf_counter()
        for _ in range(4):
          nf(cube)
        tn.append((time.perf_counter() - t0) / 4)
      print(f"  forced {name:14s} jax {1e3 * np.median(tj):7.2f} ms/cube   "
            f"numpy {1e3 * np.median(tn):7.2f} ms/cube   ratio {np.median(tn) / np.median(tj):6.1f}x")


if __name__ == "__main__":
  main()
