"""The host side of a training run, the same for pre-training and fine-tuning.

A run starts with `start_run` (the workdir's lock and resume policy from workdir.py, mesh,
config.json, batch sizes) and `build_state` (state and jitted train step, from step.py); then
`run_training` steps, logs, evaluates (best checkpoint, plateau decay, early stopping),
checkpoints and resumes; `finish` writes `<workdir>/summary.json`, prints the closing line and
releases the lock. What differs between the modes comes in
as functions: the data iterator, the train step and `evaluate(state) -> results`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from genesis_jax import errors
from genesis_jax.data import store
from genesis_jax.train import checkpoints as ckpt_lib
from genesis_jax.train import metric_writers, optim, preemption, sharding
from genesis_jax.train import step as step_lib
from genesis_jax.train import workdir as workdir_lib
from genesis_jax.train.state import TrainState


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# -------------------------------------------------------------------------------- prologue
@dataclasses.dataclass(frozen=True)
class Run:
  """What every part of a run needs: its config, workdir, mesh and batch sizes."""
  config: object
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  per_process: int  # Rows of each global batch this process loads.
  global_batch: int
  started: float  # time.perf_counter() at start_run.
  lock: workdir_lib.WorkdirLock | None = None  # Released by `finish` (or at process exit).
  changes: dict = dataclasses.field(default_factory=dict)  # Resumed: {key: (old, new)}.


def start_run(config, workdir, title: str) -> Run:
  """Locks the workdir, checks a resume against the run's config.json (a refused change leaves
  the workdir as it was), makes the mesh, writes config.json; fails before any training."""
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  lock = workdir_lib.acquire(workdir)
  try:
    resume_step, changes = workdir_lib.check_resume(config, workdir)
    ckpt_lib.check_writable(workdir)
    mesh = sharding.make_mesh()
    log(f"{title} | {sharding.describe(mesh)}")
    workdir_lib.save_config(config, workdir, resume_step, changes)
  except BaseException:
    lock.release()
    raise
  return Run(config=config, workdir=workdir, mesh=mesh,
             per_process=sharding.per_process_batch(config.train.batch_size),
             global_batch=sharding.global_batch_size(config.train.batch_size), started=started,
             lock=lock, changes=changes)


def build_state(run: Run, model, tx, variables, step_fn: Callable) -> tuple[TrainState, Callable]:
  """The replicated train state of `variables` and `step_fn` jitted for it."""
  config = run.config
  state = step_lib.create_state(model, tx, config.seed, run.mesh, variables)
  log(f"model: {step_lib.count_params(state.params):,} parameters | global batch "
      f"{run.global_batch} ({config.train.batch_size} per device) | lr "
      f"{optim.base_learning_rate(config.train, run.global_batch):g}")
  return state, step_lib.jit_train_step(step_fn, state, run.mesh)


def check_same_monitor(workdir: pathlib.Path, run_monitor: str, monitor: str) -> None:
  """A run's best checkpoint and early stopping follow one monitor; resuming cannot switch it."""
  if run_monitor != monitor:
    raise errors.ConfigError(
        f"config.train.monitor={monitor!r} but the run in {workdir} selected its best checkpoint "
        f"by {run_monitor!r}; use a new workdir or the same monitor.")


def check_sample_rank(shape: tuple[int, ...], spatial_dims: int, depth: int) -> None:
  """A sample is (*spatial, C); its rank must match the model and its size divide by 2**depth."""
  if len(shape) != spatial_dims + 1:
    raise errors.ConfigError(
        f"data samples have shape {tuple(shape)} (spatial dims {len(shape) - 1}, channels last) "
        f"but config.model.spatial_dims={spatial_dims}; use a {spatial_dims}D crop in "
        f"config.data.crop.")
  bad = [s for s in shape[:-1] if s % (2 ** depth)]
  if bad:
    raise errors.ConfigError(f"spatial size {tuple(shape[:-1])} must be divisible by 2**depth = "
                             f"{2 ** depth} (config.model.depth={depth}); change config.data.crop.")


# ---------------------------------------------------------------------------------- resume
def monitor_maximizes(monitor: str) -> bool:
  """Losses are minimised; task metrics (auc, dice, iou) are maximised."""
  return "loss" not in monitor


def initial_meta(monitor: str) -> dict:
  """The loop's bookkeeping, checkpointed with the state (JSON)."""
  return {"monitor": monitor, "best_value": -math.inf if monitor_maximizes(monitor) else math.inf,
          "best_val_loss": math.inf, "best_step": -1, "bad_evals": 0, "plateau_bad_evals": 0,
          "stopped_early": False}


