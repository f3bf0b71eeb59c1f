"""Orbax checkpoints of a run: `<workdir>/checkpoints/latest` (periodic) and `.../best` (val loss).

Each checkpoint holds three items: `state` (the TrainState pytree: step, params, batch_stats,
optimizer state, RNG), `data` (the grain iterator state of this process) and `meta` (JSON:
loop bookkeeping such as the best validation loss and evaluations without improvement). Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save never
leaves a checkpoint that is later taken as complete.

A save that fails (no space left, no permission) is one `CheckpointError` naming the step, the
directory and the cause, raised at the first step boundary after the failure (`check`) or at the
next save or wait; the checkpoints written before it stay as they were. On resume, a step that
cannot be read (a file deleted or truncated) is named, moved to `checkpoints/damaged/` (never
deleted) and the newest readable step is restored instead (`restore_intact`).
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from genesis_jax import errors


def check_writable(workdir: pathlib.Path) -> None:
  """Fail before training starts if the workdir cannot be written (permissions, full disk)."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.CheckpointError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
  cause = write_probe_cause(workdir)
  if cause is not None:
    raise errors.CheckpointError(f"workdir {workdir} is not writable: {cause}")


# What a failed write says, in the words of the OS (errno text) or of TensorStore (status codes).
DISK_CAUSES = (
    ("no space left on device", ("RESOURCE_EXHAUSTED", "No space left", "Disk quota exceeded")),
    ("permission denied", ("PERMISSION_DENIED", "Permission denied", "Operation not permitted")),
    ("read-only file system", ("Read-only file system",)),
)


def error_chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = []
  while error is not None and error not in chain and len(chain) < 20:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def failure_cause(error: BaseException) -> str:
  """One line for why a checkpoint could not be written or read: a known disk condition, else
  the first line of the innermost error (where TensorStore and the OS name the file)."""
  chain = error_chain(error)
  text = " ".join(str(e) for e in chain)
  for cause, markers in DISK_CAUSES:
    if any(m in text for m in markers):
      return cause
  lines = [line for line in str(chain[-1]).splitlines() if line.strip()]
  first = lines[0].strip() if lines else type(chain[-1]).__name__
  # The step's directory is named with the cause already; TensorStore repeats it in full.
  first = re.sub(r' in OCDBT database at local file "[^"]*"', "", first)
  return first if len(first) <= 300 else first[:297] + "..."


def write_probe_cause(directory: pathlib.Path, *, sync: bool = True) -> str | None:
  """Why a small file cannot be written in `directory` (a DISK_CAUSES name or the OS's words),
  or None if it can. `sync=False` skips the fsync: it still finds a read-only or unwritable
  directory at once, at the cost of an open and an unlink."""
  probe = directory / f".write_probe_{jax.process_index()}_{os.getpid()}"
  try:
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      if sync:
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()
  except OSError as e:
    cause = failure_cause(e)
    return cause if cause in dict(DISK_CAUSES) else (e.strerror or cause)
  return None


# Orbax's WARNING when a checkpointer restores one item's directory (weights/transfer.py reads
# <step>/state, whose _CHECKPOINT_METADATA sits a level up): harmless, said on every restore.
BENIGN_ORBAX_WARNINGS = ("Metadata file does not exist",)


def quiet_orbax_errors(record: logging.LogRecord) -> bool:
  """Log filter: drops the ERROR records (with tracebacks) that Orbax's threads and their asyncio
  tasks log for a failed save or restore, and Orbax's harmless BENIGN_ORBAX_WARNINGS, unless
  library logs were asked for (--verbosity); the run reports a failure as one CheckpointError."""
  if logging.getLogger("absl").getEffectiveLevel() <= logging.INFO:
    return True
  if record.levelno < logging.ERROR:
    return not ("orbax" in record.pathname
                and str(record.msg).startswith(BENIGN_ORBAX_WARNINGS))
  from_orbax = "orbax" in record.pathname or (
      record.name == "asyncio" and "orbax" in record.getMessage())
  return not from_orbax


def is_orbax_teardown_noise(unraisable) -> bool:
  """True for what a failed async save leaves behind: TensorStore write callbacks that find
  Orbax's event loop closed ('Event loop is closed') and its never-finished write coroutines
  collected at exit. Neither says more than the run's CheckpointError."""
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


