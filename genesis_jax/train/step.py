"""The device side of training, shared by pre-training and fine-tuning.

Model initialisation and the replicated `TrainState`, the guarded parameter update every train
step ends with, jitting the step with its shardings (state replicated and donated, batch split
over the `data` mesh axis), the out-of-memory explanation, and the pieces of on-device
evaluation: fixed-size padded batches and reading back this process's rows.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genesis_jax import errors
from genesis_jax.train import sharding
from genesis_jax.train.state import TrainState, learning_rate


# ------------------------------------------------------------------------- state and init
def init_variables(model, sample_shape, seed: int) -> dict:
  """The model's initial variables (on the host), from the first half of `PRNGKey(seed)`.

  The one initialisation of every run: pre-training uses it as it is, fine-tuning merges
  pre-trained weights into it. The second half of the key seeds the state's RNG (create_state).
  """
  init_key = jax.random.split(jax.random.PRNGKey(seed))[0]
  dummy = jnp.zeros((1, *sample_shape), jnp.float32)
  return jax.device_get(jax.jit(lambda k: model.init(k, dummy, train=False))(init_key))


def create_state(model, tx, seed: int, mesh, variables) -> TrainState:
  """The train state of `variables`, its RNG from `PRNGKey(seed)`, replicated on the mesh."""
  state_key = jax.random.split(jax.random.PRNGKey(seed))[1]
  state = TrainState.create(apply_fn=model.apply, variables=dict(variables), tx=tx, rng=state_key)
  return sharding.replicate(state, mesh)


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------ the update
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
  """`step_fn(state, batch) -> (state, metrics)` jitted: state replicated and donated, batch
  sharded over `data`, metrics replicated."""
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


# ---------------------------------------------------------------------------- out of memory
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
    hints.append(f"set config.model.conv_impl='native' (conv_impl={impl!r} keeps more "
                 f"activation memory than native convs; bench/bench_memory.py)")
  first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
  return (f"the {what} ran out of device memory ({first}). To fit: " + "; or ".join(hints)
          + ". Checkpoints written so far are intact; rerun with the same --workdir to resume.")


@contextlib.contextmanager
def explain_out_of_memory(config, what: str):
  """Re-raises an out-of-memory error inside the block as `DeviceMemoryError` with the hint."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - only an out-of-memory error is rewrapped
    hint = out_of_memory_hint(e, config, what)
    if hint is None:
      raise
    raise errors.DeviceMemoryError(hint) from e


# ------------------------------------------------------------------------------ evaluation
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


def padded_batches(n: int, per_process: int,
                   max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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


def global_eval_batches(n: int, per_process: int, mesh, rows: Callable[[np.ndarray], dict], *,
                        max_batches: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """The padded batches over items [0, n) as global arrays: `rows(indices)` gives this process's
  arrays of those items, and `weight` (1 for a real row, 0 for padding) is added."""
  for idx, w in padded_batches(n, per_process, max_batches):
    yield sharding.to_global({**rows(idx), "weight": w}, mesh)
