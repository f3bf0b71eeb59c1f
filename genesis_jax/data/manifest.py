"""A prepared dataset on disk: its manifest, shard paths, completeness checks and split.

Layout of a prepared dataset directory:

  <dir>/shards/<scan_key>.npy   float32 (N, *crop), intensities in [0, 1], axis order (x, y, z)
                                (3D) or (x, y) (2D slices); no channel axis on disk.
  <dir>/shards/<scan_key>.json  sidecar: what produced the shard (settings fingerprint, source
                                size/mtime, cube count). Written after the shard: it marks it done.
  <dir>/manifest.json           sources, split, counts, spacing, settings, library versions and the
                                skip report. Written last: a directory without it is incomplete.

A released-cubes view (`source="npy"`, the original's `bat_32_s_64x64x32_{k}.npy` files, (N, 64, 64,
32) in [0, 1]) is a directory holding only a manifest that points at the .npy files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from genesis_jax import errors
from genesis_jax.data import store

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DatasetIncompleteError(errors.DataError):
  """A dataset directory without a (valid) manifest, or with missing shards."""


class DatasetWaitTimeout(errors.EnvironmentSetupError, TimeoutError):
  """Another process did not finish preparing the dataset in time (a workdir not shared?)."""


def library_versions() -> dict[str, str]:
  """Versions of Python and the libraries that shape a dataset, recorded in its manifest."""
  versions = {"python": platform.python_version()}
  for name in ("numpy", "scipy", "nibabel", "grain", "genesis_jax"):
    try:
      module = __import__(name)
      versions[name] = str(getattr(module, "__version__", "unknown"))
    except ImportError:
      pass
  return versions


def load_manifest(dataset_dir: str | os.PathLike) -> dict:
  """The manifest of a complete dataset; DatasetIncompleteError if it is missing or broken."""
  dataset_dir = pathlib.Path(dataset_dir)
  path = dataset_dir / MANIFEST
  if not path.is_file():
    raise DatasetIncompleteError(
        f"{dataset_dir}: no {MANIFEST}; the dataset is incomplete (an interrupted prepare?). "
        "Run prepare again on the same folder to finish it.")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DatasetIncompleteError(f"{path}: unreadable manifest ({e}).") from e
  if manifest.get("format") != FORMAT_VERSION or "shards" not in manifest:
    raise DatasetIncompleteError(f"{path}: not a genesis_jax dataset manifest (format "
                                 f"{manifest.get('format')!r}, expected {FORMAT_VERSION}).")
  return manifest


def shard_path(dataset_dir: str | os.PathLike, shard: dict) -> pathlib.Path:
  """Shards are stored relative to the dataset dir, except external (released .npy) files."""
  return pathlib.Path(dataset_dir) / shard["file"]


def validate_dataset(dataset_dir: str | os.PathLike) -> dict:
  """Checks every shard the manifest names exists with its recorded shape; returns the manifest."""
  manifest = load_manifest(dataset_dir)
  crop = tuple(manifest["crop"])
  for shard in manifest["shards"]:
    path = shard_path(dataset_dir, shard)
    try:
      shape, _ = store.npy_shape(path)
    except (OSError, ValueError) as e:
      raise DatasetIncompleteError(
          f"{dataset_dir}: shard {path} is missing or unreadable ({e}).") from e
    if shape != (shard["count"], *crop):
      raise DatasetIncompleteError(
          f"{path}: shape {shape}, the manifest says {(shard['count'], *crop)}.")
  return manifest


def split_by_scan(keys: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
  """Assigns each scan (never a cube) to "train" or "val"; depends only on (seed, set of keys).

  At least one scan stays in train, and at least one goes to val when val_fraction > 0 and there
  are two or more scans.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise errors.ConfigError(f"config.data.val_fraction must be in [0, 1), got {val_fraction}.")
  keys = sorted(keys)
  order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117])).permutation(len(keys))
  n_val = int(round(val_fraction * len(keys)))
  if val_fraction > 0 and len(keys) >= 2:
    n_val = max(n_val, 1)
  n_val = min(n_val, len(keys) - 1)
  val = {keys[i] for i in order[:n_val]}
  return {k: ("val" if k in val else "train") for k in keys}


def build_manifest(shards: list[dict], settings: Any, skipped: list[dict], *, seed: int,
                   val_fraction: float, source: dict, on_error: str) -> dict:
  """The manifest of a dataset: `shards` (with their split), what made them and what was skipped.

  `settings` is the `sampling.CubeSettings` the shards were cut with.
  """
  counts = {split: {"scans": sum(s["split"] == split for s in shards),
                    "cubes": sum(s["count"] for s in shards if s["split"] == split)}
            for split in ("train", "val")}
  return {
      "format": FORMAT_VERSION,
      "crop": list(settings.crop),
      "axes": "N, x, y, z" if len(settings.crop) == 3 else "N, x, y",
      "counts": counts,
      "settings": {**{k: list(v) if isinstance(v, tuple) else v
                      for k, v in dataclasses.asdict(settings).items()},
                   "fingerprint": settings.fingerprint(), "seed": int(seed),
                   "val_fraction": val_fraction,
                   "on_error": on_error},
      "source": source,
      "shards": shards,
      "skipped": skipped,
      "versions": library_versions(),
  }


def wait_for_manifest(dataset_dir: str | os.PathLike, timeout_s: float,
                      poll_s: float = 2.0) -> None:
  """Blocks until another process (process 0 of a multi-host run) has written the manifest."""
  dataset_dir = pathlib.Path(dataset_dir)
  deadline = time.monotonic() + timeout_s
  while not (dataset_dir / MANIFEST).exists():
    if time.monotonic() > deadline:
      raise DatasetWaitTimeout(
          f"{dataset_dir}: process 0 did not finish preparing within {timeout_s:.0f} s (the "
          "workdir must be on a filesystem shared by all processes).")
    time.sleep(poll_s)
