"""Kill anywhere and resume; non-finite steps; unwritable workdirs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (COMPILE_CACHE, REPO, assert_close, final_params, run_cli, tiny_cli_args,
                      tiny_pretrain_config)


def _run_and_kill(args, kill_after_lines: int, timeout: float = 300) -> int:
  """Starts the CLI and SIGKILLs it once `kill_after_lines` progress lines have been printed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", GENESIS_COMPILATION_CACHE=str(COMPILE_CACHE))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-u", "-m", "genesis_jax.main", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = 0
  deadline = time.time() + timeout
  try:
    for line in proc.stdout:
      if line.startswith("step "):
        seen += 1
        if seen >= kill_after_lines:
          proc.send_signal(signal.SIGKILL)
          break
      if time.time() > deadline:
        break
  finally:
    proc.kill()
    proc.wait()
  return seen


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, tiny_dataset,
                                                                     tiny_reference):
  steps = 12  # The three kills below land by step 11 at the latest.
  extra = ("--config.log_every=1", "--config.checkpoint_every=1")
  rng = np.random.default_rng(0)
  workdir = tmp_path / "killed"
  kills = 0
  for _ in range(3):
    at = int(rng.integers(1, 5))
    seen = _run_and_kill(tiny_cli_args(workdir, tiny_dataset, steps, *extra), at)
    if seen >= at:
      kills += 1
    # Whatever the moment of the kill, the latest complete checkpoint loads.
    latest = workdir / "checkpoints" / "latest"
    if latest.exists() and any(p.name.isdigit() for p in latest.iterdir()):
      variables = final_params(workdir)
      assert all(np.isfinite(np.asarray(x)).all() for x in
                 __import__("jax").tree.leaves(variables))
  assert kills >= 2
  proc = run_cli(tiny_cli_args(workdir, tiny_dataset, steps, *extra))
  assert "resumed from" in proc.stdout
  assert_close(final_params(tiny_reference, step=steps), final_params(workdir), atol=0)


class _PoisonedIterator:
  """Wraps a grain iterator; batch number `at` (1-based) gets a NaN voxel."""

  def __init__(self, it, at: int):
    self._it, self._at, self._n = it, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    if self._n == self._at:
      batch = dict(batch)
      img = np.array(batch["image"])
      img[0, 0, 0, 0, 0] = np.nan
      batch["image"] = img
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


class _PoisonedLoader:
  def __init__(self, loader, at):
    self._loader, self._at = loader, at

  def __iter__(self):
    return _PoisonedIterator(iter(self._loader), self._at)


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_nan_in_batch(tmp_path, tiny_dataset, monkeypatch, nonfinite):
  import jax
  from genesis_jax.data import pipeline
  from genesis_jax import errors
  from genesis_jax.train import pretrain
  from genesis_jax.weights import transfer
  real = pipeline.pretrain_loader
  monkeypatch.setattr(pipeline, "pretrain_loader",
                      lambda *a, **k: _PoisonedLoader(real(*a, **k), at=5))
  config = tiny_pretrain_config(tiny_dataset, 8, nonfinite=nonfinite)
  workdir = tmp_path / nonfinite
  if nonfinite == "stop":
    with pytest.raises(errors.NonFiniteError) as e:
      pretrain.train(config, workdir)
    msg = str(e.value)
    assert "step 5" in msg and str(workdir / "checkpoints" / "latest" / "4") in msg
    steps = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir()
                   if p.name.isdigit())
    assert steps == [2, 4]
  else:
    summary = pretrain.train(config, workdir)
    assert summary["final_step"] == 8
  variables, _ = transfer.load_pretrained(str(workdir), which="latest")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_out_of_device_memory_names_the_settings_and_keeps_checkpoints(tmp_path, tiny_dataset,
                                                                       monkeypatch):
  from genesis_jax import errors
  from genesis_jax.train import pretrain
  from genesis_jax.train import step as step_lib
  real_jit = step_lib.jit_train_step

  def jit_then_oom_at_step_5(step_fn, state, mesh):
    step = real_jit(step_fn, state, mesh)
    calls = iter(range(1, 10 ** 6))

    def maybe_oom(state, batch):
      if next(calls) == 5:  # what XLA raises when a step's buffers do not fit
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "21474836480 bytes.\nBufferAssignment OOM Debugging.")
      return step(state, batch)
    return maybe_oom

  monkeypatch.setattr(step_lib, "jit_train_step", jit_then_oom_at_step_5)
  config = tiny_pretrain_config(tiny_dataset, 8)
  with pytest.raises(errors.DeviceMemoryError) as e:
    pretrain.train(config, tmp_path / "run")
  msg = str(e.value)
  assert "train step ran out of device memory (RESOURCE_EXHAUSTED: Out of memory" in msg
  assert "config.train.batch_size (now 8 per device)" in msg
  assert "config.model.dtype='bfloat16'" in msg and "config.model.conv_impl='native'" in msg
  assert isinstance(e.value.__cause__, RuntimeError)
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints" / "latest").iterdir()
                 if p.name.isdigit())
  assert steps == [2, 4]
  # Any other error passes through unchanged.
  assert step_lib.out_of_memory_hint(ValueError("shapes differ"), config) is None


def test_workdir_that_is_a_file_fails_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = run_cli(["--config", "configs/demo.py", "--workdir", str(blocker / "run")], check=False)
  assert proc.returncode != 0
  assert "not writable" in proc.stderr and str(blocker) in proc.stderr
  assert blocker.read_text() == "not a directory"


def test_resume_with_a_different_data_order_names_the_checkpoint(tmp_path):
  import jax.numpy as jnp
  from genesis_jax.data import pipeline
  from genesis_jax import errors
  from genesis_jax.train import checkpoints as ckpt_lib
  images = np.zeros((10, 4, 4, 1), np.float32)
  labels = np.zeros((10,), np.int32)
  it = iter(pipeline.task_loader(images, labels, batch_size=2, seed=0))
  next(it)
  state = {"w": jnp.ones((3,))}
  ckpts = ckpt_lib.RunCheckpoints(tmp_path, async_save=False)
  ckpts.save(1, state, it, {"step": 1})
  ckpts.close()
  # Same data, another sampler seed: the iterator state cannot apply.
  other = iter(pipeline.task_loader(images, labels, batch_size=2, seed=1))
  ckpts = ckpt_lib.RunCheckpoints(tmp_path, async_save=False)
  with pytest.raises(errors.CheckpointError) as e:
    ckpts.restore(state, other)
  ckpts.close()
  msg = str(e.value)
  assert str(tmp_path / "checkpoints" / "latest" / "1") in msg and "sampler differs" in msg
  assert "finetune.init" in msg
  # Nothing was lost: with the original order it restores.
  same = iter(pipeline.task_loader(images, labels, batch_size=2, seed=0))
  ckpts = ckpt_lib.RunCheckpoints(tmp_path, async_save=False)
  restored, meta = ckpts.restore(state, same)
  ckpts.close()
  assert meta == {"step": 1} and np.array_equal(restored["w"], np.ones(3))
