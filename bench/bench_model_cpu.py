"""Train-step speed of the full-width Genesis U-Net on CPU: genesis_jax vs the original PyTorch net.

  PYTHONPATH=. python bench/bench_model_cpu.py --rounds 3 --reps 2     # the comparison
  PYTHONPATH=. python bench/bench_model_cpu.py --in_process --reps 3   # both in one process
  PYTHONPATH=. python bench/bench_model_cpu.py --in_process --no_torch # genesis_jax alone

One step = forward + backward + SGD (momentum 0.9) of sigmoid + MSE on a batch of 2 cubes of
64x64x32 (x, y, z), 1,465 GFLOP (docs/method.md#cost-of-the-original). By default each framework
runs in its own fresh
process (warm-up, then --reps steps), alternating jax, torch, jax, torch, ... for --rounds rounds
so that slow drifts of the machine hit both alike; sharing one process slowed genesis_jax by ~2 s
per step after each torch step. The PyTorch baseline is given its best settings found here:
channels_last_3d (NDHWC, ~20% faster than NCDHW on this CPU), all cores, and glibc malloc kept
from returning memory to the OS (MALLOC_MMAP_MAX_=0 etc., ~1 s per step faster for torch, neutral
for jax); both children get the same environment. Prints seconds per step (median over all
steps), GFLOP/s and the ratio torch_time / jax_time (>= 1 means genesis_jax is at least as fast).
XLA_FLAGS defaults to the CLI's (`--xla_cpu_experimental_ynn_fusion_type=`). torch is a bench-only
dependency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from genesis_jax.main import CPU_XLA_FLAGS  # noqa: E402
from genesis_jax.models import kernels, unet  # noqa: E402

# As the CLI does, in every mode (read when the XLA backend starts, after these imports).
os.environ.setdefault("XLA_FLAGS", CPU_XLA_FLAGS)

GFLOP_PER_STEP = 1465.0


def make_jax_step(conv_impl: str, dtype, width: int = 32,
                  winograd_min_macs: float = kernels.DEFAULT_WINOGRAD_MIN_MACS):
  """(jitted train step, [params, batch_stats, opt_state]); also used by bench_model_gpu.py."""
  model = unet.UNet(width=width, conv_impl=conv_impl, dtype=dtype,
                    winograd_min_macs=winograd_min_macs)
  tx = optax.sgd(0.1, momentum=0.9)

  def loss_fn(params, batch_stats, x, y):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    return jnp.mean((p - y) ** 2), upd["batch_stats"]

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  x0 = jnp.zeros((2, 64, 64, 32, 1))
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x0)
  state = [v["params"], v["batch_stats"], tx.init(v["params"])]
  jstep = jax.jit(step, donate_argnums=(0, 1, 2))
  return jstep, state


MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(10 ** 11),
              "MALLOC_TOP_PAD_": str(2 ** 30)}


def isolated(args) -> None:
  """Alternates fresh single-framework processes; aggregates their per-step times."""
  env = {**os.environ, **MALLOC_ENV}
  common = [sys.executable, os.path.abspath(__file__), "--in_process", "--reps", str(args.reps),
            "--conv_impl", args.conv_impl, "--dtype", args.dtype,
            "--torch_format", args.torch_format, "--torch_threads", str(args.torch_threads)]
  times = {"jax": [], "torch": []}
  for r in range(args.rounds):
    for fw, flag in (("jax", "--no_torch"), ("torch", "--no_jax")):
      out = subprocess.run(common + [flag], env=env, capture_output=True, text=True, check=True)
      steps = [float(line.split()[-2]) for line in out.stdout.splitlines()
               if line.startswith("  rep:")]
      times[fw] += steps
      print(f"round {r}: {fw} " + ", ".join(f"{t:.2f}" for t in steps) + " s", flush=True)
  j, t = statistics.median(times["jax"]), statistics.median(times["torch"])
  import torch
  print(f"jax {jax.__version__} ({args.conv_impl}, {args.dtype}): {j:.2f} s/step, "
        f"{GFLOP_PER_STEP / j:.0f} GFLOP/s")
  print(f"torch {torch.__version__} ({args.torch_format}): {t:.2f} s/step, "
        f"{GFLOP_PER_STEP / t:.0f} GFLOP/s")
  print(f"ratio torch/jax: {t / j:.2f}   (XLA_FLAGS={env['XLA_FLAGS']!r}, "
        f"{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())})")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=3, help="jax/torch process pairs (isolated mode)")
  ap.add_argument("--in_process", action="store_true",
                  help="run the frameworks in this process instead of alternating subprocesses")
  ap.add_argument("--conv_impl", default="auto")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--no_jax", action="store_true", help="torch alone (no XLA in the process)")
  ap.add_argument("--torch_format", default="channels_last", choices=("contiguous", "channels_last"),
                  help="torch memory format (channels_last = NDHWC, oneDNN's blocked-friendly one)")
  ap.add_argument("--torch_threads", type=int, default=0, help="0 = os.cpu_count()")
  ap.add_argument("--order", default="interleaved", choices=("interleaved", "blocked"),
                  help="alternate jax/torch rep by rep, or all jax reps then all torch reps")
  args = ap.parse_args()
  if not args.in_process:
    return isolated(args)

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
