"""A run's workdir: one process at a time (the lock), and what a resume may change (the policy).

The lock. `<workdir>/run.lock` is created with O_CREAT|O_EXCL (atomic: one process wins) and
holds the holder's PID, host and start time as JSON. Another process that finds it is refused
with `WorkdirBusyError`, unless the lock is stale: its PID no longer runs on this host, or it
comes from another host and its lease (the file's mtime, renewed every `RENEW_S` seconds by a
thread of the holder) is older than `STALE_AFTER_S`; a stale lock is taken over with a message.
The lock is released by `release()` at the end of a run and, for runs that end in an error, at
process exit. A multi-process run holds one lock, through process 0. Nested runs (an
experiment's pre-training and trials, each in a sub-workdir) hold their own lock files, so they
never wait on the experiment's. Modes that only read a workdir (evaluate, predict) take no lock.

The resume policy. A workdir with a checkpoint resumes. Keys declared `resume=FIXED` in
config/schema.py (the model, data, seed, batch size, corruption, task, optimizer, schedule
kind, monitor) fix what the checkpoints mean: a resume that changes one is refused, naming old
and new values, before anything is written. The other keys (step counts, cadences, learning
rate, patience) may change: they apply from the resumed step, and each start or resume is
appended to `<workdir>/config_history.jsonl` (time, step, changed keys with old and new
values); `<workdir>/config.json` is the config of the latest start.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import pathlib
import socket
import threading
import time
import types

import jax

from genesis_jax import errors
from genesis_jax.config import resume as resume_rules
from genesis_jax.config import schema
from genesis_jax.data import store
from genesis_jax.train import optim

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
STALE_AFTER_S = 600.0  # A lock from another host whose lease is older than this is stale.
RENEW_S = 60.0  # How often a holder renews its lease (touches the lock file).
WRITE_GRACE_S = 10.0  # A lock file still empty this long after its creation is stale.

# Learning-rate keys whose change sets the learning rate held in the optimizer state.
LR_KEYS = ("train.learning_rate", "train.lr_scaling", "train.base_batch_size")


class WorkdirBusyError(errors.GenesisError, RuntimeError):
  """Another live process holds the workdir's lock."""


def _now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ lock
def pid_alive(pid: int) -> bool:
  """Whether a process with this PID runs on this host (a zombie counts as running)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, under another user.
  return True


def read_holder(path: pathlib.Path) -> dict | None:
  """The lock file's JSON (pid, host, started), {} if unreadable, None if there is no file."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except OSError:
    return {}
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def stale_reason(path: pathlib.Path, holder: dict) -> str | None:
  """Why the lock in `path` is stale, or None if its holder may still be running."""
  try:
    age = time.time() - path.stat().st_mtime
  except FileNotFoundError:
    return "it was just released"
  if not holder:
    return None if age < WRITE_GRACE_S else "the lock file is empty or damaged"
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    return None if pid_alive(pid) else f"process {pid} no longer runs"
  if age > STALE_AFTER_S:
    return f"its lease was last renewed {age:.0f} s ago (stale after {STALE_AFTER_S:.0f} s)"
  return None


def describe_holder(holder: dict) -> str:
  if not holder:
    return "a process that is starting"
  return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(since {holder.get('started', '?')})")


