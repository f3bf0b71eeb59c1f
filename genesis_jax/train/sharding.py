"""One mesh axis, `data`: parameters replicated, the batch split along its leading axis.

Works unchanged for one device, many local devices, and many processes (hosts): each process
feeds only its own slice of the global batch (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: jit propagates shardings from inputs; params stay replicated without annotation.
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def per_process_batch(per_device_batch: int) -> int:
  """Rows of the global batch that this process loads."""
  return per_device_batch * jax.local_device_count()


def global_batch_size(per_device_batch: int) -> int:
  return per_device_batch * jax.device_count()


def to_global(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local numpy rows -> one global array per key, sharded over `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def describe(mesh: jax.sharding.Mesh) -> str:
  return (f"mesh data={mesh.shape['data']} | processes={jax.process_count()} "
          f"(this is {jax.process_index()}) | local devices={jax.local_device_count()} "
          f"| platform={jax.devices()[0].platform}")
