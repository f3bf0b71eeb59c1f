"""Train-step speed of the full-width Genesis U-Net on CPU: genesis_jax vs the original PyTorch net.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= \\
    PYTHONPATH=. python bench/bench_model_cpu.py --reps 3 [--conv_impl unfold] [--no_torch]
  PYTHONPATH=. python bench/bench_model_cpu.py --no_jax --torch_format channels_last  # torch alone

One step = forward + backward + SGD (momentum 0.9) of sigmoid + MSE on a batch of 2 cubes of
64x64x32 (x, y, z), 1,465 GFLOP (SPEC.md). Both run in this process, interleaved rep by rep so
that CPU contention hits both alike; prints seconds per step (median), GFLOP/s and the ratio
torch_time / jax_time (>= 1 means genesis_jax is at least as fast). torch is a bench-only dependency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from genesis_jax.models import unet  # noqa: E402

GFLOP_PER_STEP = 1465.0


def make_jax_step(conv_impl: str, dtype):
  model = unet.UNet(conv_impl=conv_impl, dtype=dtype)
  tx = optax.sgd(0.1, momentum=0.9)

  def loss_fn(params, batch_stats, x, y):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.mean((jax.nn.sigmoid(logits) - y) ** 2), upd["batch_stats"]

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  x0 = jnp.zeros((2, 64, 64, 32, 1))
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x0)
  state = [v["params"], v["batch_stats"], tx.init(v["params"])]
  jstep = jax.jit(step, donate_argnums=(0, 1, 2))
  return jstep, state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--conv_impl", default="auto")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--no_jax", action="store_true", help="torch alone (no XLA in the process)")
  ap.add_argument("--torch_format", default="contiguous", choices=("contiguous", "channels_last"),
                  help="torch memory format (channels_last = NDHWC, oneDNN's blocked-friendly one)")
  ap.add_argument("--torch_threads", type=int, default=0, help="0 = os.cpu_count()")
  ap.add_argument("--order", default="interleaved", choices=("interleaved", "blocked"),
                  help="alternate jax/torch rep by rep, or all jax reps then all torch reps")
  args = ap.parse_args()

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32)
  y = rng.uniform(size=(2, 64, 64, 32, 1)).astype(np.float32)

  jstep = None
  if not args.no_jax:
    jstep, state = make_jax_step(args.conv_impl,
                                 jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    t = time.perf_counter()
    *state, loss = jstep(*state, jx, jy)
    loss.block_until_ready()
    print(f"jax compile + first step: {time.perf_counter() - t:.1f} s", flush=True)

  torch_step = None
  if not args.no_torch:
    import torch
    from bench.torch_unet3d import UNet3D
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tmodel = UNet3D()
    tx_ = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    ty_ = torch.from_numpy(np.moveaxis(y, -1, 1).copy())
    if args.torch_format == "channels_last":
      fmt = torch.channels_last_3d
      tmodel = tmodel.to(memory_format=fmt)
      tx_, ty_ = tx_.to(memory_format=fmt), ty_.to(memory_format=fmt)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads, {args.torch_format}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}, "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)

    def _torch_step():
      topt.zero_grad()
      loss = torch.mean((torch.sigmoid(tmodel(tx_)) - ty_) ** 2)
      loss.backward()
      topt.step()
      return loss.item()

    torch_step = _torch_step
    torch_step()  # warm-up (oneDNN primitive creation)

  jt, tt = [], []

  def run_jax():
    nonlocal state
    t = time.perf_counter()
    *state, loss = jstep(*state, jx, jy)
    loss.block_until_ready()
    jt.append(time.perf_counter() - t)
    return f"jax {jt[-1]:.2f} s"

  def run_torch():
    t = time.perf_counter()
    torch_step()
    tt.append(time.perf_counter() - t)
    return f"torch {tt[-1]:.2f} s"

  runners = [r for r, on in ((run_jax, jstep), (run_torch, torch_step)) if on]
  if args.order == "interleaved":
    for _ in range(args.reps):
      print("  rep: " + ", ".join(r() for r in runners), flush=True)
  else:
    for r in runners:
      for _ in range(args.reps):
        print(f"  rep: {r()}", flush=True)
  if jt:
    j = statistics.median(jt)
    print(f"jax   ({args.conv_impl}, {args.dtype}): {j:.2f} s/step, {GFLOP_PER_STEP / j:.0f} GFLOP/s")
  if tt:
    t_ = statistics.median(tt)
    print(f"torch {torch.__version__} ({args.torch_format}): {t_:.2f} s/step, "
          f"{GFLOP_PER_STEP / t_:.0f} GFLOP/s")
  if jt and tt:
    print(f"ratio torch/jax: {t_ / j:.2f}")
  print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


if __name__ == "__main__":
  main()
