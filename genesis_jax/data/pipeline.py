"""grain input pipelines: pre-training cubes and target-task (image, label) samples.

Every loader is a `grain.python.DataLoader` driven by an `IndexSampler`, so the order is a pure
function of (seed, shard) and `iter(loader).get_state()` / `.set_state()` resume exactly (store
the state with the checkpoint). Arrays are channels-last: cubes (x, y, z, 1), 2D slices (x, y, 1);
batches add a leading N. Sharding is by host process: each process reads a disjoint subset of the
records and yields its per-process batch.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import grain.python as grain
import numpy as np

from genesis_jax import errors
from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import store

_SPLITS = ("train", "val")


class CubeSource(grain.RandomAccessDataSource):
  """The cubes of one split of a prepared dataset, memory-mapped shard by shard.

  Item i is float32 (*crop, 1) in [0, 1]. Shards are opened lazily per process (memmaps are not
  pickled to grain workers), so reading a cube touches only its own pages on disk.
  """

  def __init__(self, dataset_dir: str | os.PathLike, split: str):
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    self._dir = pathlib.Path(dataset_dir)
    manifest = manifest_lib.validate_dataset(self._dir)
    self._split = split
    self.crop = tuple(manifest["crop"])
    shards = [s for s in manifest["shards"] if s["split"] == split and s["count"] > 0]
    if not shards:
      raise errors.DataError(f"{self._dir}: the {split!r} split holds no cubes "
                       f"(counts {manifest['counts']}); use more scans or another val_fraction.")
    self._paths = [str(manifest_lib.shard_path(self._dir, s)) for s in shards]
    self._starts = list(np.cumsum([0] + [s["count"] for s in shards[:-1]]).tolist())
    self._len = int(sum(s["count"] for s in shards))
    self._arrays: list[np.ndarray | None] = [None] * len(shards)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"cube {index} out of range [0, {self._len}) in {self!r}.")
    shard = bisect.bisect_right(self._starts, index) - 1
    array = self._arrays[shard]
    if array is None:
      array = self._arrays[shard] = store.open_cubes(self._paths[shard])
    return np.asarray(array[index - self._starts[shard]], np.float32)[..., None]

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_arrays": [None] * len(self._arrays)}

  def __repr__(self) -> str:
    # grain checks repr(source) when restoring an iterator state: keep it free of object ids.
    return f"CubeSource({str(self._dir)!r}, {self._split!r}, len={self._len})"


class ArraySource(grain.RandomAccessDataSource):
  """In-memory (or np.memmap) arrays of a target task: item i = {"image": images[i],
  "label": labels[i]}; images channels-last, labels a mask or a class."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length.")
    if len(images) == 0:
      raise ValueError("task_loader needs at least one sample.")
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": np.asarray(self._images[index]), "label": np.asarray(self._labels[index])}

  def __repr__(self) -> str:
    return (f"ArraySource(images={self._images.shape}:{self._images.dtype}, "
            f"labels={self._labels.shape}:{self._labels.dtype})")


class ToImage(grain.MapTransform):
  """Cube -> {"image": cube}. A top-level class so spawned grain workers can unpickle it."""

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": element}


def _allow_workers(worker_count: int) -> None:
  # grain 0.2.18 workers read absl flags; outside an absl app nothing marks them parsed.
  if worker_count > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()


