"""Pre-emption (SIGTERM/SIGINT), damaged checkpoints and a full disk: no work lost, one message."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (COMPILE_CACHE, REPO, TINY_OVERRIDES, assert_close, final_params, run_cli,
                      tiny_pretrain_config, tiny_task_config)
# Imported here, not first inside a test using capsys: metric_writers.Progress binds
# sys.stdout as a default argument when the module is imported.
from genesis_jax.train import metric_writers  # noqa: F401


def _cli_args(workdir, dataset, steps, *extra):
  """Logs every step; checkpoints only at the end, so a checkpoint elsewhere is the stop's."""
  return ["--config", "configs/demo.py", "--workdir", str(workdir), *TINY_OVERRIDES,
          "--config.data.source=prepared", f"--config.data.path={dataset}",
          f"--config.num_steps={steps}", "--config.log_every=1", f"--config.eval_every={steps}",
          f"--config.checkpoint_every={steps}", *extra]


def _steps(workdir) -> list[int]:
  latest = pathlib.Path(workdir) / "checkpoints" / "latest"
  return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())


def _signal_after(args, after_lines: int, sig=signal.SIGTERM, timeout: float = 300):
  """Runs the CLI and sends `sig` once `after_lines` step lines were printed; (rc, output)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", GENESIS_COMPILATION_CACHE=str(COMPILE_CACHE))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-u", "-m", "genesis_jax.main", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines, seen = [], 0
  deadline = time.time() + timeout
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step "):
        seen += 1
        if seen == after_lines:
          proc.send_signal(sig)
      if time.time() > deadline:
        break
    proc.wait(timeout=60)
  finally:
    proc.kill()
    proc.wait()
  return proc.returncode, "".join(lines)


def test_sigterm_saves_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(tmp_path,
                                                                              tiny_dataset,
                                                                              tiny_reference):
  steps = 8
  workdir = tmp_path / "stopped"
  rc, out = _signal_after(_cli_args(workdir, tiny_dataset, steps), after_lines=3)
  assert rc == 143, out[-3000:]
  assert "SIGTERM received: finishing this step" in out
  stop_lines = [line for line in out.splitlines() if line.startswith("stopped at step")]
  assert len(stop_lines) == 1 and "by SIGTERM, checkpoint saved" in stop_lines[0], out[-3000:]
  assert "rerun the same command to resume" in stop_lines[0] and "Traceback" not in out
  stopped_at = int(stop_lines[0].split()[3])
  assert 3 <= stopped_at < steps and _steps(workdir) == [stopped_at]
  proc = run_cli(_cli_args(workdir, tiny_dataset, steps))
  assert f"resumed from {workdir / 'checkpoints' / 'latest' / str(stopped_at)}" in proc.stdout
  assert_close(final_params(tiny_reference, step=steps), final_params(workdir), atol=0)


def test_a_second_signal_exits_at_once_and_handlers_are_restored():
  from genesis_jax.train import preemption
  script = (
      "import os, signal, sys, time\n"
      "from genesis_jax.train import preemption\n"
      "with preemption.StopSignals() as stop:\n"
      "  os.kill(os.getpid(), signal.SIGTERM)\n"
      "  time.sleep(0.2)\n"
      "  print('requested', stop.requested(1), flush=True)\n"
      "  os.kill(os.getpid(), signal.SIGTERM)\n"
      "  time.sleep(30)\n"
      "print('survived', flush=True)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  started = time.time()
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
  assert f"requested {int(signal.SIGTERM)}" in proc.stdout and "survived" not in proc.stdout
  assert "send SIGTERM again to exit at once" in proc.stderr
  assert time.time() - started < 25
  # In-process: the previous handlers come back, and an ignored signal stays ignored.
  before = signal.getsignal(signal.SIGTERM)
  old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with preemption.StopSignals():
      assert signal.getsignal(signal.SIGTERM) != before
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == before
  finally:
    signal.signal(signal.SIGINT, old_int)
  assert preemption.exit_code(signal.SIGTERM) == 143 and preemption.exit_code(signal.SIGINT) == 130


def test_sigterm_during_an_async_save_and_a_damaged_latest_checkpoint(tmp_path, tiny_dataset,
                                                                     monkeypatch, capsys):
  """In-process: SIGTERM while the step-2 save is in flight stops at step 3 with both saved;
  the rerun matches an uninterrupted run. Then latest/6 of that run loses its largest file: the
  rerun names it, moves it to checkpoints/damaged/ and trains again from step 4 to the same
  parameters; with every step damaged, one CheckpointError names them and nothing moves."""
  from genesis_jax import errors
  from genesis_jax.train import checkpoints as ckpt_lib
  from genesis_jax.train import preemption, pretrain
  config = tiny_pretrain_config(tiny_dataset, 6)
  config.eval_every = 6
  pretrain.train(config, tmp_path / "straight")

  real_save = ckpt_lib.RunCheckpoints.save
  calls, in_flight = [], []

  def save_then_sigterm(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    calls.append(step)
    if len(calls) == 1:
      # The async save has just started in Orbax's threads: the signal lands while it runs
      # (a very fast save may finish first; the outcome checked below is the same either way).
      in_flight.append(self.latest.is_saving_in_progress())
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "save", save_then_sigterm)
  workdir = tmp_path / "stopped"
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Preempted) as e:
    pretrain.train(config, workdir)
  assert e.value.code == 143 and e.value.step == 3 and calls == [2, 3]
  assert signal.getsignal(signal.SIGTERM) == handler  # Restored after training.
  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "save", real_save)
  assert "stopped at step 3 by SIGTERM, checkpoint saved" in capsys.readouterr().out
  assert _steps(workdir) == [2, 3]
  pretrain.train(config, workdir)
  assert "resumed from" in capsys.readouterr().out
  assert_close(final_params(tmp_path / "straight"), final_params(workdir), atol=0)

  # A damaged latest step: skipped (named, moved aside, never deleted) for the newest intact one.
  damaged = tmp_path / "damaged"
  shutil.copytree(tmp_path / "straight", damaged)
  assert _steps(damaged) == [2, 4, 6]
  files = [p for p in (damaged / "checkpoints" / "latest" / "6" / "state").rglob("*")
           if p.is_file()]
  max(files, key=lambda p: p.stat().st_size).unlink()
  summary = pretrain.train(config, damaged)
  out = capsys.readouterr().out
  step6 = damaged / "checkpoints" / "latest" / "6"
  assert f"warning: checkpoint {step6} is damaged (" in out
  assert f"moved it to {damaged / 'checkpoints' / 'damaged' / 'latest-6'}" in out
  assert "resumed from step 4" in out and summary["final_step"] == 6
  assert (damaged / "checkpoints" / "damaged" / "latest-6" / "state").is_dir()
  assert _steps(damaged) == [2, 4, 6]  # Step 6 written again, and the rotation still works.
  assert_close(final_params(tmp_path / "straight"), final_params(damaged), atol=0)

  # Every step damaged: one error naming each, nothing moved.
  for step in (2, 4, 6):
    for p in (damaged / "checkpoints" / "latest" / str(step) / "state").rglob("*"):
      if p.is_file() and p.parent.name == "d":
        p.write_bytes(b"")
  with pytest.raises(errors.CheckpointError) as e:
    pretrain.train(config, damaged)
  msg = str(e.value)
  assert "no checkpoint under" in msg and "Nothing was moved or deleted" in msg
  assert all(str(damaged / "checkpoints" / "latest" / str(s)) in msg for s in (2, 4, 6))
  assert _steps(damaged) == [2, 4, 6]


def test_finetuning_stops_on_sigterm_and_the_rerun_finishes_it(tmp_path, monkeypatch, capsys):
  """Fine-tuning goes through the same loop: SIGTERM after step 2 saves step 2 and raises
  Preempted (no test evaluation, no summary); the rerun resumes and finishes with test metrics."""
  from genesis_jax.data import phantoms
  from genesis_jax.train import checkpoints as ckpt_lib
  from genesis_jax.train import finetune, preemption
  root = phantoms.write_phantom_dataset(tmp_path / "p", 7, seed=1, shape=(64, 64, 48))
  config = tiny_task_config("classify", root)
  real_check = ckpt_lib.RunCheckpoints.check
  calls = []

  def check_then_sigterm(self):
    calls.append(1)
    if len(calls) == 2:  # After the second step.
      os.kill(os.getpid(), signal.SIGTERM)
    real_check(self)

  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "check", check_then_sigterm)
  workdir = tmp_path / "ft"
  with pytest.raises(preemption.Preempted) as e:
    finetune.train(config, workdir)
  assert e.value.code == 143 and e.value.step == 2 and _steps(workdir) == [2]
  assert not (workdir / "summary.json").exists()
  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "check", real_check)
  summary = finetune.train(config, workdir)
  assert summary["final_step"] == 6 and "auc" in summary["test"]
  assert f"resumed from {workdir / 'checkpoints' / 'latest' / '2'}" in capsys.readouterr().out


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 3 MiB tmpfs at run/checkpoints (one tiny checkpoint fits, two do not); skipped where mount
  is refused. The metric files stay outside it: this test is about the checkpoints."""
  mount = tmp_path / "run" / "checkpoints"
  mount.mkdir(parents=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_is_one_checkpoint_error_and_the_previous_checkpoint_resumes(small_tmpfs,
                                                                              tiny_dataset):
  workdir = small_tmpfs.parent
  args = _cli_args(workdir, tiny_dataset, 12, "--config.checkpoint_every=4")
  proc = run_cli(args, check=False)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
  assert err[0].startswith("error: saving the checkpoint of step 8 to "
                           f"{workdir / 'checkpoints' / 'latest' / '8'} failed: no space left")
  assert f"(latest: {workdir / 'checkpoints' / 'latest' / '4'})" in err[0]
  # It stopped soon after the failed save, not at the next save (step 12).
  assert "step 12/12" not in proc.stdout and _steps(workdir) == [4]
  subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
  proc = run_cli(args)
  assert f"resumed from {workdir / 'checkpoints' / 'latest' / '4'}" in proc.stdout
  assert "done: step 12" in proc.stdout and _steps(workdir)[-1] == 12


AGREE_SCRIPT = """
import os, signal, sys, time
from genesis_jax.train import distributed
distributed.initialize()
import jax
from genesis_jax.train import preemption, sharding
stop = preemption.StopSignals(sharding.make_mesh())
with stop:
  for step in range(1, 200):
    time.sleep(0.01 * (1 + jax.process_index()))  # the processes run at different speeds
    if jax.process_index() == 1 and step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    agreed = stop.requested(step)
    if agreed:
      break
print(f"process {jax.process_index()}: stop after step {step} by {agreed}, final {stop.final()}",
      flush=True)
"""


def test_two_processes_stop_after_the_same_step_when_one_gets_sigterm():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", GENESIS_COORDINATOR=f"127.0.0.1:{port}",
               GENESIS_NUM_PROCESSES="2", GENESIS_PROCESS_ID=str(i))
    env.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen([sys.executable, "-c", AGREE_SCRIPT], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=180)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  from genesis_jax.train import preemption
  # Signalled after step 5: it enters the all-reduce dispatched at step 8, read at step 16.
  step = 2 * preemption.AGREE_EVERY
  for i, out in enumerate(outs):
    assert f"process {i}: stop after step {step} by 15, final 15" in out, outs
  assert "SIGTERM received" in outs[1] and "SIGTERM received" not in outs[0]


