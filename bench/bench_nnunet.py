"""Train-step throughput of an nnU-Net plans' network: genesis_jax (Flax) vs PyTorch
(dynamic_network_architectures, the classes nnU-Net builds), side by side (issue 20).

  PYTHONPATH=. python bench/bench_nnunet.py --threads 2                     # CPU, phantom plans
  PYTHONPATH=. python bench/bench_nnunet.py --plans nnUNetPlans.json --configuration 3d_fullres \
      --device gpu --batch 2 --steps 20 --dtype bfloat16 [--torch_compile]   # GPU
  PYTHONPATH=. python bench/bench_nnunet.py --example fullres128 --device gpu  # a typical plan

One step = forward + backward + SGD (nnU-Net's: lr 1e-2, momentum 0.99, Nesterov) of the
restoration loss (sigmoid + MSE against the clean patch) with the plans' patch size, a 1-channel
head on the full-resolution stage and no deep supervision, as model.kind='nnunet' pre-training
runs it (the corruptions are not part of the step timed here). Both frameworks start from the same
weights (ours, exported with weights/nnunet.py and loaded with strict=True) and the same batch,
so their first losses agree (printed). Each framework runs in a fresh process of its own (warm-up,
then --steps steps), alternating jax, torch, ... for --rounds rounds so that slow drifts of a
shared machine hit both alike; --threads pins both to the same CPU cores (torch.set_num_threads
and the process's CPU affinity). Prints seconds per step (median over all steps), patches/s and
the ratio torch_time / jax_time (> 1: genesis_jax is faster). torch and
dynamic_network_architectures are bench-only dependencies (`pip install
dynamic-network-architectures`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
DEFAULT_PLANS = os.path.join(REPO, "configs", "nnunet_plans_phantom.json")


def example_plans(name: str, path: str) -> str:
  """Writes a typical nnU-Net v2 3d_fullres plans file (for a GPU run without a dataset at hand):
  fullres128, PlainConvUNet as nnU-Net plans CT organs (6 stages, 32..320 features, patch
  128^3); resenc128, the same with the ResidualEncoderUNet of the ResEnc M preset."""
  n, feats = 6, [32, 64, 128, 256, 320, 320]
  arch = {"n_stages": n, "features_per_stage": feats, "conv_op": "torch.nn.modules.conv.Conv3d",
          "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
          "n_conv_per_stage_decoder": [1] * (n - 1) if name == "resenc128" else [2] * (n - 1),
          "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
          "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
  if name == "resenc128":
    cls = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6]
  else:
    cls = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["n_conv_per_stage"] = [2] * n
  plans = {"dataset_name": f"Dataset000_{name}", "plans_name": "nnUNetPlans",
           "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
           "configurations": {"3d_fullres": {
               "patch_size": [128, 128, 128], "spacing": [1.0, 0.8, 0.8], "batch_size": 2,
               "architecture": {"network_class_name": cls, "arch_kwargs": arch,
                                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                        "nonlin"]}}},
           "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}}}
  with open(path, "w") as f:
    json.dump(plans, f)
  return path


def pin(threads: int) -> None:
  """Both frameworks on the same `threads` cores (0 = all)."""
  if threads and hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)


def batch_and_weights(args):
  """(plan, x in our layout (N, *patch, C) in [0, 1], our initial params), the same in both
  children: seed 0."""
  import jax
  from genesis_jax.config import nnunet_plans
  from genesis_jax.models import nnunet
  plan = nnunet_plans.load_plans(args.plans, args.configuration)
  x = np.random.default_rng(0).uniform(
      0, 1, (args.batch, *plan.patch_size, plan.n_input_channels)).astype(np.float32)
  model = nnunet.build(plan, num_classes=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
  return plan, x, jax.device_get(params)


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from genesis_jax.models import nnunet
  plan, x, params = batch_and_weights(args)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = nnunet.build(plan, num_classes=1, dtype=dtype, conv_impl=args.conv_impl)
  tx = optax.sgd(1e-2, momentum=0.99, nesterov=True)

  def step(params, opt_state, x):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True)
      return jnp.mean(jnp.square(jax.nn.sigmoid(logits.astype(jnp.float32)) - x))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jstep = jax.jit(step, donate_argnums=(0, 1))
  params = jax.device_put(params)
  opt_state = tx.init(params)
  xd = jax.device_put(x)
  times, first = [], None
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    params, opt_state, loss = jstep(params, opt_state, xd)
    loss = float(loss)  # Waits for the step.
    if i == 0:
      first = loss
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  return {"framework": "jax", "times": times, "first_loss": first,
          "version": jax.__version__, "device": str(jax.devices()[0].platform)}


def torch_network(plan):
  """The plans' network as nnU-Net builds it (pydoc.locate of the class and of the kwargs named
  in `_kw_requires_import`), 1 output class, no deep supervision."""
  import pydoc
  from genesis_jax.config import nnunet_plans
  entry = plan.raw.get("architecture") or nnunet_plans.legacy_architecture(plan.raw, plan.path)
  kwargs = dict(entry["arch_kwargs"])
  for k in entry.get("_kw_requires_import", ("conv_op", "norm_op", "dropout_op", "nonlin")):
    if kwargs.get(k) is not None:
      kwargs[k] = pydoc.locate(kwargs[k])
  cls = pydoc.locate(entry["network_class_name"])
  return cls(input_channels=plan.n_input_channels, num_classes=1, deep_supervision=False,
             **kwargs)


def run_torch(args) -> dict:
  import torch
  from genesis_jax.weights import nnunet as nnunet_weights
  plan, x, params = batch_and_weights(args)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = "cuda" if args.device == "gpu" else "cpu"
  net = torch_network(plan)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        nnunet_weights.export_state_dict(params, plan).items()}
  net.load_state_dict(sd, strict=True)
  net = net.to(device)
  nd = len(plan.patch_size)
  perm = (0, nd + 1) + tuple(1 + plan.axes.index(i) for i in range(nd))  # ours -> (N, C, plans)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(perm))).to(device)
  if args.torch_format == "channels_last" and nd == 3:
    net = net.to(memory_format=torch.channels_last_3d)
    xt = xt.contiguous(memory_format=torch.channels_last_3d)
  opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
  model = torch.compile(net) if args.torch_compile else net
  if device == "cuda":
    torch.backends.cudnn.benchmark = True

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      logits = model(xt)
    loss = torch.mean((torch.sigmoid(logits.float()) - xt) ** 2)
    loss.backward()
    opt.step()
    return loss

  times, first = [], None
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    loss = float(step())  # Waits for the step.
    if i == 0:
      first = loss
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  return {"framework": "torch", "times": times, "first_loss": first, "version": torch.__version__,
          "device": device}


def child_args(args, framework: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), "--child", framework, "--plans", args.plans,
          "--configuration", args.configuration, "--batch", str(args.batch), "--steps",
          str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
          "--device", args.device, "--dtype", args.dtype, "--torch_format", args.torch_format,
          "--conv_impl", args.conv_impl] + (
              ["--torch_compile"] if args.torch_compile else [])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--plans", default=DEFAULT_PLANS)
  ap.add_argument("--configuration", default="3d_fullres")
  ap.add_argument("--example", default="", choices=("", "fullres128", "resenc128"),
                  help="bench a typical plans file instead of --plans (see example_plans)")
  ap.add_argument("--batch", type=int, default=2, help="patches per step (nnU-Net's default: 2)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per round and framework")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
  ap.add_argument("--rounds", type=int, default=2, help="jax/torch process pairs")
  ap.add_argument("--threads", type=int, default=0, help="CPU cores for both (0 = all)")
  ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                  help="gpu: jax on its GPU backend, torch on cuda")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype (torch: autocast); parameters stay float32")
  ap.add_argument("--conv_impl", default="auto", help="genesis_jax's 3D convs (model.conv_impl: "
                  "auto, native, unfold, ...)")
  ap.add_argument("--torch_format", default="contiguous", choices=("contiguous", "channels_last"))
  ap.add_argument("--torch_compile", action="store_true", help="torch.compile the network "
                  "(nnU-Net does on GPU)")
  ap.add_argument("--out", default="", help="append the summary as a JSON line to this file")
  ap.add_argument("--child", default="", choices=("", "jax", "torch"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    pin(args.threads)
    print(json.dumps((run_jax if args.child == "jax" else run_torch)(args)))
    return
  if args.example:
    args.plans = example_plans(args.example, os.path.join(tempfile.mkdtemp(),
                                                          f"{args.example}.json"))
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if args.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # The CLI's default.
  results: dict[str, list] = {"jax": [], "torch": []}
  for r in range(args.rounds):
    for fw in ("jax", "torch"):
      # The torch child uses jax only to make the shared weights: keep it off the GPU.
      child_env = dict(env, JAX_PLATFORMS="cpu") if fw == "torch" else env
      proc = subprocess.run(child_args(args, fw), env=child_env, capture_output=True, text=True)
      if proc.returncode != 0:
        sys.exit(f"{fw} child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
      rec = json.loads(proc.stdout.strip().splitlines()[-1])
      results[fw].append(rec)
      print(f"round {r} {fw}: {statistics.median(rec['times']):.3f} s/step "
            f"(first loss {rec['first_loss']:.6f})", flush=True)
  from genesis_jax.config import nnunet_plans
  plan = nnunet_plans.load_plans(args.plans, args.configuration)
  med = {fw: statistics.median([t for rec in recs for t in rec["times"]])
         for fw, recs in results.items()}
  summary = {
      "plans": os.path.abspath(args.plans), "configuration": args.configuration,
      "network": plan.network, "patch_size_xyz": list(plan.patch_size), "batch": args.batch,
      "threads": args.threads or os.cpu_count(), "device": args.device, "dtype": args.dtype,
      "torch_format": args.torch_format, "torch_compile": args.torch_compile,
      "conv_impl": args.conv_impl,
      "jax_s_per_step": med["jax"], "torch_s_per_step": med["torch"],
      "jax_patches_per_s": args.batch / med["jax"],
      "torch_patches_per_s": args.batch / med["torch"],
      "ratio_torch_over_jax": med["torch"] / med["jax"],
      "first_loss": {fw: recs[0]["first_loss"] for fw, recs in results.items()},
      "versions": {fw: recs[0]["version"] for fw, recs in results.items()},
      "backend": {fw: recs[0]["device"] for fw, recs in results.items()},
  }
  print(f"{plan.network} {args.configuration} patch {tuple(plan.patch_size)} (x, y, z) batch "
        f"{args.batch} | {args.device} {args.dtype} | threads {summary['threads']}")
  print(f"genesis_jax (jax {summary['versions']['jax']}, conv_impl {args.conv_impl}): "
        f"{med['jax']:.3f} s/step, "
        f"{summary['jax_patches_per_s']:.2f} patches/s")
  print(f"PyTorch ({summary['versions']['torch']}, {args.torch_format}"
        f"{', compiled' if args.torch_compile else ''}): {med['torch']:.3f} s/step, "
        f"{summary['torch_patches_per_s']:.2f} patches/s")
  print(f"ratio torch/jax: {summary['ratio_torch_over_jax']:.2f} (> 1: genesis_jax faster) | "
        f"first loss jax {summary['first_loss']['jax']:.6f} torch "
        f"{summary['first_loss']['torch']:.6f}")
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
  main()