def _grain_seed(seed: int) -> int:
  """grain shuffles epoch e with seed + e, so runs with seeds 0 and 1 would see the same orders
  one epoch apart; hashing the seed makes repeated runs independent."""
  digest = hashlib.sha256(f"genesis_jax.pipeline:{int(seed)}".encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1  # grain wants a non-negative 32-bit seed.


class _IndexSource(grain.RandomAccessDataSource):
  """Record i is the integer i: the sampler orders indices, `ReadRows` reads the data."""

  def __init__(self, n: int):
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> np.int64:
    return np.int64(index)

  def __repr__(self) -> str:
    return f"_IndexSource({self._n})"


class ReadRows(grain.MapTransform):
  """A global batch of indices -> this process's rows of it, read and stacked.

  Every process samples the same global order and reads only its contiguous slice of each global
  batch, so N processes together see exactly the batches of one process with the global batch
  size (the global array is the concatenation of the slices in process order).
  """

  def __init__(self, source: Any, operations: list, shard_index: int, shard_count: int):
    self._source, self._operations = source, operations
    self._index, self._count = shard_index, shard_count

  def map(self, indices: np.ndarray) -> Any:
    per = len(indices) // self._count
    mine = indices[self._index * per:(self._index + 1) * per]
    elements = []
    for i in mine:
      element = self._source[int(i)]
      for op in self._operations:
        element = op.map(element)
      elements.append(element)
    if isinstance(elements[0], dict):
      return {k: np.stack([e[k] for e in elements]) for k in elements[0]}
    return np.stack(elements)


def _loader(source: Any, operations: list, *, batch_size: int, seed: int, shard_index: int,
            shard_count: int, shuffle: bool, num_epochs: int | None, worker_count: int,
            drop_remainder: bool) -> grain.DataLoader:
  """`batch_size` rows per process; the global batch (batch_size * shard_count) is sampled in one
  global order shared by all processes (see ReadRows)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count}).")
  if len(source) < shard_count:
    raise errors.DataError(f"{source!r}: {len(source)} records cannot feed {shard_count} "
                           "processes; use more data or fewer processes.")
  _allow_workers(worker_count)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(),
                               shuffle=shuffle, num_epochs=num_epochs, seed=_grain_seed(seed))
  return grain.DataLoader(
      data_source=_IndexSource(len(source)), sampler=sampler,
      operations=[grain.Batch(batch_size=batch_size * shard_count, drop_remainder=drop_remainder),
                  ReadRows(source, operations, shard_index, shard_count)],
      worker_count=worker_count, read_options=read_options())


def read_options() -> grain.ReadOptions:
  """No read threads: grain's records here are indices (`_IndexSource`), the cubes are read by
  `ReadRows` after batching, so threads would only prefetch integers. They cost more than that:
  grain polls every future in its buffer on each record, which on a few busy cores reads fewer
  cubes per second than no threads at all (bench/bench_pipeline.py measures both; figures in
  bench/RESULTS.md). Only on tiny splits (tens of cubes), where grain's per-epoch reshuffle
  dominates, were threads faster; there both settings feed far more than a train step takes."""
  return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def pretrain_loader(source: CubeSource, *, batch_size: int, seed: int, shard_index: int = 0,
                    shard_count: int = 1, worker_count: int = 0) -> grain.DataLoader:
  """Infinite, reshuffled each epoch, per-process batches {"image": float32 (B, *crop, 1)}."""
  return _loader(source, [ToImage()], batch_size=batch_size, seed=seed, shard_index=shard_index,
                 shard_count=shard_count, shuffle=True, num_epochs=None,
                 worker_count=worker_count, drop_remainder=True)


def eval_batches(source: CubeSource, batch_size: int, max_batches: int | None = None, *,
                 drop_remainder: bool = False, shard_index: int = 0,
                 shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass in fixed order (no shuffle): {"image": (B, *crop, 1)}. The last batch is short unless
  `drop_remainder`; with shard_count > 1 each process gets a disjoint strided subset."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  indices = range(shard_index, len(source), shard_count)
  for n, start in enumerate(range(0, len(indices), batch_size)):
    if max_batches is not None and n >= max_batches:
      return
    chunk = indices[start:start + batch_size]
    if drop_remainder and len(chunk) < batch_size:
      return
    yield {"image": np.stack([source[i] for i in chunk])}


def task_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                repeat: bool = True, worker_count: int = 0) -> grain.DataLoader:
  """Target-task batches {"image": (B, ...), "label": (B, ...)} from arrays (memmaps welcome).

  repeat=True: infinite, full batches only (fixed shapes for jit); repeat=False: one pass whose
  last batch may be short.
  """
  return _loader(ArraySource(images, labels), [], batch_size=batch_size, seed=seed,
                 shard_index=shard_index, shard_count=shard_count, shuffle=shuffle,
                 num_epochs=None if repeat else 1, worker_count=worker_count,
                 drop_remainder=repeat)
