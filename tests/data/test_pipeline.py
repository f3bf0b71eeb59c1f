"""grain pipelines: determinism, epochs, resume from iterator state, disjoint process shards."""
from __future__ import annotations

import pickle

import ml_collections
import numpy as np
import pytest

from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import pipeline
from genesis_jax.data import prepare as prepare_lib

CROP = (8, 8, 4)


def _ids(batch: dict) -> list[int]:
  """Every cube is filled with (its global id + 1) / 1000, so a batch names its cubes."""
  return [int(round(float(c.mean()) * 1000)) - 1 for c in batch["image"]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
  """A released-cubes style dataset: 3 files of 10 + 7 + 13 = 30 cubes, one of them for val."""
  root = tmp_path_factory.mktemp("cubes")
  start = 0
  for k, n in enumerate((10, 7, 13)):
    ids = np.arange(start, start + n, dtype=np.float64)
    np.save(root / f"bat_3_s_8x8x4_{k}.npy",
            np.broadcast_to(((ids + 1) / 1000)[:, None, None, None], (n, *CROP)).copy())
    start += n
  cfg = ml_collections.ConfigDict({"crop": CROP, "val_fraction": 0.34})
  return str(prepare_lib.prepare_npy_view(cfg, root / "*.npy", root / "view", seed=0))


def _take(it, n: int) -> list[list[int]]:
  return [_ids(next(it)) for _ in range(n)]


def test_cube_source_items_are_float32_channels_last(dataset):
  train, val = pipeline.CubeSource(dataset, "train"), pipeline.CubeSource(dataset, "val")
  assert len(train) + len(val) == 30 and len(val) in (7, 10, 13)
  cube = train[0]
  assert cube.shape == (*CROP, 1) and cube.dtype == np.float32
  ids = sorted(int(round(float(train[i].mean()) * 1000)) - 1 for i in range(len(train)))
  val_ids = sorted(int(round(float(val[i].mean()) * 1000)) - 1 for i in range(len(val)))
  assert sorted(ids + val_ids) == list(range(30))
  with pytest.raises(IndexError):
    train[len(train)]
  # Pickled for grain workers without its memmaps; the copy still reads the same cubes.
  clone = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(clone[3], train[3])
  assert repr(clone) == repr(train) and "0x" not in repr(train)


def test_cube_source_rejects_incomplete_dataset(tmp_path):
  with pytest.raises(manifest_lib.DatasetIncompleteError, match="no manifest"):
    pipeline.CubeSource(tmp_path, "train")
  with pytest.raises(ValueError, match="split"):
    pipeline.CubeSource(tmp_path, "test")


def test_pretrain_loader_is_deterministic_and_reshuffles_each_epoch(dataset):
  source = pipeline.CubeSource(dataset, "train")
  n = len(source)
  batch = 1
  a = _take(iter(pipeline.pretrain_loader(source, batch_size=batch, seed=3)), 2 * n)
  b = _take(iter(pipeline.pretrain_loader(source, batch_size=batch, seed=3)), 2 * n)
  c = _take(iter(pipeline.pretrain_loader(source, batch_size=batch, seed=4)), 2 * n)
  assert a == b and a != c
  first, second = sum(a[:n], []), sum(a[n:], [])
  assert sorted(first) == sorted(second)  # Each epoch visits every cube once...
  assert first != second  # ...in a new order.
  # grain reshuffles epoch e with seed + e: the next seed must not replay this run shifted by one.
  other = sum(_take(iter(pipeline.pretrain_loader(source, batch_size=batch, seed=4)), n), [])
  seed3_epoch1 = sum(_take(iter(pipeline.pretrain_loader(source, batch_size=batch, seed=3)), 2 * n)[n:], [])
  assert other != seed3_epoch1
  out = next(iter(pipeline.pretrain_loader(source, batch_size=6, seed=0)))
  assert set(out) == {"image"}
  assert out["image"].shape == (6, *CROP, 1) and out["image"].dtype == np.float32


def test_resume_from_iterator_state_gives_same_next_batches(dataset):
  source = pipeline.CubeSource(dataset, "train")
  loader = pipeline.pretrain_loader(source, batch_size=4, seed=7)
  it = iter(loader)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)  # Crosses an epoch boundary (5 * 4 + 24 > 2 * 17).
  resumed = iter(pipeline.pretrain_loader(source, batch_size=4, seed=7))
  resumed.set_state(state)
  assert _take(resumed, 6) == expected


