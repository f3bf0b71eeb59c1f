"""One process per workdir (the lock), and what a resume may change (the resume policy)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import run_cli, tiny_pretrain_config


def write_lock(workdir, pid, host=None, age_s=0.0):
  path = workdir / "run.lock"
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                              "started": "2026-01-01T00:00:00+00:00"}))
  if age_s:
    t = time.time() - age_s
    os.utime(path, (t, t))
  return path


def snapshot(workdir):
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file()}


# ------------------------------------------------------------------------------------ lock
def test_live_holder_refuses_a_second_run_naming_pid_and_host(tmp_path):
  from genesis_jax import errors
  from genesis_jax.config import schema
  from genesis_jax.train import loop
  from genesis_jax.train import workdir as workdir_lib
  holder = subprocess.Popen(["sleep", "60"])  # A live process that is not this one.
  try:
    lock = write_lock(tmp_path, holder.pid)
    before = lock.read_bytes()
    with pytest.raises(workdir_lib.WorkdirBusyError) as e:
      workdir_lib.acquire(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, errors.GenesisError) and "\n" not in msg
    assert f"PID {holder.pid}" in msg and socket.gethostname() in msg and "--workdir" in msg
    # The run stops before writing anything; the holder's lock is untouched.
    with pytest.raises(workdir_lib.WorkdirBusyError):
      loop.start_run(schema.pretrain_config(), tmp_path, "pre-training")
    assert lock.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["run.lock"]
  finally:
    holder.kill()
    holder.wait()


def test_cli_second_process_is_one_line_and_exits_nonzero(tmp_path):
  holder = subprocess.Popen(["sleep", "60"])
  try:
    lock = write_lock(tmp_path / "run", holder.pid)
    before = lock.read_bytes()
    proc = run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path / "run")],
                   check=False)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(line) == 1 and f"PID {holder.pid}" in line[0], proc.stderr
  assert lock.read_bytes() == before and sorted(os.listdir(tmp_path / "run")) == ["run.lock"]


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
  from genesis_jax.train import workdir as workdir_lib
  dead = subprocess.Popen(["true"])
  dead.wait()
  write_lock(tmp_path, dead.pid)
  lock = workdir_lib.acquire(tmp_path)
  out = capsys.readouterr().out
  assert f"taking over the lock of {tmp_path} from PID {dead.pid}" in out
  assert "no longer runs" in out
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "run.lock").exists()
  assert not list(tmp_path.glob("run.lock*"))


def test_lease_from_another_host_counts_until_it_expires(tmp_path, capsys):
  from genesis_jax.train import workdir as workdir_lib
  write_lock(tmp_path, 1, host="other-host", age_s=60)
  with pytest.raises(workdir_lib.WorkdirBusyError, match="PID 1 on host other-host"):
    workdir_lib.acquire(tmp_path)
  write_lock(tmp_path, 1, host="other-host", age_s=workdir_lib.STALE_AFTER_S + 60)
  with workdir_lib.acquire(tmp_path) as lock:
    assert "lease was last renewed" in capsys.readouterr().out
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    lock.renew()  # The holder's thread does this every RENEW_S seconds.
    assert time.time() - lock.path.stat().st_mtime < 60
  assert not lock.path.exists()


# ---------------------------------------------------------------------------------- resume
def fake_resumable(workdir, config, step=2):
  """A workdir as a run leaves it: its config.json and a checkpoint step directory."""
  (workdir / "checkpoints" / "latest" / str(step)).mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


@pytest.mark.parametrize("key,value", [
    ("seed", 1), ("model.width", 16), ("train.batch_size", 4), ("data.crop", (32, 32, 16)),
    ("corruption.flip_rate", 0.1), ("train.optimizer", "adam"), ("train.schedule", "cosine")])
def test_refused_resume_change_leaves_the_workdir_as_it_was(tmp_path, key, value):
  from genesis_jax import errors
  from genesis_jax.config import schema
  from genesis_jax.train import loop
  config = schema.pretrain_config()
  fake_resumable(tmp_path, config)
  before = snapshot(tmp_path)
  section, _, name = key.rpartition(".")
  changed = schema.pretrain_config()
  (changed[section] if section else changed)[name] = value
  old = (config[section] if section else config)[name]
  with pytest.raises(errors.ConfigError) as e:
    loop.start_run(changed, tmp_path, "pre-training")
  msg = str(e.value)
  as_json = lambda v: repr(json.loads(json.dumps(v)))
  assert f"{key} {as_json(old)} -> {as_json(value)}" in msg  # The key, old and new values.
  assert "--workdir" in msg and "\n" not in msg
  assert snapshot(tmp_path) == before  # config.json byte-identical, no lock left, nothing new.


def test_fixed_keys_are_documented_and_the_rest_may_change():
  from genesis_jax.config import resume, schema
  rule = resume.rule
  for path in ("seed", "model.width", "data.path", "train.batch_size", "train.monitor",
               "corruption.transforms", "task.kind", "finetune.init", "train.schedule"):
    assert rule(path) == schema.FIXED, path
  for path in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "train.learning_rate", "train.early_stop_patience", "eval.overlap",
               "predict.threshold"):
    assert rule(path) == schema.MAY, path


def test_allowed_changes_apply_and_are_recorded_and_metrics_have_one_row_per_step(
    tmp_path, tiny_dataset, capsys):
  from genesis_jax.train import pretrain
  workdir = tmp_path / "run"
  pretrain.train(tiny_pretrain_config(tiny_dataset, 4, eval_every=2), workdir)
  assert not (workdir / "run.lock").exists()  # Released when the run finished.
  # As if killed after step 4's rows were written but before its checkpoint completed.
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "latest" / "4")
  shutil.rmtree(workdir / "checkpoints" / "best")
  config = tiny_pretrain_config(tiny_dataset, 6, eval_every=2)
  config.train.learning_rate = 0.25
  config.log_every = 2
  capsys.readouterr()
  pretrain.train(config, workdir)
  out = capsys.readouterr().out
  assert "resume: changed log_every 1 -> 2, num_steps 4 -> 6, train.learning_rate 0.5 -> 0.25" \
      in out and "resumed from" in out and "(step 2)" in out
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 4, 6]  # Steps 3 and 4 once, from the rerun.
  lrs = {r["step"]: r["learning_rate"] for r in train_rows}
  assert lrs[1] == lrs[2] == 0.5 and lrs[4] == lrs[6] == 0.25  # The new rate is used.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["num_steps"] == 6 and saved["train"]["learning_rate"] == 0.25
  history = [json.loads(l) for l in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert [h["event"] for h in history] == ["start", "resume"]
  assert history[1]["step"] == 2 and history[1]["changed"] == {
      "log_every": [1, 2], "num_steps": [4, 6], "train.learning_rate": [0.5, 0.25]}


def test_plateau_rate_keeps_its_decays_and_patience_is_decided_again():
  import jax.numpy as jnp
  from genesis_jax.config import schema
  from genesis_jax.train import optim
  from genesis_jax.train import workdir as workdir_lib
  from genesis_jax.train.state import TrainState, learning_rate
  config = schema.pretrain_config()
  config.train.schedule = "plateau"
  config.train.learning_rate = 0.1  # The run's rate ...
  tx = optim.make_optimizer(config.train, global_batch=6, num_steps=10)
  state = TrainState.create(apply_fn=None, variables={"params": {"w": jnp.ones(2)}}, tx=tx,
                            rng=jnp.zeros(2, jnp.uint32))
  state = state.replace(opt_state=optim.scale_learning_rate(state.opt_state, 0.5))  # One decay.
  meta = {"bad_evals": 3, "stopped_early": True}
  config.train.learning_rate = 0.2  # ... doubled on resume, with more patience.
  config.train.early_stop_patience = 5
  changes = {"train.learning_rate": (0.1, 0.2), "train.early_stop_patience": (3, 5)}
  state = workdir_lib.apply_changes(config, changes, state, meta, global_batch=6)
  # The run's rate was 0.1 decayed once (0.05); its base doubles, so now 0.1 (not 0.2).
  np.testing.assert_allclose(float(learning_rate(state)), 0.1, rtol=1e-6)
  assert meta["stopped_early"] is False
  config.train.schedule = "constant"
  state = workdir_lib.apply_changes(config, {"train.learning_rate": (0.1, 0.2)}, state, meta,
                                    global_batch=6)
  np.testing.assert_allclose(float(learning_rate(state)), 0.2, rtol=1e-6)