def resume(run: Run, ckpts: ckpt_lib.RunCheckpoints, state: TrainState, data_iter,
           meta: dict) -> TrainState:
  """Restores the latest checkpoint, if any, into `state`, `data_iter` and `meta`."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckpts.restore_intact(abstract, data_iter, log=log)  # Skips damaged steps.
  if restored is None:
    return state
  state, restored_meta, _ = restored
  restored_meta.setdefault("monitor", "val_loss")  # Checkpoints written before `monitor`.
  restored_meta.setdefault("best_value", restored_meta.get("best_val_loss", math.inf))
  check_same_monitor(run.workdir, restored_meta["monitor"], meta["monitor"])
  meta.update(restored_meta)
  state = workdir_lib.apply_changes(run.config, run.changes, state, meta, run.global_batch)
  log(f"resumed from {ckpts.describe_latest()} (step {int(state.step)})")
  if meta.get("stopped_early"):
    log("this run had already stopped early; nothing to do")
  return state


# ------------------------------------------------------------------------------------- log
def mean_metrics(pending: list[dict], last_step: int) -> tuple[dict, int | None]:
  """Means over the steps since the last log (sum for `nonfinite`), and the first bad step."""
  host = jax.device_get(pending)
  out = {}
  for k in host[0]:
    vals = np.asarray([m[k] for m in host], dtype=np.float64)
    out[k] = float(vals.sum()) if k == "nonfinite" else float(vals.mean())
  bad = [i for i, m in enumerate(host) if m["nonfinite"]]
  first_bad = last_step - len(host) + 1 + bad[0] if bad else None
  return out, first_bad


def log_train(run: Run, ckpts: ckpt_lib.RunCheckpoints, pending: list[dict], step: int,
              progress: metric_writers.Progress, writer: metric_writers.MetricWriter) -> dict:
  """Writes the mean train metrics since the last log; stops on a non-finite step if asked."""
  config = run.config
  m, first_bad = mean_metrics(pending, step)
  if first_bad is not None and config.train.nonfinite == "stop":
    ckpts.wait()
    raise errors.NonFiniteError(
        f"non-finite loss or gradient at step {first_bad}; its update was not applied and "
        f"the run stopped at step {step}. Last good checkpoint: {ckpts.describe_latest()}. "
        f"Lower the learning rate, set config.train.grad_clip, or set "
        f"config.train.nonfinite='skip'.")
  if first_bad is not None:
    log(f"warning: skipped {int(m['nonfinite'])} non-finite step(s) in the "
        f"{config.log_every} steps before step {step} (first: step {first_bad})")
  m.update(progress.update(step, m))
  writer.write(step, m)
  return m


# -------------------------------------------------------------------------------- evaluate
def better(val: float, best: float, maximize: bool) -> bool:
  """Strict improvement; a NaN never improves, and anything beats a NaN best."""
  if math.isnan(val):
    return False
  if math.isnan(best):
    return True
  return val > best if maximize else val < best


def monitored_value(monitor: str, result: dict, step: int) -> float:
  if monitor not in result:
    raise errors.ConfigError(
        f"config.train.monitor={monitor!r} is not among the validation results "
        f"{sorted(k for k, v in result.items() if isinstance(v, (int, float)))}.")
  val = float(result[monitor])
  if math.isnan(val):
    log(f"warning: validation {monitor} is NaN at step {step} (counted as no improvement)")
  return val


def select(run: Run, state: TrainState, result: dict, step: int,
           meta: dict) -> tuple[TrainState, float | None]:
  """Best checkpoint, plateau decay and early stopping after an evaluation.

  Returns the state (its learning rate decayed on a plateau) and, if this evaluation is the new
  best, its checkpoint objective (lower is better); otherwise None.
  """
  config = run.config
  monitor = meta["monitor"]
  maximize = monitor_maximizes(monitor)
  val = monitored_value(monitor, result, step)
  improved = better(val, meta["best_value"], maximize) or meta["best_step"] < 0
  if improved:
    meta.update(best_value=val, best_val_loss=float(result["val_loss"]), best_step=step,
                bad_evals=0, plateau_bad_evals=0)
  else:
    meta["bad_evals"] += 1
    meta["plateau_bad_evals"] += 1
  if (config.train.schedule == "plateau"
      and meta["plateau_bad_evals"] >= config.train.plateau_patience):
    state = state.replace(opt_state=optim.scale_learning_rate(
        state.opt_state, config.train.decay_factor))
    meta["plateau_bad_evals"] = 0
    log(f"plateau: learning rate x{config.train.decay_factor} at step {step}")
  patience = int(config.train.early_stop_patience)
  if patience and meta["bad_evals"] >= patience:
    meta["stopped_early"] = True
    log(f"early stop at step {step}: no val improvement in {patience} evaluations")
  extra = "" if monitor == "val_loss" else f", {monitor} {val:.6g}"
  log(f"eval step {step}: val_loss {float(result['val_loss']):.6g}{extra} "
      f"(best {monitor} {meta['best_value']:.6g} @ {meta['best_step']})")
  return state, ((-val if maximize else val) if improved else None)


# ------------------------------------------------------------------------------------ loop
def run_training(run: Run, *, state: TrainState, data_iter, train_step: Callable,
                 evaluate: Callable, on_eval: Callable | None = None) -> dict:
  """Resume, step, log, evaluate, checkpoint, stop early or on non-finite values.

  `evaluate(state)` returns the validation results (`val_loss` and the monitored value among
  them); `on_eval(state, result, step)` runs after each evaluation. Returns the summary that
  `finish` writes.
  """
  config = run.config
  ckpts = ckpt_lib.RunCheckpoints(run.workdir, keep=config.keep_checkpoints)
  meta = initial_meta(str(config.train.get("monitor", "val_loss")))
  state = resume(run, ckpts, state, data_iter, meta)
  step = int(state.step)
  writer = metric_writers.MetricWriter(run.workdir, resume_step=step)
  num_steps = int(config.num_steps)
  progress = metric_writers.Progress(num_steps, step, run.global_batch)
  pending: list[dict] = []
  t0 = time.perf_counter()
  last_train = {}
  stop = preemption.StopSignals(run.mesh)  # SIGTERM/SIGINT: save, then raise Preempted.
  try:
    with stop:
      while step < num_steps and not meta.get("stopped_early"):
        batch = sharding.to_global(next(data_iter), run.mesh)
        with step_lib.explain_out_of_memory(config, "train step"):
          state, metrics = train_step(state, batch)
        step += 1
        pending.append(metrics)
        ckpts.check()  # An async save that failed stops the run here, as one CheckpointError.
        stopping = stop.requested(step) is not None
        do_eval = step % config.eval_every == 0 or step == num_steps
        do_save = (step % config.checkpoint_every == 0 or step == num_steps or do_eval
                   or stopping)
        if step % config.log_every == 0 or do_save:
          last_train = log_train(run, ckpts, pending, step, progress, writer)
          pending = []
        if do_eval:
          with step_lib.explain_out_of_memory(config, "evaluation"):
            result = evaluate(state)
          state, objective = select(run, state, result, step, meta)
          writer.write(step, {k: v for k, v in result.items() if isinstance(v, (int, float))})
          if on_eval is not None:
            on_eval(state, result, step)
          ckpts.save(step, state, data_iter, meta, objective=objective, force=True)
        elif do_save:
          ckpts.save(step, state, data_iter, meta, force=True)
        if stopping:
          break
      ckpts.wait()  # Still under the handlers: a signal during the last save counts too.
    signum = stop.final()  # Every step that can end the loop saved its checkpoint.
    if signum is not None:
      preempted = preemption.Preempted(signum, step, ckpts.describe_latest())
      log(str(preempted))
      raise preempted
  except BaseException:
    ckpts.close(quiet=True)  # The error on its way wins over a failed save's.
    try:
      writer.close()
    except OSError:
      pass  # A full disk fails the metric files too; the error on its way is the one to show.
    raise
  try:
    ckpts.close()
  finally:
    writer.close()
  return {"final_step": step, "monitor": meta["monitor"], "best_value": meta["best_value"],
          "best_val_loss": meta["best_val_loss"], "best_step": meta["best_step"],
          "stopped_early": meta["stopped_early"], "final_train_loss": last_train.get("loss"),
          "wall_s": time.perf_counter() - t0, "checkpoints": str(ckpts.root)}


# ---------------------------------------------------------------------------------- summary
def finish(run: Run, summary: dict) -> dict:
  """Writes <workdir>/summary.json, prints one closing line, releases the workdir's lock;
  returns `summary`."""
  try:
    if jax.process_index() == 0:
      store.write_bytes(run.workdir / "summary.json",
                        json.dumps(summary, indent=2, default=str).encode())
  finally:
    if run.lock is not None:
      run.lock.release()
  test = summary.get("test") or {}
  test_part = "".join(f", test {k} {v:.4g}" for k, v in test.items()
                      if isinstance(v, float) and k != "val_loss")
  log(f"done: step {summary['final_step']}, best {summary['monitor']} "
      f"{summary['best_value']:.6g} @ step {summary['best_step']}{test_part}, wall "
      f"{time.perf_counter() - run.started:.0f} s; outputs in {run.workdir}")
  return summary