def test_process_shards_are_disjoint_and_cover_the_split(dataset):
  source = pipeline.CubeSource(dataset, "train")
  per_shard = len(source) // 2
  seen = []
  for index in range(2):
    it = iter(pipeline.pretrain_loader(source, batch_size=1, seed=0, shard_index=index,
                                       shard_count=2))
    seen.append(set(sum(_take(it, per_shard), [])))
    assert len(seen[-1]) == per_shard  # One shard-epoch, no repeats.
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 2 * per_shard
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.pretrain_loader(source, batch_size=1, seed=0, shard_index=2, shard_count=2)


def test_worker_processes_match_in_process_loading_and_resume(dataset):
  source = pipeline.CubeSource(dataset, "train")
  in_process = _take(iter(pipeline.pretrain_loader(source, batch_size=3, seed=5)), 6)
  it = iter(pipeline.pretrain_loader(source, batch_size=3, seed=5, worker_count=1))
  assert _take(it, 3) == in_process[:3]
  state = it.get_state()
  resumed = iter(pipeline.pretrain_loader(source, batch_size=3, seed=5, worker_count=1))
  resumed.set_state(state)
  assert _take(resumed, 3) == in_process[3:]


def test_eval_batches_fixed_order_and_short_last_batch(dataset):
  source = pipeline.CubeSource(dataset, "val")
  batches = list(pipeline.eval_batches(source, 4))
  ids = sum((_ids(b) for b in batches), [])
  assert ids == [int(round(float(source[i].mean()) * 1000)) - 1 for i in range(len(source))]
  assert [len(b["image"]) for b in batches[:-1]] == [4] * (len(batches) - 1)
  assert len(list(pipeline.eval_batches(source, 4, max_batches=1))) == 1
  full = list(pipeline.eval_batches(source, 4, drop_remainder=True))
  assert all(len(b["image"]) == 4 for b in full) and len(full) == len(source) // 4
  halves = [sum((_ids(b) for b in pipeline.eval_batches(source, 2, shard_index=i, shard_count=2)),
                []) for i in range(2)]
  assert sorted(halves[0] + halves[1]) == sorted(ids) and not set(halves[0]) & set(halves[1])


def test_task_loader_keeps_pairs_and_covers_each_sample_once(tmp_path):
  images = np.arange(10 * 4 * 4 * 2, dtype=np.float32).reshape(10, 4, 4, 2, 1)
  labels = (images[:, 0, 0, 0, 0] // 32).astype(np.int32)  # A function of the image.
  np.save(tmp_path / "images.npy", images)
  mapped = np.load(tmp_path / "images.npy", mmap_mode="r")  # Memory-mapped volumes work as-is.
  loader = pipeline.task_loader(mapped, labels, batch_size=3, seed=1, repeat=False)
  batches = list(loader)
  assert [len(b["image"]) for b in batches] == [3, 3, 3, 1]
  firsts = np.concatenate([b["image"][:, 0, 0, 0, 0] for b in batches])
  assert sorted(firsts.tolist()) == sorted(images[:, 0, 0, 0, 0].tolist())
  for b in batches:
    np.testing.assert_array_equal(b["label"], (b["image"][:, 0, 0, 0, 0] // 32).astype(np.int32))
  again = [b["image"] for b in pipeline.task_loader(mapped, labels, batch_size=3, seed=1,
                                                     repeat=False)]
  assert all(np.array_equal(x, b["image"]) for x, b in zip(again, batches))
  shards = [{int(v) for b in pipeline.task_loader(images, labels, batch_size=1, seed=1, repeat=False,
                                                  shard_index=i, shard_count=2)
             for v in b["image"][:, 0, 0, 0, 0]} for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 5 and not shards[0] & shards[1]
  it = iter(pipeline.task_loader(images, labels, batch_size=4, seed=2))
  assert all(len(next(it)["image"]) == 4 for _ in range(6))  # Repeats with full batches.
  with pytest.raises(ValueError, match="differ in length"):
    pipeline.task_loader(images, labels[:3], batch_size=2, seed=0)