class WorkdirLock:
  """The lock of one workdir, held by this process (process 0 of a multi-process run)."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.token: dict | None = None  # What this process wrote, while it holds the lock.
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None

  @property
  def held(self) -> bool:
    return self.token is not None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock; WorkdirBusyError if a live process holds it. No-op off process 0."""
    if jax.process_index() != 0 or self.held:
      return self
    earlier = HELD.get(self.path.absolute())
    if earlier is not None:  # A run of this process that ended in an error left it held.
      earlier.release()
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise errors.CheckpointError(
          f"workdir {self.workdir} is not writable: {e.strerror or e}") from e
    for _ in range(3):
      if self._create():
        break
      holder = read_holder(self.path)
      if holder is None:
        continue  # Released between our attempt and the read: try again.
      reason = stale_reason(self.path, holder)
      if reason is None:
        raise WorkdirBusyError(
            f"workdir {self.workdir} is in use by {describe_holder(holder)}; wait for that run "
            f"to end or use another --workdir (if that process is gone, delete {self.path}).")
      if self._remove_stale(holder):
        log(f"warning: taking over the lock of {self.workdir} from {describe_holder(holder)}: "
            f"{reason}")
    else:
      raise WorkdirBusyError(f"could not take the lock {self.path} (other processes keep taking "
                             f"it); use another --workdir.")
    HELD[self.path.absolute()] = self
    self._stop.clear()
    self._renewer = threading.Thread(target=self._renew_loop, name="workdir-lock", daemon=True)
    self._renewer.start()
    return self

  def _create(self) -> bool:
    token = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso()}
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise errors.CheckpointError(
          f"workdir {self.workdir} is not writable: {e.strerror or e}") from e
    with os.fdopen(fd, "w") as f:
      json.dump(token, f)
      f.flush()
      os.fsync(f.fileno())
    self.token = token
    return True

  def _remove_stale(self, holder: dict) -> bool:
    """Moves the stale lock aside; False if what was moved is not the lock judged stale (then
    it is put back: another process took the lock in between)."""
    aside = self.path.with_name(f"{LOCK_FILE}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
      os.replace(self.path, aside)
    except FileNotFoundError:
      return False
    moved = read_holder(aside)
    if moved != holder and moved:
      try:
        os.link(aside, self.path)  # Put it back, unless a third process holds the lock now.
      except FileExistsError:
        pass
      aside.unlink(missing_ok=True)
      return False
    aside.unlink(missing_ok=True)
    return True

  def renew(self) -> None:
    """Renews the lease (the lock file's mtime) so other hosts see the holder is alive."""
    if self.held:
      try:
        os.utime(self.path)
      except OSError:
        pass  # Gone or unreachable: the next acquire elsewhere decides; training goes on.

  def _renew_loop(self) -> None:
    while not self._stop.wait(RENEW_S):
      self.renew()

  def release(self) -> None:
    """Deletes the lock file if it is still this process's; idempotent. A forked child (a data
    worker) inherits the lock object but never deletes its parent's lock."""
    if not self.held:
      return
    self._stop.set()
    if self.token["pid"] == os.getpid() and read_holder(self.path) == self.token:
      self.path.unlink(missing_ok=True)
    self.token = None
    HELD.pop(self.path.absolute(), None)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


HELD: dict[pathlib.Path, WorkdirLock] = {}  # The locks this process holds, by lock path.


@atexit.register
def release_all() -> None:
  """Releases every lock this process still holds (a run that ended in an error)."""
  for lock in list(HELD.values()):
    lock.release()


def acquire(workdir: str | os.PathLike) -> WorkdirLock:
  """Locks `workdir` for this run (see the module docstring)."""
  return WorkdirLock(workdir).acquire()


# ---------------------------------------------------------------------------------- policy
def latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
  """The newest step under <workdir>/checkpoints/latest (complete Orbax step directories)."""
  root = pathlib.Path(workdir) / "checkpoints" / "latest"
  steps = [int(p.name) for p in root.glob("[0-9]*") if p.name.isdigit() and p.is_dir()]
  return max(steps) if steps else None


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"train": {"seed": 1}} -> {"train.seed": 1}; a declared dict-valued key stays whole."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict) and schema.lookup(path) is None:
      out.update(flatten(v, path + "."))
    else:
      out[path] = v
  return out


def as_json(value):
  return json.loads(json.dumps(value))


