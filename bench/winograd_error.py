"""Rounding error of the Winograd-along-x convs against the direct conv, per compute precision.

  PYTHONPATH=. python bench/winograd_error.py

For float32, TF32 (emulated: every conv operand rounded to 10 mantissa bits, as tensor cores do
with XLA's default precision on recent GPUs) and bfloat16: the max and rms error, relative to the
float64-accurate output, of the direct 3x3x3 conv and of F(2, 3) and F(4, 3) along x. This is the
measurement behind `kernels.winograd_tile`'s choice (F(4, 3) only at full float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from genesis_jax.models import kernels

jax.config.update("jax_enable_x64", True)


def round_tf32(a: jax.Array) -> jax.Array:
  """Round-to-nearest-even of float32 to 10 explicit mantissa bits (TF32), kept as float32."""
  bits = lax.bitcast_convert_type(a, jnp.uint32)
  lsb = (bits >> 13) & 1
  bits = (bits + jnp.uint32(0xFFF) + lsb) & jnp.uint32(0xFFFFE000)
  return lax.bitcast_convert_type(bits, jnp.float32)


NATIVE = kernels.conv_native


def conv_tf32(x, k):
  return NATIVE(round_tf32(x), round_tf32(k))


def main():
  rng = np.random.default_rng(0)
  native = NATIVE
  rows = []
  for c, o in ((32, 64), (128, 128), (192, 64)):
    x64 = np.maximum(rng.normal(size=(2, 16, 16, 8, c)), 0.0)  # post-ReLU activations
    k64 = rng.normal(size=(3, 3, 3, c, o)) / np.sqrt(27 * c)
    ref = np.asarray(native(jnp.asarray(x64), jnp.asarray(k64)))  # float64
    x, k = jnp.asarray(x64, jnp.float32), jnp.asarray(k64, jnp.float32)
    for name, inner, dtype in (("float32", native, jnp.float32),
                               ("tf32", conv_tf32, jnp.float32),
                               ("bfloat16", native, jnp.bfloat16)):
      xs, ks = x.astype(dtype), k.astype(dtype)
      outs = {"direct": native(xs, ks) if name != "tf32" else conv_tf32(xs, ks)}
      kernels.conv_native = inner  # conv_winograd_x's 2D convs look it up at call time
      try:
        for m in (2, 4):
          outs[f"F({m},3)"] = kernels.conv_winograd_x(xs, ks, m)
      finally:
        kernels.conv_native = native
      for algo, y in outs.items():
        err = np.asarray(y, np.float64) - ref
        rows.append((f"{c}->{o}", name, algo, np.abs(err).max() / np.abs(ref).max(),
                     np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2))))
  print(f"{'conv':>9} {'precision':>9} {'algorithm':>9} {'max err':>9} {'rms err':>9} {'rms/direct':>10}")
  direct = {(r[0], r[1]): r[4] for r in rows if r[2] == "direct"}
  for conv, prec, algo, mx, rms in rows:
    print(f"{conv:>9} {prec:>9} {algo:>9} {mx:9.2e} {rms:9.2e} {rms / direct[conv, prec]:10.2f}")


if __name__ == "__main__":
  main()
