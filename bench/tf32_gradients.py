"""Train-step gradient error of the whole U-Net per conv formulation and compute precision.

  PYTHONPATH=. python bench/tf32_gradients.py [--width 32] [--batch 2]

`bench/winograd_error.py` measures one conv's forward rounding; this measures what training
sees: the gradient of the restoration loss (sigmoid + MSE, as bench_model_cpu's step) with
respect to every parameter of the Genesis U-Net, on one random batch of 64x64x32 cubes, against
a float64 computation of the same step (BatchNorm statistics stay float32 there, ~1e-7, far below
what is measured). Rows: the conv as a direct conv, Winograd F(2, 3) and F(4, 3) along x
("unfold:2", "unfold:4"), each in
- float32 (this CPU),
- TF32, emulated: every 3x3x3 conv's (or its 2D pieces') operands rounded to 10 mantissa bits
  in the forward pass and in both gradient convs, float32 accumulation, as tensor cores run
  XLA's default-precision float32 convs on recent NVIDIA GPUs (the upconv and 1x1 matmuls stay
  float32 in every row),
- bfloat16 compute (model.dtype=bfloat16, float32 parameters).
Prints the relative rms error of the whole gradient vector, its cosine similarity to the
float64 gradient, and the ratio to the direct conv of the same precision. The direct conv is
"unfold:0" (2D convs over (y, z) with the x taps stacked on channels): the same products and
operand rounding as a 3D conv, summed in another order, and minutes faster than XLA:CPU's 3D
conv (in float64 especially).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.winograd_error import round_tf32
from genesis_jax.models import kernels, unet

jax.config.update("jax_enable_x64", True)

NATIVE = kernels.conv_native


@jax.custom_vjp
def conv_tf32(x, k):
  return NATIVE(round_tf32(x), round_tf32(k))


def _conv_tf32_fwd(x, k):
  return conv_tf32(x, k), (x, k)


def _conv_tf32_bwd(res, g):
  x, k = res
  _, vjp = jax.vjp(NATIVE, round_tf32(x), round_tf32(k))
  return vjp(round_tf32(g))  # both gradient convs also take TF32 operands


conv_tf32.defvjp(_conv_tf32_fwd, _conv_tf32_bwd)


def gradient(params, batch_stats, x, y, conv_impl: str, dtype, width: int) -> np.ndarray:
  # winograd_min_macs 0: every 3x3x3 conv takes the tile asked for.
  model = unet.UNet(width=width, conv_impl=conv_impl, dtype=dtype, winograd_min_macs=0)

  def loss_fn(params):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    p = jax.nn.sigmoid(logits.astype(jnp.float64 if dtype == jnp.float64 else jnp.float32))
    return jnp.mean((p - y) ** 2)

  g = jax.jit(jax.grad(loss_fn))(params)
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(g)])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--cube", type=int, nargs=3, default=[64, 64, 32])
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  shape = (args.batch, *args.cube, 1)
  x = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
  y = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
  v = unet.UNet(width=args.width).init(jax.random.key(0), x, train=False)
  params, stats = v["params"], v["batch_stats"]
  t = time.perf_counter()
  ref = gradient(params, stats, x.astype(jnp.float64), y.astype(jnp.float64), "unfold:0",
                 jnp.float64, args.width)
  print(f"float64 reference: {len(ref):,} gradient entries, {time.perf_counter() - t:.0f} s",
        flush=True)
  rows = []
  for precision in ("float32", "tf32", "bfloat16"):
    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    kernels.conv_native = conv_tf32 if precision == "tf32" else NATIVE
    try:
      for impl in ("unfold:0", "unfold:2", "unfold:4"):
        g = gradient(params, stats, x, y, impl, dtype, args.width)
        err = np.sqrt(np.mean((g - ref) ** 2) / np.mean(ref ** 2))
        cos = float(g @ ref / np.linalg.norm(g) / np.linalg.norm(ref))
        rows.append((precision, impl, err, cos))
        print(f"  {precision} {impl}: rms {err:.2e}", flush=True)
    finally:
      kernels.conv_native = NATIVE
  direct = {p: e for p, i, e, _ in rows if i == "unfold:0"}
  print(f"\nwidth {args.width}, batch {args.batch} of {'x'.join(map(str, args.cube))}")
  print("| precision | conv | gradient rms error (relative) | vs direct | cosine to float64 |")
  print("| --- | --- | ---: | ---: | ---: |")
  names = {"unfold:0": "direct", "unfold:2": "F(2, 3)", "unfold:4": "F(4, 3)"}
  for precision, impl, err, cos in rows:
    print(f"| {precision} | {names[impl]} | {err:.2e} | {err / direct[precision]:.2f} | "
          f"{cos:.7f} |")


if __name__ == "__main__":
  main()