FAKE_TASK = """#!/usr/bin/env python3
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
print("task started", flush=True)
deadline = time.time() + 30
while not got and time.time() < deadline:
  time.sleep(0.05)
time.sleep(0.5)  # saving a checkpoint
print(f"task got {got}", flush=True)
sys.exit(143 if got else 0)
"""


def test_slurm_script_forwards_one_sigterm_and_requeues(tmp_path):
  """launch/slurm.sbatch with a stand-in srun (one task) and scontrol: two SIGTERMs to the batch
  shell reach the task once; it exits 143 and the job is requeued."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_TASK)
  (bin_dir / "scontrol").write_text("#!/bin/sh\necho \"scontrol $*\"\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77")
  proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "configs/demo.py", str(tmp_path / "w")],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  assert proc.stdout.readline().startswith("+ mkdir")
  assert proc.stdout.readline().startswith("+ srun")
  assert proc.stdout.readline().strip() == "task started"
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 143, out
  assert "task got [15]" in out and "requeueing job 77" in out and "scontrol requeue 77" in out


def test_read_only_checkpoint_directory_is_one_checkpoint_error_at_once(tmp_path):
  """Orbax itself would wait 300 s for a step directory it cannot create."""
  import jax.numpy as jnp
  from genesis_jax import errors
  from genesis_jax.data import pipeline
  from genesis_jax.train import checkpoints as ckpt_lib
  mount = tmp_path / "ro"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
  try:
    images = np.zeros((10, 4, 4, 1), np.float32)
    it = iter(pipeline.task_loader(images, np.zeros((10,), np.int32), batch_size=2, seed=0))
    next(it)
    ckpts = ckpt_lib.RunCheckpoints(mount / "run")
    ckpts.save(1, {"w": jnp.ones((100,))}, it, {"step": 1})
    ckpts.wait()
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    started = time.time()
    with pytest.raises(errors.CheckpointError) as e:
      ckpts.save(2, {"w": jnp.ones((100,))}, it, {"step": 2})
    assert time.time() - started < 10
    assert "step 2" in str(e.value) and "failed: read-only file system" in str(e.value)
    assert str(mount / "run" / "checkpoints" / "latest" / "1") in str(e.value)
    ckpts.close(quiet=True)
  finally:
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
