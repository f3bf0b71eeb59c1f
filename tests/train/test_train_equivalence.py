"""Data parallelism and resume change nothing: same parameters as the plain run."""
from __future__ import annotations

import numpy as np

from conftest import TINY_OVERRIDES, run_cli


_EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                               "--xla_cpu_experimental_ynn_fusion_type="}


def _final_params(workdir, step=None):
  import os
  from genesis_jax.weights import transfer
  # A relative path on purpose: users pass relative workdirs (Orbax itself needs absolute ones).
  variables, _ = transfer.load_pretrained(os.path.relpath(workdir), which="latest", step=step)
  return variables


def _losses(workdir):
  import json
  rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _args(workdir, dataset, steps, *extra):
  return ["--config", "configs/demo.py", "--workdir", str(workdir), *TINY_OVERRIDES,
          "--config.data.source=prepared", f"--config.data.path={dataset}",
          f"--config.num_steps={steps}", "--config.log_every=2", "--config.eval_every=4",
          "--config.checkpoint_every=2", *extra]


def _assert_close(a, b, atol):
  import jax
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_eight_fake_devices_match_one_device(tmp_path, tiny_dataset):
  # Global batch 8 both times: 1 device x 8 (the tiny default), and 8 devices x 1.
  run_cli(_args(tmp_path / "one", tiny_dataset, 6))
  proc = run_cli(_args(tmp_path / "eight", tiny_dataset, 6, "--config.train.batch_size=1"),
                 env_extra=_EIGHT_DEVICES)
  assert "mesh data=8" in proc.stdout
  # Sharded reductions sum in another order, so the runs agree to float rounding, which training
  # then amplifies (max-pool ties and ReLU signs on these tiny cubes: ~1e-7 after 2 steps, up to
  # ~2e-4 in a BN running mean after 6). So: strict after 2 steps, losses to 1e-4 over all 6.
  _assert_close(_final_params(tmp_path / "one", step=2), _final_params(tmp_path / "eight", step=2),
                atol=1e-5)
  one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  assert sorted(one) == sorted(eight) == [2, 4, 6]
  np.testing.assert_allclose([eight[k] for k in sorted(one)], [one[k] for k in sorted(one)],
                             rtol=1e-4)
  _assert_close(_final_params(tmp_path / "one"), _final_params(tmp_path / "eight"), atol=1e-3)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_dataset):
  run_cli(_args(tmp_path / "straight", tiny_dataset, 8))
  run_cli(_args(tmp_path / "resumed", tiny_dataset, 4))
  proc = run_cli(_args(tmp_path / "resumed", tiny_dataset, 8))
  assert "resumed from" in proc.stdout
  _assert_close(_final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed"), atol=0)


def test_two_processes_on_localhost_match_one_process(tmp_path, tiny_dataset):
  """jax.distributed with CPU collectives: 2 processes x 1 device x batch 4 == 1 x 1 x 8."""
  import os
  import socket
  import subprocess
  import sys
  from conftest import COMPILE_CACHE, REPO
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run_cli(_args(tmp_path / "one", tiny_dataset, 4))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             GENESIS_COMPILATION_CACHE=str(COMPILE_CACHE))
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "two"
  proc = subprocess.run(
      ["bash", "launch/local.sh", "-n", "2", "--cpu-devices", "1", "--port", str(port), "--",
       *_args(workdir, tiny_dataset, 4, "--config.train.batch_size=4")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(p.read_text() for p in sorted((workdir / "launch_logs").glob("*.log")))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
  assert "processes=2" in logs and "step 4/4" in logs
  _assert_close(_final_params(tmp_path / "one"), _final_params(workdir), atol=1e-5)


def test_eight_fake_devices_match_one_device_with_winograd_convs(tmp_path, tiny_dataset):
  # The tiny nets of these tests are below the default model.winograd_min_macs; force the
  # Winograd convs (F(4, 3) at x = 16, 8, 4; F(2, 3) at x = 2) and their lax.cond under data
  # parallelism.
  winograd = "--config.model.winograd_min_macs=0"
  run_cli(_args(tmp_path / "one", tiny_dataset, 2, winograd))
  proc = run_cli(_args(tmp_path / "eight", tiny_dataset, 2, "--config.train.batch_size=1",
                       winograd), env_extra=_EIGHT_DEVICES)
  assert "mesh data=8" in proc.stdout
  import json
  recorded = json.loads((tmp_path / "one" / "config.json").read_text())
  assert recorded["model"]["winograd_min_macs"] == 0  # the knob is recorded with the run
  _assert_close(_final_params(tmp_path / "one"), _final_params(tmp_path / "eight"), atol=1e-5)
