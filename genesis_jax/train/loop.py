"""The training loop shared by pre-training and fine-tuning.

Host-side bookkeeping only: the step itself is a pure jitted function passed in. Handles resume
from `<workdir>/checkpoints`, logging, evaluation (best checkpoint, plateau decay, early stopping),
periodic async checkpoints, and non-finite losses or gradients.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genesis_jax.train import checkpoints as ckpt_lib
from genesis_jax.train import metric_writers, optim, sharding
from genesis_jax.train.state import TrainState, learning_rate


class NonFiniteError(FloatingPointError):
  pass


class DeviceMemoryError(MemoryError):
  """The train or eval step did not fit in device memory; the message says what to change."""


def is_out_of_memory(err: BaseException) -> bool:
  """Whether `err` is XLA's out-of-device-memory error (RESOURCE_EXHAUSTED)."""
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_hint(err: BaseException, config, what: str = "train step") -> str | None:
  """A message naming the config changes that shrink `what`'s memory, if `err` is an XLA
  out-of-memory error (RESOURCE_EXHAUSTED); None for any other error."""
  if not is_out_of_memory(err):
    return None
  text = str(err)
  m = config.get("model") or {}
  hints = [f"lower config.train.batch_size (now {config.train.batch_size} per device)"]
  if m.get("dtype", "float32") == "float32":
    hints.append("set config.model.dtype='bfloat16' (bf16 activations)")
  impl = m.get("conv_impl", "auto")
  if impl != "native" and int(m.get("spatial_dims", 3)) == 3:
    hints.append(f"set config.model.conv_impl='native' (conv_impl={impl!r} keeps about "
                 f"1.3-1.5x the activation memory of native convs; bench/bench_memory.py)")
  first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
  return (f"the {what} ran out of device memory ({first}). To fit: " + "; or ".join(hints)
          + ". Checkpoints written so far are intact; rerun with the same --workdir to resume.")


