"""GPU train-step throughput of the full-width Genesis U-Net: genesis_jax vs the original PyTorch net.

  python bench/bench_model_gpu.py                       # all batches and dtypes, one invocation
  python bench/bench_model_gpu.py --batches 32 --steps 20 --out /tmp/gpu.jsonl
  python bench/bench_model_gpu.py --batches 32 --profile /tmp/prof   # + where the time goes
  python bench/bench_model_gpu.py --batches 32 --dtypes float32 --conv_impl native unfold
  python bench/bench_model_gpu.py --width 4 --cube 16 16 8 --batches 2 --steps 2   # smoke (CPU)

One step = forward + backward + SGD (momentum 0.9) of sigmoid + MSE on a batch of 64x64x32 cubes,
732.5 GFLOP per cube (docs/method.md#cost-of-the-original: 1,465 GFLOP per batch-2 step). Each
framework runs in its own
child process (JAX preallocates GPU memory), genesis_jax first, then PyTorch (--first torch swaps
them), over the same list of (dtype, batch) configurations in priority order, variant by variant
(--conv_impl, --torch_formats); a child skips what its share of --budget_s leaves no time for.
float32 is each framework's default precision (both allow TF32 in convolutions on NVIDIA GPUs:
XLA's default precision, torch.backends.cudnn.allow_tf32=True);
bfloat16 is bf16 compute with float32 parameters (genesis_jax `dtype=bfloat16`, torch autocast).
PyTorch gets cudnn.benchmark and the faster of NCDHW and channels_last_3d per configuration.
The genesis_jax child also measures the card's matrix-product ceilings and the corruption
pipeline (batch 32, first) so its share of a train step can be given.

Prints images/s, achieved TFLOP/s, MFU against the datasheet dense peak (--peak_bf16/--peak_tf32,
H100/H200 SXM by default) and against the measured bf16 matmul rate, and the ratio
genesis_jax / PyTorch.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GFLOP_PER_CUBE = 1465.0 / 2  # at 64x64x32, full width; scaled for other sizes/widths in main()


def _emit(rec: dict, out: str | None) -> None:
  line = json.dumps(rec)
  print("RESULT " + line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")


def _run_configs(framework: str, key: str, variants, run, args, stop_at: float,
                 after=None) -> None:
  """run(dtype, batch, variant) for every variant and configuration until time.time() passes
  stop_at, variant by variant (the first named runs at every configuration first); emits one
  train_step record each (a failure, e.g. out of memory, as its "error")."""
  for variant in variants:
    for dtype_name, batch in args.configs:
      if time.time() > stop_at:
        print(f"{framework}: skipping {dtype_name} batch {batch} {variant} (budget)", flush=True)
        continue
      rec = {"framework": framework, "what": "train_step", "dtype": dtype_name, "batch": batch,
             key: variant}
      try:
        rec.update(run(dtype_name, batch, variant))
      except Exception as e:  # noqa: BLE001 - report and go on
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      if after is not None:
        after()
      _emit(rec, args.out)


def _time_steps(step_fn, sync, steps: int, repeats: int = 3) -> float:
  """Median over `repeats` of the mean time per step of `steps` back-to-back steps."""
  times = []
  for _ in range(repeats):
    sync()
    t = time.perf_counter()
    for _ in range(steps):
      step_fn()
    sync()
    times.append((time.perf_counter() - t) / steps)
  return statistics.median(times)


def _profile(step_fn, sync, logdir: str, hlo_text: str, steps: int = 3, top: int = 25) -> list:
  """Traces `steps` steps with jax.profiler; returns the ops that took longest, per step.

  Sums the trace's complete events by name (on a GPU: the device kernels and XLA ops), skipping
  the host-side wrappers, and names each by the jax op it came from (from the compiled HLO,
  also written to <logdir>/step.hlo); prints them so one device call gives the breakdown.
  """
  import collections
  import glob
  import gzip
  import re
  import jax
  os.makedirs(logdir, exist_ok=True)
  with open(os.path.join(logdir, "step.hlo"), "w") as f:
    f.write(hlo_text)
  origin = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text))
  sync()
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      step_fn()
    sync()
  files = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
  if not files:
    return []
  events = json.load(gzip.open(files[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  total = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(("$", "ThunkExecutor", "PjitFunction")):
      continue
    # GPU kernels carry the HLO op they run (args.hlo_op); group by it so it maps to a jax op.
    name = e.get("args", {}).get("hlo_op") or e["name"]
    total[(pids.get(e.get("pid"), "?")[:24], name[:90])] += e.get("dur", 0)
  rows = [(round(us / 1e3 / steps, 3), where, name, origin.get(name, "")[-80:])
          for (where, name), us in total.most_common(top)]
  for ms, where, name, op in rows:
    print(f"  profile {ms:9.3f} ms/step  {where:24s} {name[:40]:40s} {op}", flush=True)
  return rows


def jax_child(args) -> None:
  sys.path.insert(0, ROOT)
  if args.no_command_buffers:  # read when the backend starts, so before the first JAX call
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench.bench_model_cpu import make_jax_step
  from genesis_jax import corruptions

  deadline = time.time() + args.child_budget_s
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}), "
        f"default_matmul_precision={jax.config.jax_default_matmul_precision}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  # Matrix-product ceilings (random operands, median of timed repeats).
  n = args.matmul_n
  for name, dt in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    a = jax.random.normal(jax.random.key(1), (n, n), dt)
    b = jax.random.normal(jax.random.key(2), (n, n), dt)
    mm = jax.jit(lambda a, b: a @ b)
    res = {"c": mm(a, b)}

    def one_mm(mm=mm, a=a, b=b):
      res["c"] = mm(a, b)

    t = _time_steps(one_mm, lambda: jax.block_until_ready(res["c"]), steps=10)
    _emit({"framework": "jax", "what": "matmul", "dtype": name, "n": n,
           "tflops": 2 * n ** 3 / t / 1e12}, args.out)

  rng = np.random.default_rng(0)
  # Corruption pipeline at the original's rates, batch 32, on this device.
  if args.corruption:
    params = corruptions.CorruptionParams()
    cb = jax.jit(lambda k, x: corruptions.corrupt_batch(k, x, params))
    x = jnp.asarray(rng.uniform(size=(32, *args.cube, 1)).astype(np.float32))
    keys = [jax.random.key(i) for i in range(64)]
    t0 = time.perf_counter()
    jax.block_until_ready(cb(keys[0], x))
    compile_s = time.perf_counter() - t0
    it = iter(range(10 ** 9))
    out = {}

    def one_c():
      out["y"] = cb(keys[next(it) % 64], x)

    t = _time_steps(one_c, lambda: jax.block_until_ready(out.get("y")), 20)
    _emit({"framework": "jax", "what": "corruption", "batch": 32, "s_per_batch": t,
           "cubes_per_s": 32 / t, "compile_s": compile_s}, args.out)

  def run(dtype_name: str, batch: int, conv_impl: str) -> dict:
    # "unfold:4": the unfold convs with Winograd F(4, 3) forced, "unfold:2", "unfold:0" (none);
    # plain "unfold" picks the tile by dtype and precision (kernels.winograd_tile).
    label = conv_impl.replace(":", "_f")
    extra = {} if args.winograd_min_macs is None else {"winograd_min_macs": args.winograd_min_macs}
    jstep, state = make_jax_step(conv_impl,
                                 jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32,
                                 args.width, **extra)
    shape = (batch, *args.cube, 1)
    data = np.random.default_rng(batch)  # every configuration of a batch size: the same data
    x = jnp.asarray(data.uniform(size=shape).astype(np.float32))
    y = jnp.asarray(data.uniform(size=shape).astype(np.float32))
    t0 = time.perf_counter()
    compiled = jstep.lower(*state, x, y).compile()  # once; --profile reads its HLO text
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one():
      *holder["state"], holder["loss"] = compiled(*holder["state"], x, y)

    for _ in range(3):
      one()
    t = _time_steps(one, lambda: holder["loss"].block_until_ready(), args.steps)
    rec = {"s_per_step": t, "images_per_s": batch / t, "compile_s": compile_s,
           "loss": float(holder["loss"])}
    if args.profile:
      rec["profile_top_ms_per_step"] = _profile(one, lambda: holder["loss"].block_until_ready(),
                                                f"{args.profile}/{dtype_name}_b{batch}_{label}",
                                                compiled.as_text())
    if not np.isfinite(rec["loss"]):
      rec["error"] = "non-finite loss"
    return rec

  _run_configs("jax", "conv_impl", args.conv_impl, run, args, deadline - args.min_left_s)


def torch_child(args) -> None:
  sys.path.insert(0, ROOT)
  import numpy as np
  import torch
  from bench.torch_unet3d import UNet3D

  deadline = time.time() + args.child_budget_s
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.backends.cudnn.benchmark = True
  name = torch.cuda.get_device_name() if cuda else "cpu"
  print(f"torch {torch.__version__} on {name}, cudnn {torch.backends.cudnn.version()}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}", flush=True)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  def run(dtype_name: str, batch: int, fmt_name: str) -> dict:
    fmt = torch.channels_last_3d if fmt_name == "channels_last" else torch.contiguous_format
    model = UNet3D(width=args.width).to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shape = (batch, 1, *args.cube)
    data = np.random.default_rng(batch)  # the same cubes as the genesis_jax child
    x = torch.from_numpy(data.uniform(size=shape).astype(np.float32)).to(device)
    y = torch.from_numpy(data.uniform(size=shape).astype(np.float32)).to(device)
    x, y = x.to(memory_format=fmt), y.to(memory_format=fmt)
    holder = {}

    def one():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"):
        logits = model(x)
      loss = torch.mean((torch.sigmoid(logits.float()) - y) ** 2)
      loss.backward()
      opt.step()
      holder["loss"] = loss

    t0 = time.perf_counter()
    one()
    sync()
    compile_s = time.perf_counter() - t0  # mostly cudnn.benchmark's algorithm search
    for _ in range(2):
      one()
    t = _time_steps(one, sync, args.steps)
    return {"s_per_step": t, "images_per_s": batch / t, "compile_s": compile_s,
            "loss": float(holder["loss"].detach())}

  _run_configs("torch", "format", args.torch_formats, run, args,
               deadline - args.min_left_s / 2, after=torch.cuda.empty_cache if cuda else None)


def summarize(records: list[dict], args, gflop_per_cube: float) -> None:
  mm = {r["dtype"]: r["tflops"] for r in records if r.get("what") == "matmul"}
  steps = [r for r in records if r.get("what") == "train_step" and "error" not in r]
  print("\nmatmul ceiling (jax, random operands): " +
        ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in mm.items()))
  print(f"model: width {args.width}, cube {'x'.join(map(str, args.cube))}, "
        f"{gflop_per_cube:.1f} GFLOP per cube per train step")
  hdr = ("dtype", "batch", "jax conv", "jax img/s", "torch img/s (fmt)", "ratio", "jax TFLOP/s",
         "MFU", "of jax matmul", "torch MFU")
  print("| " + " | ".join(hdr) + " |")
  print("|" + "---|" * len(hdr))
  for (dtype_name, batch), conv_impl in itertools.product(args.configs, args.conv_impl):
    j = [r for r in steps if r["framework"] == "jax" and r["dtype"] == dtype_name
         and r["batch"] == batch and r.get("conv_impl", "auto") == conv_impl]
    t = [r for r in steps if r["framework"] == "torch" and r["dtype"] == dtype_name
         and r["batch"] == batch]
    if not j and not t:
      continue
    peak = args.peak_bf16 if dtype_name == "bfloat16" else args.peak_tf32
    meas = mm.get(dtype_name, float("nan"))
    ji = j[0]["images_per_s"] if j else float("nan")
    best = max(t, key=lambda r: r["images_per_s"]) if t else None
    ti = best["images_per_s"] if best else float("nan")
    jt = ji * gflop_per_cube / 1e3
    tt = ti * gflop_per_cube / 1e3
    fmt = best["format"] if best else "-"
    print(f"| {dtype_name} | {batch} | {conv_impl} | {ji:.1f} | {ti:.1f} ({fmt}) | {ji / ti:.2f} "
          f"| {jt:.0f} | {100 * jt / peak:.1f}% | {100 * jt / meas:.1f}% "
          f"| {100 * tt / peak:.1f}% |")
  for r in records:
    if r.get("what") == "corruption":
      share = ""
      j = [s for s in steps if s["framework"] == "jax" and s["batch"] == 32]
      for s in j:
        share += (f"; {100 * r['s_per_batch'] / (r['s_per_batch'] + s['s_per_step']):.1f}% of a "
                  f"{s['dtype']} batch-32 step + corruption")
      print(f"corruption (batch 32): {r['cubes_per_s']:.0f} cubes/s{share}")
  for r in records:
    if "error" in r:
      print(f"error: {r}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--child", choices=("jax", "torch"))
  ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 16])
  ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat (3 repeats)")
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--conv_impl", nargs="+", default=["auto"],
                  choices=("auto", "native", "unfold", "unfold:0", "unfold:2", "unfold:4"),
                  help="genesis_jax's 3D conv (config.model.conv_impl), each timed per "
                       "configuration: auto = unfold on GPU; native = cuDNN 3D convs; unfold = "
                       "2D convs with Winograd along x (auto tile: F(2, 3) for TF32/bf16 = 2/3 "
                       "of the multiply-adds); unfold:4 forces F(4, 3) (1/2, ~2.8x TF32's "
                       "rounding error), unfold:0 no Winograd")
  ap.add_argument("--winograd_min_macs", type=float, default=None,
                  help="genesis_jax's config.model.winograd_min_macs: convs below this many "
                       "multiply-adds skip Winograd (0 = wherever it applies, inf = never; "
                       "default: the model's)")
  ap.add_argument("--cube", type=int, nargs=3, default=[64, 64, 32])
  ap.add_argument("--budget_s", type=float, default=480.0, help="for both children together")
  ap.add_argument("--child_budget_s", type=float, default=240.0)
  ap.add_argument("--first", choices=("jax", "torch"), default="jax",
                  help="which child runs first (the other gets what is left of --budget_s)")
  ap.add_argument("--first_share", type=float, default=0.5,
                  help="fraction of --budget_s for the child that runs first")
  ap.add_argument("--torch_formats", nargs="+", default=["channels_last", "contiguous"],
                  choices=("channels_last", "contiguous"),
                  help="PyTorch memory formats to time (the faster counts)")
  ap.add_argument("--min_left_s", type=float, default=40.0,
                  help="a child starts a configuration only with this much of its budget left")
  ap.add_argument("--matmul_n", type=int, default=8192)
  ap.add_argument("--peak_bf16", type=float, default=989.4, help="dense bf16 TFLOP/s (datasheet)")
  ap.add_argument("--peak_tf32", type=float, default=494.7, help="dense TF32 TFLOP/s (datasheet)")
  ap.add_argument("--no_corruption", dest="corruption", action="store_false",
                  help="skip the corruption-pipeline timing")
  ap.add_argument("--profile", default="",
                  help="trace 3 steps of each genesis_jax configuration into this folder and "
                       "print the longest ops")
  ap.add_argument("--no_command_buffers", action="store_true",
                  help="genesis_jax child without XLA's CUDA-graph command buffers, so a "
                       "--profile attributes every fused kernel to its jax op (in a command "
                       "buffer the trace shows one event for many kernels); timings then "
                       "include per-kernel launch costs, so time and profile in separate runs")
  ap.add_argument("--out", default=None, help="append JSON records here")
  args = ap.parse_args()
  args.configs = [(d, b) for b in args.batches for d in args.dtypes]
  gflop_per_cube = (GFLOP_PER_CUBE * (args.width / 32) ** 2
                    * (args.cube[0] * args.cube[1] * args.cube[2]) / (64 * 64 * 32))
  if args.child == "jax":
    return jax_child(args)
  if args.child == "torch":
    return torch_child(args)

  records = []
  start = time.time()
  order = ("jax", "torch") if args.first == "jax" else ("torch", "jax")
  for child, share in zip(order, (args.first_share, 1.0)):
    left = args.budget_s - (time.time() - start)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child,
           "--child_budget_s", str(max(left * share, 1.0)), "--steps", str(args.steps),
           "--width", str(args.width), "--cube", *map(str, args.cube),
           "--conv_impl", *args.conv_impl,
           "--min_left_s", str(args.min_left_s), "--matmul_n", str(args.matmul_n),
           "--batches", *map(str, args.batches), "--dtypes", *args.dtypes,
           "--torch_formats", *args.torch_formats]
    if not args.corruption:
      cmd.append("--no_corruption")
    if args.profile and child == "jax":
      cmd += ["--profile", args.profile]
    if args.winograd_min_macs is not None and child == "jax":
      cmd += ["--winograd_min_macs", str(args.winograd_min_macs)]
    if args.out:
      cmd += ["--out", args.out]
    if args.no_command_buffers and child == "jax":
      cmd.append("--no_command_buffers")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      if line.startswith("RESULT "):
        records.append(json.loads(line[len("RESULT "):]))
      print(f"[{child}] {line}", end="", flush=True)
    proc.wait()
    if proc.returncode:
      print(f"[{child}] exited with {proc.returncode}", flush=True)
  summarize(records, args, gflop_per_cube)


if __name__ == "__main__":
  main()