def config_changes(config, workdir: pathlib.Path) -> dict[str, tuple]:
  """{key: (value in <workdir>/config.json, value now)} of every declared key that differs.

  A key the saved config lacks (added to genesis_jax since) counts at its default, the value
  the run had. Keys the saved config has but the schema no longer declares are left out.
  """
  saved_file = pathlib.Path(workdir) / CONFIG_FILE
  try:
    saved = flatten(json.loads(saved_file.read_text()))
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise errors.ConfigError(
        f"cannot read {saved_file} to check the resumed config against it ({e}); restore it, "
        f"or delete it to resume without the check.") from e
  family = schema.family_of(str(config.mode))
  changes = {}
  for path, value in flatten(json.loads(config.to_json_best_effort())).items():
    key = schema.lookup(path)
    if key is None:
      continue
    before = saved[path] if path in saved else as_json(key.default_for(family))
    if before != value:
      changes[path] = (before, value)
  return changes


def check_resume(config, workdir: pathlib.Path) -> tuple[int | None, dict[str, tuple]]:
  """(checkpoint step, changed keys) of a resume; (None, {}) for a fresh start.

  Raises ConfigError, before anything is written, if a key fixed on resume changed.
  """
  step = latest_checkpoint_step(workdir)
  if step is None:
    return None, {}
  changes = config_changes(config, workdir)
  fixed = {p: c for p, c in changes.items() if resume_rules.rule(p) == schema.FIXED}
  if fixed:
    shown = ", ".join(f"{p} {o!r} -> {n!r}" + (
        f" (the run selected its best checkpoint by {o!r})" if p == "train.monitor" else "")
        for p, (o, n) in sorted(fixed.items()))
    raise errors.ConfigError(
        f"cannot resume {workdir} (checkpoint at step {step}) with a changed {shown}: these keys "
        f"fix what its checkpoints mean (docs/config.md, 'On resume'). Set them back to the "
        f"values in {pathlib.Path(workdir) / CONFIG_FILE}, or use a new --workdir.")
  return step, changes


def save_config(config, workdir: pathlib.Path, step: int | None, changes: dict) -> None:
  """Appends this start (or resume) to config_history.jsonl, then writes config.json."""
  if changes:
    log("resume: changed " + ", ".join(f"{p} {o!r} -> {n!r}" for p, (o, n)
                                       in sorted(changes.items()))
        + f" (applied from step {step}; recorded in {HISTORY_FILE})")
  if jax.process_index() != 0:
    return
  history = pathlib.Path(workdir) / HISTORY_FILE
  record = {"time": _now_iso(), "event": "start" if step is None else "resume",
            "step": step or 0, "changed": {p: list(c) for p, c in sorted(changes.items())}}
  old = history.read_bytes() if history.exists() else b""
  if old and not old.endswith(b"\n"):
    old += b"\n"  # A line cut short by an old kill: keep it, start ours on a line of its own.
  store.write_bytes(history, old + (json.dumps(record) + "\n").encode())
  store.write_bytes(pathlib.Path(workdir) / CONFIG_FILE,
                    config.to_json_best_effort(indent=2, sort_keys=True).encode())


def apply_changes(config, changes: dict, state, meta: dict, global_batch: int):
  """Makes the allowed changes of a resume take effect in the restored `state` and `meta`.

  Schedules computed from the step (step, cosine) use the new config by themselves. Constant
  and plateau keep the learning rate in the optimizer state: it is set to the new base rate
  (plateau: scaled by new / old base rate, so decays so far stay). Early stopping is decided
  again under the new patience. Returns the state.
  """
  if any(k in changes for k in LR_KEYS) and config.train.schedule in ("constant", "plateau"):
    old = types.SimpleNamespace(**{k: changes.get(f"train.{k}", (config.train[k],))[0]
                                   for k in ("learning_rate", "lr_scaling", "base_batch_size")})
    new_lr = optim.base_learning_rate(config.train, global_batch)
    if config.train.schedule == "plateau":
      old_lr = optim.base_learning_rate(old, global_batch)
      state = state.replace(opt_state=optim.scale_learning_rate(state.opt_state,
                                                                new_lr / old_lr))
    else:
      state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, new_lr))
  if "train.early_stop_patience" in changes:
    patience = int(config.train.early_stop_patience)
    meta["stopped_early"] = bool(patience) and meta["bad_evals"] >= patience
  return state
