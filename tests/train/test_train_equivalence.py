"""Data parallelism and resume change nothing: same parameters as the plain run."""
from __future__ import annotations

import json

import numpy as np

from conftest import assert_close, final_params, run_cli, tiny_cli_args


_EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                               "--xla_cpu_experimental_ynn_fusion_type="}

# The tiny net's convs, as direct convs over the global batch of 8, range from 0.9e6 to 8.5e7
# multiply-adds; model.winograd_min_macs' default takes Winograd for none of them. At this
# threshold the largest (the decoder's first conv at x = 16, 8.5e7) takes Winograd F(4, 3), and
# the others the plain unfold conv in both orientations (the x-shifted input stack, and the
# decoder's first conv at x = 4, 2.1e7, with more input than output channels). So one pair of
# runs covers both formulations and Winograd's lax.cond under data parallelism, compiling only
# one Winograd conv (each costs XLA compile time on every device count); Winograd at other sizes
# and F(2, 3) are the same function with other constants (tests/models).
_MIXED_CONVS = "--config.model.winograd_min_macs=6e7"


def _losses(workdir):
  rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_eight_fake_devices_match_one_device(tmp_path, tiny_dataset):
  # Global batch 8 both times: 1 device x 8 (the tiny default), and 8 devices x 1.
  run_cli(tiny_cli_args(tmp_path / "one", tiny_dataset, 6, _MIXED_CONVS))
  proc = run_cli(tiny_cli_args(tmp_path / "eight", tiny_dataset, 6, "--config.train.batch_size=1",
                               _MIXED_CONVS), env_extra=_EIGHT_DEVICES)
  assert "mesh data=8" in proc.stdout
  recorded = json.loads((tmp_path / "one" / "config.json").read_text())
  assert recorded["model"]["winograd_min_macs"] == 6e7  # the knob is recorded with the run
  # Sharded reductions sum in another order, so the runs agree to float rounding, which training
  # then amplifies (max-pool ties and ReLU signs on these tiny cubes: ~1e-7 after 2 steps, up to
  # ~2e-4 in a BN running mean after 6). So: strict after 2 steps, losses to 1e-4 over all 6.
  assert_close(final_params(tmp_path / "one", step=2), final_params(tmp_path / "eight", step=2),
               atol=1e-5)
  one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  assert sorted(one) == sorted(eight) == [2, 4, 6]
  np.testing.assert_allclose([eight[k] for k in sorted(one)], [one[k] for k in sorted(one)],
                             rtol=1e-4)
  assert_close(final_params(tmp_path / "one"), final_params(tmp_path / "eight"), atol=1e-3)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_dataset, tiny_reference):
  run_cli(tiny_cli_args(tmp_path / "resumed", tiny_dataset, 4))
  proc = run_cli(tiny_cli_args(tmp_path / "resumed", tiny_dataset, 8))
  assert "resumed from" in proc.stdout
  assert_close(final_params(tiny_reference, step=8), final_params(tmp_path / "resumed"), atol=0)


def test_two_processes_on_localhost_match_one_process(tmp_path, tiny_dataset, tiny_reference):
  """jax.distributed with CPU collectives: 2 processes x 1 device x batch 4 == 1 x 1 x 8."""
  import os
  import socket
  import subprocess
  import sys
  from conftest import COMPILE_CACHE, REPO
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             GENESIS_COMPILATION_CACHE=str(COMPILE_CACHE))
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "two"
  proc = subprocess.run(
      ["bash", "launch/local.sh", "-n", "2", "--cpu-devices", "1", "--port", str(port), "--",
       *tiny_cli_args(workdir, tiny_dataset, 4, "--config.train.batch_size=4")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(p.read_text() for p in sorted((workdir / "launch_logs").glob("*.log")))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
  assert "processes=2" in logs and "step 4/4" in logs
  assert_close(final_params(tiny_reference, step=4), final_params(workdir), atol=1e-5)
