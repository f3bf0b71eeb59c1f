"""Orbax checkpoints of a run: `<workdir>/checkpoints/latest` (periodic) and `.../best` (val loss).

Each checkpoint holds three items: `state` (the TrainState pytree: step, params, batch_stats,
optimizer state, RNG), `data` (the grain iterator state of this process) and `meta` (JSON:
loop bookkeeping such as the best validation loss and evaluations without improvement). Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save never
leaves a checkpoint that is later taken as complete.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from genesis_jax import errors


def check_writable(workdir: pathlib.Path) -> None:
  """Fail before training starts if the workdir cannot be written (permissions, full disk)."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe_{jax.process_index()}"
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    probe.unlink()
  except OSError as e:
    raise errors.CheckpointError(f"workdir {workdir} is not writable: {e.strerror or e}") from e


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
    self.latest = _manager(self.root / "latest", max_to_keep=keep, best=False,
                           async_save=async_save)
    self.best = _manager(self.root / "best", max_to_keep=1, best=True, async_save=async_save)

  def _args(self, state, data_iter, meta) -> ocp.args.Composite:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return ocp.args.Composite(**items)

  def save(self, step: int, state, data_iter, meta: dict, *, objective: float | None = None,
           force: bool = False) -> None:
    """Saves the latest; with `objective` (lower is better), also saves it as the best."""
    try:
      # The two managers' async saves must not overlap: in multi-process runs they would enter
      # Orbax's cross-process barriers at the same time ("barrier ... is already ongoing").
      self.best.wait_until_finished()
      self.latest.save(step, args=self._args(state, data_iter, meta), force=force)
      if objective is not None:
        self.latest.wait_until_finished()
        self.best.save(step, args=self._args(state, data_iter, meta),
                       metrics={"objective": float(objective)}, force=True)
    except OSError as e:
      raise errors.CheckpointError(
          f"saving checkpoint at step {step} under {self.root} failed: {e}. "
          f"Previous checkpoints are untouched: {self.describe_latest()}") from e

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

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
