"""Pre-training throughput: steps/s and cubes/s of a config's real train loop (issue 5).

  python bench/bench_train.py --config configs/demo.py --steps 60
  python bench/bench_train.py --config configs/pretrain_genesis.py --steps 6 --batch 2

Runs `genesis_jax.train.pretrain.train` in a temporary workdir (built-in phantom data, corruption
on device) and reports the throughput logged after the first log interval, so compilation is
excluded. Also prints the loader's cubes/s on the same prepared data for comparison: the input
pipeline must deliver well above what the step consumes.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--batch", type=int, default=0, help="per-device batch (0 = config's)")
  args = ap.parse_args()
  import jax
  from genesis_jax.data import pipeline
  from genesis_jax.train import pretrain
  config = runpy.run_path(args.config)["get_config"]()
  config.num_steps = args.steps
  config.log_every = max(1, args.steps // 3)
  config.eval_every = config.checkpoint_every = args.steps
  config.eval_batches = 1
  config.samples_every_eval = False
  if args.batch:
    config.train.batch_size = args.batch
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    pretrain.train(config, tmp)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "steps_per_s" in r][1:]  # Drop the interval holding the compile.
    steps_s = sum(r["steps_per_s"] for r in train) / max(len(train), 1)
    cubes_s = sum(r["cubes_per_s"] for r in train) / max(len(train), 1)
    src = pipeline.CubeSource(pathlib.Path(tmp) / "data", "train")
    batch = config.train.batch_size * jax.device_count()
    it = iter(pipeline.pretrain_loader(src, batch_size=batch, seed=0))
    next(it)
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < 2.0:
      next(it)
      n += batch
    loader_cubes_s = n / (time.perf_counter() - t)
  print(f"config {args.config} | width {config.model.width} | crop {tuple(config.data.crop)} | "
        f"global batch {batch} | devices {jax.device_count()} ({jax.devices()[0].platform})")
  print(f"train step: {steps_s:.3g} steps/s, {cubes_s:.3g} cubes/s (after compile; wall {wall:.0f} s "
        f"for {args.steps} steps incl. data prep and compile)")
  print(f"loader alone: {loader_cubes_s:.4g} cubes/s = {loader_cubes_s / max(cubes_s, 1e-9):.1f}x "
        "what the step consumes")


if __name__ == "__main__":
  sys.exit(main())
