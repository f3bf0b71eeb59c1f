"""Weights of a Keras 2 `.h5` file, read with h5py alone (no TensorFlow): `read_layers(path)`.

Both layouts Keras 2 writes are read: `model.save` (layers under the group 'model_weights') and
`model.save_weights` (layers at the root). Layer order follows the file's 'layer_names'
attribute; a layer's weights are named as Keras names them ('kernel', 'bias', 'gamma', ...).

This module knows nothing about any particular network; `release.py` maps the layers it reads
onto the Genesis U-Net.
"""
from __future__ import annotations

import os

import numpy as np

from genesis_jax import errors


class KerasFileError(errors.DataError):
  """A file is not a Keras HDF5 weight file (names the file and why)."""


def _weight_name(name: str) -> str:
  """'depth_0_conv/kernel:0' -> 'kernel'."""
  return name.split("/")[-1].split(":")[0]


def _decode(name) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)


def _read(path: str) -> dict[str, dict[str, np.ndarray]]:
  import h5py  # Imported here: only Keras files need it.
  layers: dict[str, dict[str, np.ndarray]] = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    names = [_decode(n) for n in root.attrs.get("layer_names", list(root.keys()))]
    for name in names:
      if name not in root:
        continue
      group = root[name]
      weights: dict[str, np.ndarray] = {}
      weight_names = group.attrs.get("weight_names", None)
      if weight_names is not None:
        for wn in weight_names:
          wn = _decode(wn)
          weights[_weight_name(wn)] = np.asarray(group[wn])
      else:
        def visit(n, obj, weights=weights):
          if isinstance(obj, h5py.Dataset):
            weights[_weight_name(n)] = np.asarray(obj)
        group.visititems(visit)
      if weights:
        layers[name] = weights
  return layers


def read_layers(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """{layer name: {weight name ('kernel', 'gamma', ...): array}} of the layers that have weights."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise KerasFileError(f"{path}: no such file.")
  try:
    return _read(path)
  except OSError as e:
    raise KerasFileError(f"{path}: not an HDF5 file ({e}).") from e