def install_quiet_hooks() -> None:
  """Filters Orbax's error records and teardown noise (once per process; see the filters)."""
  for name in ("absl", "asyncio"):
    if quiet_orbax_errors not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(quiet_orbax_errors)
  previous = sys.unraisablehook
  if getattr(previous, "genesis_quiet", False):
    return

  def hook(unraisable) -> None:
    if is_orbax_teardown_noise(unraisable) and (
        logging.getLogger("absl").getEffectiveLevel() > logging.INFO):
      return
    previous(unraisable)
  hook.genesis_quiet = True
  sys.unraisablehook = hook


def _manager(directory: pathlib.Path, *, max_to_keep: int, best: bool,
             async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      # "objective" is the monitored value, negated for maximised metrics; checkpoints written
      # before config.train.monitor existed carry only "val_loss".
      best_fn=(lambda m: m.get("objective", m.get("val_loss"))) if best else None,
      best_mode="min",
      keep_checkpoints_without_metrics=not best, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      directory.absolute(), options=options,
      item_names=("state", "data", "meta"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


class RunCheckpoints:
  """The latest/best pair of managers of one run."""

  def __init__(self, workdir: pathlib.Path, *, keep: int = 3, async_save: bool = True):
    self.root = pathlib.Path(workdir) / "checkpoints"
    install_quiet_hooks()
    self.latest = _manager(self.root / "latest", max_to_keep=keep, best=False,
                           async_save=async_save)
    self.best = _manager(self.root / "best", max_to_keep=1, best=True, async_save=async_save)
    self._writing: dict[str, int] = {}  # Manager name -> step of its last save not yet checked.
    self.failed: errors.CheckpointError | None = None  # The first save failure reported.

  def _args(self, state, data_iter, meta) -> ocp.args.Composite:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return ocp.args.Composite(**items)

  def _managers(self) -> dict[str, ocp.CheckpointManager]:
    return {"latest": self.latest, "best": self.best}

  def _save_error(self, which: str, step: int, error: BaseException | None,
                  cause: str | None = None) -> errors.CheckpointError:
    """The one error of a failed save; the run's earlier checkpoints are left as they were."""
    if self.failed is None:
      self.latest.reload()  # Orbax drops the failed step from its list only on some paths.
      cause = (cause or failure_cause(error)).rstrip(".")
      if not any(cause == known for known, _ in DISK_CAUSES):
        # Some failures reach us only as a timeout of Orbax's threads: ask the file system.
        cause = write_probe_cause(self.root) or cause
      fix = {"no space left on device": f"free space on the file system of {self.root}",
             "permission denied": f"make {self.root} writable",
             "read-only file system": f"make {self.root} writable"}.get(cause, "fix the cause")
      self.failed = errors.CheckpointError(
          f"saving the checkpoint of step {step} to {self.root / which / str(step)} failed: "
          f"{cause}. The checkpoints written before it are intact (latest: "
          f"{self.describe_latest()}); {fix}, then rerun the same command to resume.")
    return self.failed

  def _guard(self, which: str, action: Callable[[], Any], step: int | None = None) -> Any:
    """Runs a save/wait/check of manager `which`; a failure becomes the one CheckpointError."""
    try:
      return action()
    except Exception as e:  # TensorStore reports I/O errors as ValueError, Orbax re-raises them.
      if isinstance(e, errors.CheckpointError):
        raise
      pending = self._writing.get(which, step)
      raise self._save_error(which, step if pending is None else pending, e) from e

  def save(self, step: int, state, data_iter, meta: dict, *, objective: float | None = None,
           force: bool = False) -> None:
    """Saves the latest; with `objective` (lower is better), also saves it as the best."""
    # The two managers' async saves must not overlap: in multi-process runs they would enter
    # Orbax's cross-process barriers at the same time ("barrier ... is already ongoing").
    self._finish("best")
    self._finish("latest")
    # Orbax reports a directory it cannot create (read-only, no permission) only after a 300 s
    # timeout of its threads; an open() here says so at once.
    cause = write_probe_cause(self.root, sync=False)
    if cause is not None:
      raise self._save_error("latest", step, None, cause)
    self._guard("latest", lambda: self.latest.save(
        step, args=self._args(state, data_iter, meta), force=force), step)
    self._writing["latest"] = step
    # A best step that exists already was written by this run before a resume from an older
    # step (a damaged latest step was skipped): the same step of the same run, kept as it is.
    if objective is not None and step not in self.best.all_steps():
      self._finish("latest")
      self._guard("best", lambda: self.best.save(
          step, args=self._args(state, data_iter, meta),
          metrics={"objective": float(objective)}, force=True), step)
      self._writing["best"] = step

  def _finish(self, which: str) -> None:
    """Waits for manager `which`'s save in flight; its failure is raised as CheckpointError."""
    self._guard(which, self._managers()[which].wait_until_finished)
    self._writing.pop(which, None)

  def check(self) -> None:
    """Raises the CheckpointError of an async save that has already failed; never blocks long.

    Called after every step, so a failed save stops the run at the next step instead of at the
    next save.
    """
    if self.failed is not None:
      raise self.failed
    for which, mgr in self._managers().items():
      # A finished save (done or failed) is no longer in progress; waiting for it then returns
      # at once, raising its error if it failed (Orbax's finalize thread holds that error).
      if which in self._writing and not mgr.is_saving_in_progress():
        self._finish(which)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def describe_latest(self) -> str:
    step = self.latest.latest_step()
    return "none yet" if step is None else str(self.root / "latest" / str(step))

  def restore(self, abstract_state, data_iter, step: int | None = None, *,
              which: str = "latest") -> tuple[Any, dict]:
    mgr = self.latest if which == "latest" else self.best
    step = mgr.latest_step() if step is None else step
    if which == "best" and step is None:
      step = mgr.best_step()
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iter),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "in checkpoint does not match" not in str(e):
        raise
      what = str(e).splitlines()[0].split(" in checkpoint")[0]
      raise errors.CheckpointError(
          f"cannot resume {self.root / which / str(step)}: its input pipeline state was saved for "
          f"a different data order ({what.lower()} differs: the data, seed, batch size, process "
          f"count or the genesis_jax version that wrote it changed). The weights are intact: "
          f"start a new workdir and load them with finetune.init={str(self.root.parent)!r}, or "
          f"restore the original settings.\n(grain: {e})") from e
    return restored["state"], dict(restored["meta"])

  def restore_intact(self, abstract_state, data_iter,
                     log: Callable[[str], None] = print) -> tuple[Any, dict, int] | None:
    """Restores the newest readable latest step: (state, meta, step), or None without steps.

    A newer step that cannot be read (a file missing or truncated) is named and moved to
    `checkpoints/damaged/latest-<step>`, out of Orbax's way (a later save of that step would
    otherwise find it taken), but only once an older step has restored: if none can be read,
    nothing is moved (a config that no longer fits any of them fails the same way) and the
    CheckpointError names each step and why.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    damaged: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, meta = self.restore(abstract_state, data_iter, step)
      except errors.CheckpointError:
        raise  # A readable checkpoint of another data order: not damage.
      except Exception as e:  # TensorStore/Orbax/JSON errors of a missing or truncated file.
        damaged.append((step, failure_cause(e)))
        continue
      if damaged:
        self._set_aside(damaged, step, log)
      return state, meta, step
    if damaged:
      where = "; ".join(f"{self.root / 'latest' / str(s)}: {cause}" for s, cause in damaged)
      raise errors.CheckpointError(
          f"cannot resume: no checkpoint under {self.root / 'latest'} can be read ({where}). "
          f"Nothing was moved or deleted; if the config changed since they were written, "
          f"restore it, otherwise start a new workdir (or move {self.root} aside).")
    return None

  def _set_aside(self, damaged: list[tuple[int, str]], restored: int,
                 log: Callable[[str], None]) -> None:
    """Moves the unreadable steps to checkpoints/damaged/ (process 0) and says so."""
    aside = self.root / "damaged"
    for step, cause in damaged:
      src = self.root / "latest" / str(step)
      dst = aside / f"latest-{step}"
      n = 1
      while dst.exists():
        n += 1
        dst = aside / f"latest-{step}-{n}"
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
      log(f"warning: checkpoint {src} is damaged ({cause}); moved it to {dst} and resumed "
          f"from step {restored} ({self.root / 'latest' / str(restored)})")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("genesis_jax: damaged checkpoints set aside")
    self.latest.reload()

  def wait(self) -> None:
    """Waits for the saves in flight; a failed one is raised as CheckpointError."""
    self._finish("latest")
    self._finish("best")

  def close(self, *, quiet: bool = False) -> None:
    """Waits for the saves in flight and closes the managers. `quiet`: an error is already on
    its way (or was reported), so a failure here is not raised over it."""
    for which, mgr in self._managers().items():
      try:
        self._guard(which, mgr.close)
      except errors.CheckpointError:
        if not quiet:
          raise
