"""The GPU bench scripts still run (tiny sizes, CPU): a device session has minutes, not time to
debug a bench that rotted since the last one (session 6's first try found an import that the
device image lacked only because it had been run here first)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(args: list[str], env_extra: dict | None = None) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


def test_bench_model_gpu_jax_child_times_every_conv_impl_and_profiles(tmp_path):
  out = tmp_path / "gpu.jsonl"
  stdout = _run(["bench/bench_model_gpu.py", "--child", "jax", "--width", "2", "--cube", "16",
                 "16", "8", "--batches", "2", "--steps", "1", "--dtypes", "float32",
                 "--conv_impl", "native", "unfold:4", "--matmul_n", "64", "--child_budget_s",
                 "500", "--min_left_s", "1", "--profile", str(tmp_path / "prof"),
                 "--no_command_buffers", "--out", str(out),
                 # At this size only the decoder's first conv at x = 16 (5.3e6 multiply-adds)
                 # takes Winograd F(4, 3), the others the plain unfold conv: both formulations
                 # run, and the step compiles faster than with Winograd in every conv.
                 "--winograd_min_macs", "5e6"])
  assert "--xla_gpu_enable_command_buffer=" in stdout  # the flag reached the child's XLA_FLAGS
  records = [json.loads(line) for line in out.read_text().splitlines()]
  steps = {r["conv_impl"]: r for r in records if r["what"] == "train_step"}
  assert set(steps) == {"native", "unfold:4"}
  for r in steps.values():
    assert "error" not in r and r["images_per_s"] > 0 and r["profile_top_ms_per_step"]
  # Same network, same data and steps: the conv formulation changes only the rounding.
  assert abs(steps["native"]["loss"] - steps["unfold:4"]["loss"]) < 1e-4
  assert {r["dtype"] for r in records if r["what"] == "matmul"} == {"bfloat16", "float32"}


def test_bench_memory_reports_every_impl():
  stdout = _run(["bench/bench_memory.py", "--batch", "1", "--width", "2", "--cube", "16", "16",
                 "8", "--dtypes", "float32", "--impls", "native", "unfold"])
  rows = [line for line in stdout.splitlines() if line.startswith("| float32 |")]
  assert [r.split("|")[2].strip() for r in rows] == ["native", "unfold"]
  assert rows[0].split("|")[4].strip() == "1.00"