@contextlib.contextmanager
def _explain_out_of_memory(config, what: str):
  """Re-raises an out-of-memory error inside the block as `DeviceMemoryError` with the hint."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - only an out-of-memory error is rewrapped
    hint = out_of_memory_hint(e, config, what)
    if hint is None:
      raise
    raise DeviceMemoryError(hint) from e


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def save_config(config, workdir: pathlib.Path) -> None:
  """Writes <workdir>/config.json (the latest invocation's config).

  Resuming a run with a different `train.monitor` is refused here, before anything is
  overwritten: its best checkpoint and early-stopping state follow the old monitor.
  """
  old_file = workdir / "config.json"
  if old_file.exists() and any((workdir / "checkpoints" / "latest").glob("[0-9]*")):
    check_same_monitor(workdir, json.loads(old_file.read_text()).get("train", {}).get(
        "monitor", "val_loss"), str(config.train.get("monitor", "val_loss")))
  if jax.process_index() == 0:
    old_file.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def check_same_monitor(workdir: pathlib.Path, run_monitor: str, monitor: str) -> None:
  """A run's best checkpoint and early stopping follow one monitor; resuming cannot switch it."""
  if run_monitor != monitor:
    raise ValueError(
        f"config.train.monitor={monitor!r} but the run in {workdir} selected its best checkpoint "
        f"by {run_monitor!r}; use a new workdir or the same monitor.")


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def check_sample_rank(shape: tuple[int, ...], spatial_dims: int, depth: int) -> None:
  """A sample is (*spatial, C); its rank must match the model and its size divide by 2**depth."""
  if len(shape) != spatial_dims + 1:
    raise ValueError(
        f"data samples have shape {tuple(shape)} (spatial dims {len(shape) - 1}, channels last) but "
        f"config.model.spatial_dims={spatial_dims}; use a {spatial_dims}D crop in config.data.crop.")
  bad = [s for s in shape[:-1] if s % (2 ** depth)]
  if bad:
    raise ValueError(f"spatial size {tuple(shape[:-1])} must be divisible by 2**depth = "
                     f"{2 ** depth} (config.model.depth={depth}); change config.data.crop.")


def create_state(model, tx, sample_shape, seed: int, mesh, variables=None) -> TrainState:
  """Initialises (or takes `variables`) and places the state replicated on the mesh."""
  init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
  if variables is None:
    dummy = jnp.zeros((1, *sample_shape), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(init_key)
  state = TrainState.create(apply_fn=model.apply, variables=dict(variables), tx=tx, rng=state_key)
  return sharding.replicate(state, mesh)


def guarded_update(state: TrainState, grads, batch_stats, loss) -> tuple[TrainState, dict]:
  """Applies the update unless the loss or gradients are non-finite (then params stay as they were).

  The step counter always advances; whether a non-finite step stops the run is the host's call.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = state.apply_gradients(grads, batch_stats)
  keep = lambda n, o: jnp.where(finite, n, o)
  new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                    batch_stats=jax.tree.map(keep, new.batch_stats, state.batch_stats),
                    opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32),
             "learning_rate": learning_rate(state)}
  return new, metrics


def jit_train_step(step_fn: Callable, state: TrainState, mesh) -> Callable:
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def padded_batches(n: int, per_process: int, max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Fixed-size evaluation batches over items [0, n): (indices, weights) of this process's rows.

  Global batch b covers items [b*G, (b+1)*G), G = per_process * process_count; rows past the end
  repeat item 0 with weight 0, so every process runs the same number of same-shaped steps.
  """
  g = per_process * jax.process_count()
  num = math.ceil(n / g) if max_batches is None else min(math.ceil(n / g), max_batches)
  for b in range(num):
    start = b * g + jax.process_index() * per_process
    idx = np.arange(start, start + per_process)
    w = (idx < n).astype(np.float32)
    yield np.where(idx < n, idx, 0), w


def evaluate_source(state, source, eval_step, mesh, per_process: int, *, max_batches: int | None,
                    seed: int, keep_first: bool = False) -> dict:
  """Mean loss over a random-access source; the corruption keys are fixed, so evals compare."""
  key = jax.random.PRNGKey(seed + 1_000_003)
  total, count, first = 0.0, 0.0, None
  for b, (idx, w) in enumerate(padded_batches(len(source), per_process, max_batches)):
    local = {"image": np.stack([np.asarray(source[int(i)]) for i in idx]), "weight": w}
    out = eval_step(state, sharding.to_global(local, mesh), jax.random.fold_in(key, b))
    total += float(out["loss_sum"])
    count += float(out["count"])
    if keep_first and first is None:
      first = {k: local_rows(out[k]) for k in ("inputs", "targets", "restored")}
  return {"val_loss": total / max(count, 1.0), "first": first}


def write_restoration_samples(first: dict, path: pathlib.Path, max_rows: int = 4) -> None:
  """PNG grid, one row per cube: clean target | corrupted input | restored (mid slices)."""
  if jax.process_index() != 0:
    return
  from genesis_jax.eval import visualize
  rows = []
  for i in range(min(max_rows, len(first["targets"]))):
    rows.append([visualize.mid_slice(first[k][i]) for k in ("targets", "inputs", "restored")])
  path.parent.mkdir(parents=True, exist_ok=True)
  visualize.save_image_grid(path, rows, row_labels=[f"cube {i}" for i in range(len(rows))],
                            col_labels=["original", "corrupted", "restored"])


def _mean_metrics(pending: list[dict], last_step: int) -> tuple[dict, int | None]:
  """Means over the steps since the last log (sum for `nonfinite`), and the first bad step."""
  host = jax.device_get(pending)
  out = {}
  for k in host[0]:
    vals = np.asarray([m[k] for m in host], dtype=np.float64)
    out[k] = float(vals.sum()) if k == "nonfinite" else float(vals.mean())
  bad = [i for i, m in enumerate(host) if m["nonfinite"]]
  first_bad = last_step - len(host) + 1 + bad[0] if bad else None
  return out, first_bad


def _better(val: float, best: float, maximize: bool) -> bool:
  """Strict improvement; a NaN never improves, and anything beats a NaN best."""
  if math.isnan(val):
    return False
  if math.isnan(best):
    return True
  return val > best if maximize else val < best


def monitor_maximizes(monitor: str) -> bool:
  """Losses are minimised; task metrics (auc, dice, iou) are maximised."""
  return "loss" not in monitor


def run_training(config, workdir: pathlib.Path, *, state: TrainState, data_iter, train_step,
                 mesh, evaluate: Callable, on_eval: Callable | None = None,
                 cubes_per_step: int) -> dict:
  """The loop: resume, step, log, evaluate, checkpoint, stop early or on non-finite values."""
  ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  monitor = str(config.train.get("monitor", "val_loss"))
  maximize = monitor_maximizes(monitor)
  meta = {"monitor": monitor, "best_value": -math.inf if maximize else math.inf,
          "best_val_loss": math.inf, "best_step": -1, "bad_evals": 0, "plateau_bad_evals": 0,
          "stopped_early": False}
  if ckpts.latest_step() is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, restored_meta = ckpts.restore(abstract, data_iter)
    restored_meta.setdefault("monitor", "val_loss")  # Checkpoints written before `monitor`.
    restored_meta.setdefault("best_value", restored_meta.get("best_val_loss", math.inf))
    check_same_monitor(workdir, restored_meta["monitor"], monitor)
    meta.update(restored_meta)
    log(f"resumed from {ckpts.describe_latest()} (step {int(state.step)})")
    if meta.get("stopped_early"):
      log("this run had already stopped early; nothing to do")
  writer = metric_writers.MetricWriter(workdir)
  step = int(state.step)
  num_steps = int(config.num_steps)
  progress = metric_writers.Progress(num_steps, step, cubes_per_step)
  pending: list[dict] = []
  train_patience = int(config.train.early_stop_patience)
  t0 = time.perf_counter()
  last_train = {}
  try:
    while step < num_steps and not meta.get("stopped_early"):
      batch = sharding.to_global(next(data_iter), mesh)
      with _explain_out_of_memory(config, "train step"):
        state, metrics = train_step(state, batch)
      step += 1
      pending.append(metrics)
      do_eval = step % config.eval_every == 0 or step == num_steps
      do_save = step % config.checkpoint_every == 0 or step == num_steps or do_eval
      if step % config.log_every == 0 or do_save:
        m, first_bad = _mean_metrics(pending, step)
        pending = []
        if first_bad is not None and config.train.nonfinite == "stop":
          ckpts.wait()
          raise NonFiniteError(
              f"non-finite loss or gradient at step {first_bad}; its update was not applied and "
              f"the run stopped at step {step}. Last good checkpoint: {ckpts.describe_latest()}. "
              f"Lower the learning rate, set config.train.grad_clip, or set "
              f"config.train.nonfinite='skip'.")
        if first_bad is not None:
          log(f"warning: skipped {int(m['nonfinite'])} non-finite step(s) in the "
              f"{config.log_every} steps before step {step} (first: step {first_bad})")
        m.update(progress.update(step, m))
        writer.write(step, m)
        last_train = m
      if do_eval:
        with _explain_out_of_memory(config, "evaluation"):
          result = evaluate(state)
        if monitor not in result:
          raise ValueError(
              f"config.train.monitor={monitor!r} is not among the validation results "
              f"{sorted(k for k, v in result.items() if isinstance(v, (int, float)))}.")
        val = float(result[monitor])
        if math.isnan(val):
          log(f"warning: validation {monitor} is NaN at step {step} (counted as no improvement)")
        improved = _better(val, meta["best_value"], maximize) or meta["best_step"] < 0
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
        if train_patience and meta["bad_evals"] >= train_patience:
          meta["stopped_early"] = True
          log(f"early stop at step {step}: no val improvement in {train_patience} evaluations")
        writer.write(step, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        extra = "" if monitor == "val_loss" else f", {monitor} {val:.6g}"
        log(f"eval step {step}: val_loss {float(result['val_loss']):.6g}{extra} "
            f"(best {monitor} {meta['best_value']:.6g} @ {meta['best_step']})")
        if on_eval is not None:
          on_eval(state, result, step)
        ckpts.save(step, state, data_iter, meta,
                   objective=(-val if maximize else val) if improved else None, force=True)
      elif do_save:
        ckpts.save(step, state, data_iter, meta, force=True)
  finally:
    ckpts.wait()
    ckpts.close()
    writer.close()
  summary = {"final_step": step, "monitor": monitor, "best_value": meta["best_value"],
             "best_val_loss": meta["best_val_loss"],
             "best_step": meta["best_step"], "stopped_early": meta["stopped_early"],
             "final_train_loss": last_train.get("loss"), "wall_s": time.perf_counter() - t0,
             "checkpoints": str(ckpts.root)}
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary
