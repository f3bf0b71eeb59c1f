"""Device memory of the full-width train step per conv formulation, from XLA's buffer assignment.

  python bench/bench_memory.py                                   # batch 32, f32 and bf16
  python bench/bench_memory.py --batch 8 --impls native unfold --dtypes bfloat16

Compiles (does not run) the train step of bench_model_cpu.make_jax_step for each
(dtype, conv_impl) on the default backend and prints XLA's temporary-buffer size (activations
kept for the backward pass plus scratch) next to the parameters/optimizer state, and the ratio to
"native". The figure is the compiled program's own accounting on this backend: a GPU's
buffer assignment can differ from the CPU's, so run it on the card in question.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.bench_model_cpu import make_jax_step  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--cube", type=int, nargs=3, default=[64, 64, 32])
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--impls", nargs="+", default=["native", "unfold", "unfold:4"])
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); batch {args.batch} of "
        f"{'x'.join(map(str, args.cube))}, width {args.width}")
  print("| dtype | conv_impl | temp GiB | vs native | params + opt state GiB | compile s |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for dtype_name in args.dtypes:
    base = None
    for impl in args.impls:
      jstep, state = make_jax_step(impl, jnp.dtype(dtype_name), args.width)
      x = jax.ShapeDtypeStruct((args.batch, *args.cube, 1), jnp.float32)
      t = time.perf_counter()
      mem = jstep.lower(*state, x, x).compile().memory_analysis()
      secs = time.perf_counter() - t
      temp = mem.temp_size_in_bytes / 2 ** 30
      base = temp if impl == "native" else base
      ratio = f"{temp / base:.2f}" if base else "-"
      print(f"| {dtype_name} | {impl} | {temp:.2f} | {ratio} | "
            f"{mem.argument_size_in_bytes / 2 ** 30:.2f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
  main()
