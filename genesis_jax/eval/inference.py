"""Whole-volume segmentation inference: overlapping sliding windows, Gaussian blending, flip TTA.

A model trained on fixed-size sub-volumes (e.g. 64x64x32) is applied to a whole scan by tiling it
with windows of that size. Windows overlap by a fraction `overlap` of their size; each window's
prediction is weighted by a Gaussian centred on the window (sigma = window / 8 per axis, as in
nnU-Net), because a conv net is least reliable near a window's edge where it sees zero padding.
The result is sum(w * p) / sum(w) per voxel. Axes are channels-last: a volume is (x, y, z, C)
(or (x, y, C) in 2D) and the model returns (B, *window, K) probabilities.

Axes shorter than the window are zero-padded (centred) up to the window and the padding is cropped
from the output; zero is "air" for CT mapped to [0, 1] and background for min-max MRI.
"""
from __future__ import annotations

import functools
import gzip
import itertools
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from scipy import ndimage

from genesis_jax import errors
from genesis_jax.data import store
from genesis_jax.data.volume import Volume
from genesis_jax.eval import metrics


class InferenceInputError(errors.DataError):
  """A volume, window or model output that sliding-window inference cannot work with."""


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Window start indices along an axis of length `size` (>= window): first 0, last at the end.

  The stride is window * (1 - overlap) at most; the windows are spread evenly so the last one
  ends exactly at `size`. With overlap 0 and size a multiple of window this is an exact tiling.
  """
  if size <= window:
    return [0]
  step = max(1, int(window * (1.0 - overlap)))
  n = math.ceil((size - window) / step) + 1
  return sorted({int(round(s)) for s in np.linspace(0, size - window, n)})


def gaussian_importance(window: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """Window-shaped float32 weights, 1 at the centre, falling off as a Gaussian (sigma = w * scale).

  Strictly positive everywhere, so every voxel covered by some window gets a defined average.
  """
  axes = []
  for w in window:
    c = (w - 1) / 2.0
    sigma = max(w * sigma_scale, 1e-6)
    axes.append(np.exp(-0.5 * ((np.arange(w) - c) / sigma) ** 2))
  g = axes[0]
  for a in axes[1:]:
    g = np.multiply.outer(g, a)
  g = g / g.max()
  return np.maximum(g, np.finfo(np.float32).tiny).astype(np.float32)


def _flip_sets(ndim: int) -> list[tuple[int, ...]]:
  """Every subset of the spatial axes (1..ndim of a (B, *spatial, C) batch), the empty set first."""
  axes = range(1, ndim + 1)
  return [c for r in range(ndim + 1) for c in itertools.combinations(axes, r)]


@functools.lru_cache(maxsize=16)
def _jit_partial(func: Callable, kw_items: tuple) -> Callable:
  kw = dict(kw_items)
  return jax.jit(lambda args, x: func(*args, x, **kw))


def _jit_once(apply_fn: Callable) -> Callable:
  """jit `apply_fn`, keeping the positional arguments of a `functools.partial` as jit arguments.

  `functools.partial(model.apply, variables)` is the intended way to pass a model: the variables
  then stay device buffers fed to one compiled program, instead of being baked into it as
  constants (a closure would: slow compiles and a recompile for every new set of weights).
  The partial's keywords (e.g. train=False) are static.
  """
  if hasattr(apply_fn, "lower"):  # Already jitted.
    return apply_fn
  if isinstance(apply_fn, functools.partial) and apply_fn.args:
    try:
      jitted = _jit_partial(apply_fn.func, tuple(sorted(apply_fn.keywords.items())))
    except TypeError:  # Unhashable keywords: fall back to a plain jit of the partial.
      return jax.jit(apply_fn)
    args = apply_fn.args
    return lambda x: jitted(args, x)
  return jax.jit(apply_fn)


def sliding_window_predict(apply_fn: Callable, volume: np.ndarray, window: tuple, *,
                           overlap: float = 0.5, batch_size: int = 4, gaussian: bool = True,
                           tta_flip: bool = False, num_outputs: int | None = None) -> np.ndarray:
  """Predicts a whole volume with overlapping windows.

  Args:
    apply_fn: batch (B, *window, C) float32 -> (B, *window, K) probabilities; must be traceable
      by jax. Pass a model as `functools.partial(model.apply, variables)` (see `_jit_once`).
      It is jitted once here (or used as is if already jitted): every batch has the same
      shape, the last one padded with zeros.
    volume: (x, y, z, C) or (x, y, C), any size; axes smaller than the window are padded.
    window: spatial window size, (wx, wy, wz) or (wx, wy).
    overlap: fraction of the window shared by neighbouring windows, in [0, 1).
    batch_size: windows per forward pass.
    gaussian: weight each window by `gaussian_importance`; False = plain averaging.
    tta_flip: also predict every flip of the window (all 2**ndim subsets of spatial axes), flip
      the predictions back and average them.
    num_outputs: K, checked against the model's output if given.

  Returns:
    (x, y, z, K) (or (x, y, K)) float32 weighted average of the window predictions.
  """
  vol = np.asarray(volume, dtype=np.float32)
  window = tuple(int(w) for w in window)
  nd = len(window)
  if vol.ndim != nd + 1:
    raise InferenceInputError(
        f"volume shape {vol.shape} must be (*spatial, C) with {nd} spatial axes to match window "
        f"{window}; add a channel axis with volume[..., None]")
  if any(w < 1 for w in window):
    raise InferenceInputError(f"window {window} must be positive")
  if not 0.0 <= overlap < 1.0:
    raise InferenceInputError(f"overlap must be in [0, 1), got {overlap}")
  if batch_size < 1:
    raise InferenceInputError(f"batch_size must be >= 1, got {batch_size}")

  spatial = vol.shape[:nd]
  pad = [(max(0, w - s) // 2, max(0, w - s) - max(0, w - s) // 2) for s, w in zip(spatial, window)]
  if any(sum(p) for p in pad):
    vol = np.pad(vol, pad + [(0, 0)])
  padded = vol.shape[:nd]
  channels = vol.shape[-1]

  fwd = _jit_once(apply_fn)
  batch_shape = (batch_size, *window, channels)
  out_struct = jax.eval_shape(fwd, jax.ShapeDtypeStruct(batch_shape, jnp.float32))
  out_shape = tuple(getattr(out_struct, "shape", ()))
  if len(out_shape) != nd + 2 or out_shape[:-1] != batch_shape[:-1]:
    raise InferenceInputError(
        f"apply_fn maps {batch_shape} to {out_shape}; expected (B, *window, K) = "
        f"{(*batch_shape[:-1], 'K')}")
  k = out_shape[-1]
  if num_outputs is not None and num_outputs != k:
    raise InferenceInputError(f"apply_fn returns {k} output channels, num_outputs={num_outputs}")

  flips = _flip_sets(nd) if tta_flip else [()]

  def predict(x: np.ndarray) -> jax.Array:
    x = jnp.asarray(x)
    acc = None
    for axes in flips:
      y = fwd(jnp.flip(x, axes) if axes else x).astype(jnp.float32)  # bf16 models: sum in f32.
      y = jnp.flip(y, axes) if axes else y
      acc = y if acc is None else acc + y
    return acc / len(flips) if len(flips) > 1 else acc

  weight_map = gaussian_importance(window) if gaussian else np.ones(window, np.float32)
  weight_map = weight_map[..., None]
  out = np.zeros((*padded, k), np.float32)
  norm = np.zeros((*padded, 1), np.float32)

  starts = list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(padded, window))))

  def accumulate(y_dev: jax.Array, chunk: list[tuple[int, ...]]) -> None:
    y = np.asarray(y_dev, dtype=np.float32)
    for i, start in enumerate(chunk):
      sl = tuple(slice(s, s + w) for s, w in zip(start, window))
      out[sl] += y[i] * weight_map
      norm[sl] += weight_map

  # Dispatch batch i+1 (asynchronously) before pulling batch i back to the host, so the device
  # computes while the host gathers patches and accumulates.
  pending = None
  for b in range(0, len(starts), batch_size):
    chunk = starts[b:b + batch_size]
    x = np.zeros(batch_shape, np.float32)
    for i, start in enumerate(chunk):
      x[i] = vol[tuple(slice(s, s + w) for s, w in zip(start, window))]
    y_dev = predict(x)
    if pending is not None:
      accumulate(*pending)
    pending = (y_dev, chunk)
  accumulate(*pending)

  out /= norm
  crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad, spatial))
  return out[crop]


def segment_volume(apply_fn: Callable, data: np.ndarray, window, **kw) -> np.ndarray:
  """(x, y, z) volume -> (x, y, z, K) probabilities with a 3D model or, slice by slice, a 2D one.

  A 3D `window` slides over the volume; a 2D `window` (x, y) slides over every axial slice z.
  `kw` goes to `sliding_window_predict` (overlap, batch_size, gaussian, tta_flip, ...).
  """
  data = np.asarray(data, np.float32)
  if data.ndim != 3:
    raise InferenceInputError(f"segment_volume needs an (x, y, z) volume, got shape {data.shape}")
  if len(window) == 3:
    return sliding_window_predict(apply_fn, data[..., None], window, **kw)
  if len(window) != 2:
    raise InferenceInputError(f"window {tuple(window)} must have 2 or 3 entries")
  return np.stack([sliding_window_predict(apply_fn, data[:, :, z, None], window, **kw)
                   for z in range(data.shape[2])], axis=2)


def to_source_grid(values: np.ndarray, grid: Volume, scan: Volume, order: int) -> np.ndarray:
  """(*grid.shape[, K]) values on a preprocessed grid -> the scan's own grid (zero outside).

  The preprocessed volume differs from the scan as read by resampling and/or a body crop, both
  recorded in its affine: each scan voxel takes the value at its world position (`order` 1 =
  linear, 0 = nearest). Values already on the scan's grid are returned as they are.
  """
  if np.allclose(grid.affine, scan.affine) and grid.shape == scan.shape:
    return values
  m = np.linalg.inv(grid.affine) @ scan.affine  # scan index -> grid index
  chans = values[..., None] if values.ndim == 3 else values
  out = [ndimage.affine_transform(chans[..., k], m[:3, :3], offset=m[:3, 3],
                                  output_shape=scan.shape, order=order, mode="constant", cval=0.0)
         for k in range(chans.shape[-1])]
  out = np.stack(out, axis=-1).astype(np.float32)
  return out[..., 0] if values.ndim == 3 else out


def write_segmentation(path: str | os.PathLike, probs: np.ndarray, grid: Volume, scan: Volume, *,
                       threshold: float | None = 0.5) -> np.ndarray:
  """Writes a segmentation NIfTI on the scan's own grid: the one writer of prediction files.

  `probs` (x, y, z, K) are probabilities on `grid` (the preprocessed volume the model saw, e.g.
  from `segment_volume`); `scan` is the Volume as read (canonical RAS+). The probabilities are
  mapped back onto the scan's voxels (`to_source_grid`, linear), turned into what the file holds
  (`segmentation_output`) and written with the scan's affine, so the file overlays the scan in
  any viewer. A `.gz` name is gzip-compressed (with a fixed timestamp, so equal results give
  equal files); the file is written under a temporary name and renamed, so it is complete or
  absent. Returns what was written.
  """
  path = pathlib.Path(path)
  result = segmentation_output(to_source_grid(probs, grid, scan, order=1), threshold)
  data = segmentation_image(result, scan.affine).to_bytes()
  if path.name.endswith(".gz"):
    data = gzip.compress(data, compresslevel=6, mtime=0)
  path.parent.mkdir(parents=True, exist_ok=True)
  store.write_bytes(path, data)
  return result


def segmentation_output(probs: np.ndarray, threshold: float | None) -> np.ndarray:
  """(x, y, z, K) probabilities -> what a segmentation file holds.

  threshold None: the probabilities, float32 (x, y, z) for K = 1 or (x, y, z, K); otherwise a
  uint8 mask (K = 1, `metrics.foreground`) or label map (K > 1, argmax; threshold unused).
  """
  if threshold is None:
    return probs[..., 0] if probs.shape[-1] == 1 else probs
  if probs.shape[-1] == 1:
    return metrics.foreground(probs, threshold).astype(np.uint8)
  return np.argmax(probs, axis=-1).astype(np.uint8)


def segmentation_image(result: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  """A NIfTI image of `result` with the scan's (RAS+) affine, units mm."""
  img = nib.Nifti1Image(result, np.asarray(affine, np.float64))
  img.header.set_xyzt_units("mm")
  return img
