"""Everything a run needs to continue: one pytree, checkpointed whole."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of optimizer updates applied.
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; the key of step s is fold_in(rng, s), so resume is exact.
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, variables, tx, rng) -> "TrainState":
    params = variables["params"]
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
               rng=rng, apply_fn=apply_fn, tx=tx)

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def apply_gradients(self, grads, batch_stats) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def learning_rate(state: TrainState) -> jax.Array:
  """Current learning rate, read from the `inject_hyperparams` state (see optim.py)."""
  return state.opt_state.hyperparams["learning_rate"]
