"""Radiograph preprocessing: intensity normalisation to [0, 1] and fitting to a fixed (x, y) size
with a recorded transform, so that predictions map back to the original pixel grid.

  normalise(array, "percentile", (0.5, 99.5))   clip to the percentiles, map linearly to [0, 1]
  fit(array, (256, 256), mode="letterbox")      -> (fitted array, FitTransform)
  to_original(prediction, transform)            a mask/probability map on the original grid
  transform.to_original_points(points)          landmark coordinates on the original grid
  preprocess(image2d, size, ...)                scale, normalise and place one `images2d.Image2D`

Fit modes (both keep the aspect ratio, in mm when the pixels are not square):
  letterbox  scale so the whole image fits, centre it, pad the rest with `fill` (0 = black).
  crop       scale so the image covers the whole target, centre-crop what sticks out.
An image that would have to be enlarged is, without `upscale=True`, padded at its own resolution
(letterbox) or an `ImageTooSmallError` naming both sizes (crop).

Coordinates: arrays are (x, y) (see `images2d`). A pixel i covers [i, i + 1) in "edge"
coordinates; the fitted image is the original scaled by `scale` (output pixels per original
pixel, per axis) and shifted by `offset` (output pixels; negative where the crop cut the image):
out_edge = in_edge * scale + offset. Point coordinates are pixel indices (pixel centre at i).
Resampling is Pillow's: bilinear with a support widened by the reduction factor (antialiased)
for images and probability maps, nearest for label masks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from genesis_jax import errors

FIT_MODES = ("letterbox", "crop")
NORMS = ("percentile", "minmax")


class ImageTooSmallError(errors.DataError):
  """An image smaller than the size it must fill, with upscaling not asked for."""


@dataclasses.dataclass(frozen=True)
class FitTransform:
  """How `fit` mapped an (x, y) image onto its output: out_edge = in_edge * scale + offset."""
  original_shape: tuple[int, int]
  shape: tuple[int, int]  # The output (target) shape.
  resized_shape: tuple[int, int]  # The scaled image before padding/cropping.
  scale: tuple[float, float]  # resized_shape / original_shape, per axis.
  offset: tuple[int, int]  # Where the resized image's corner lands in the output.
  mode: str

  def to_original_points(self, points: np.ndarray) -> np.ndarray:
    """(..., 2) (x, y) pixel coordinates in the output -> the original image's."""
    points = np.asarray(points, np.float64)
    return (points + 0.5 - np.asarray(self.offset)) / np.asarray(self.scale) - 0.5

  def to_output_points(self, points: np.ndarray) -> np.ndarray:
    """(..., 2) (x, y) pixel coordinates in the original -> the output's."""
    points = np.asarray(points, np.float64)
    return (points + 0.5) * np.asarray(self.scale) + np.asarray(self.offset) - 0.5

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> FitTransform:
    return cls(original_shape=tuple(int(v) for v in d["original_shape"]),
               shape=tuple(int(v) for v in d["shape"]),
               resized_shape=tuple(int(v) for v in d["resized_shape"]),
               scale=tuple(float(v) for v in d["scale"]),
               offset=tuple(int(v) for v in d["offset"]), mode=str(d["mode"]))


# Integer-valued images spanning at most this many values get exact percentiles from a histogram.
_MAX_HISTOGRAM_BINS = 1 << 20


def percentiles_of(array: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
  """np.percentile(array, qs) (its default "linear" method), exactly; for integer-valued images
  (8/16-bit files, DICOM stored values) from a histogram, which is several times faster than the
  sorts np.percentile does on a 1024 x 1024 image."""
  flat = np.asarray(array).ravel()
  lo, hi = float(flat.min()), float(flat.max())
  if hi - lo >= _MAX_HISTOGRAM_BINS or not np.array_equal(flat, np.floor(flat)):
    return tuple(float(q) for q in np.percentile(flat, qs))
  counts = np.cumsum(np.bincount((flat - lo).astype(np.int64)))
  out = []
  for q in qs:
    h = (flat.size - 1) * float(q) / 100.0
    k = int(np.floor(h))
    # The value at sorted rank r is the first bin whose cumulative count exceeds r.
    v0, v1 = np.searchsorted(counts, [k, min(k + 1, flat.size - 1)], side="right") + lo
    out.append(float(v0 + (h - k) * (v1 - v0)))
  return tuple(out)


def normalise(array: np.ndarray, method: str = "percentile",
              percentiles: Sequence[float] = (0.5, 99.5), *, name: str = "") -> np.ndarray:
  """float32 in [0, 1]: clip to the (lo, hi) percentiles and map linearly ("percentile"), or map
  min..max ("minmax"). A constant image is a DataError naming `name` (nothing to learn from)."""
  if method not in NORMS:
    raise errors.ConfigError(f"normalisation {method!r}: expected one of {NORMS}.")
  array = np.asarray(array, np.float32)
  lo, hi = float(array.min()), float(array.max())
  if lo == hi:
    raise errors.DataError(f"{name or '<image>'}: constant image (every pixel is {lo:g}).")
  if method == "percentile":
    p_lo, p_hi = (float(p) for p in percentiles)
    if not 0.0 <= p_lo < p_hi <= 100.0:
      raise errors.ConfigError(f"percentiles {tuple(percentiles)}: need 0 <= lo < hi <= 100.")
    q_lo, q_hi = percentiles_of(array, (p_lo, p_hi))
    if q_hi > q_lo:  # Else (mostly one value) min..max, which is still informative.
      lo, hi = q_lo, q_hi
  out = (array - np.float32(lo)) * np.float32(1.0 / (hi - lo))
  return np.clip(out, 0.0, 1.0, out=out)


def _plan(shape: tuple[int, int], size: tuple[int, int], spacing: tuple[float, float],
          mode: str, upscale: bool, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """(resized shape, offset) for fitting `shape` into `size` keeping the physical aspect."""
  extent = np.asarray(shape, np.float64) * np.asarray(spacing, np.float64)  # mm
  target = np.asarray(size, np.float64)
  # Output pixel size in mm (square output pixels): the whole image fits / the target is covered.
  pixel = (extent / target).max() if mode == "letterbox" else (extent / target).min()
  resized = np.maximum(np.rint(extent / pixel), 1).astype(int)
  if not upscale and (resized > np.asarray(shape)).any():
    if mode == "crop":
      raise ImageTooSmallError(
          f"{name or '<image>'}: image of {shape[0]} x {shape[1]} pixels (x, y) is smaller than "
          f"the {size[0]} x {size[1]} it must cover; use fit mode 'letterbox' (pad) or allow "
          "upscaling (config.data.image_upscale=True).")
    pixel = max(pixel, float(np.max(spacing)))  # Never enlarge: pad at (at most) native size.
    resized = np.minimum(np.maximum(np.rint(extent / pixel), 1).astype(int), shape)
  offset = (target.astype(int) - resized) // 2
  return tuple(int(v) for v in resized), tuple(int(v) for v in offset)


def _resize(array: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
  """(x, y) float array -> `shape` with Pillow (mode 'F' keeps float32 precision)."""
  if tuple(array.shape) == tuple(shape):
    return np.asarray(array, np.float32)
  img = Image.fromarray(np.ascontiguousarray(np.asarray(array, np.float32).T), mode="F")
  resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
  return np.asarray(img.resize((int(shape[0]), int(shape[1])), resample=resample)).T


def _place(src: np.ndarray, out_shape: tuple[int, int], offset: tuple[int, int],
           fill: float) -> np.ndarray:
  """`src` placed at `offset` in a `fill`ed array of `out_shape` (parts outside are cut off)."""
  out = np.full(tuple(out_shape) + src.shape[2:], fill, dtype=src.dtype)
  sl_out, sl_src = [], []
  for n, m, o in zip(out_shape, src.shape[:2], offset):
    lo, hi = max(o, 0), min(o + m, n)
    sl_out.append(slice(lo, max(hi, lo)))
    sl_src.append(slice(lo - o, max(hi, lo) - o))
  out[tuple(sl_out)] = src[tuple(sl_src)]
  return out


def fit(array: np.ndarray, size: Sequence[int], *, mode: str = "letterbox",
        spacing: Sequence[float] = (1.0, 1.0), upscale: bool = False, fill: float = 0.0,
        name: str = "") -> tuple[np.ndarray, FitTransform]:
  """Fits an (x, y) image to `size` (x, y) keeping its aspect; returns (float32 image, transform).

  Args:
    array: the (x, y) image (intensities already normalised, if they should be).
    size: the output (x, y) shape.
    mode: "letterbox" (whole image, padded) or "crop" (target covered, centre-cropped).
    spacing: (sx, sy) pixel size; the aspect kept is the physical one.
    upscale: allow enlarging; otherwise letterbox pads at native size and crop raises
      ImageTooSmallError.
    fill: the padding value.
    name: the file, for error messages.
  """
  if mode not in FIT_MODES:
    raise errors.ConfigError(f"fit mode {mode!r}: expected one of {FIT_MODES}.")
  array = np.asarray(array, np.float32)
  if array.ndim != 2:
    raise errors.DataError(f"{name or '<image>'}: expected an (x, y) image, got {array.shape}.")
  return _fit(array, size, mode, spacing, upscale, fill, name, None)


def _fit(array, size, mode, spacing, upscale, fill, name, on_resized
         ) -> tuple[np.ndarray, FitTransform]:
  """`fit`, with `on_resized` (if any) applied to the scaled image before it is placed."""
  size = (int(size[0]), int(size[1]))
  shape = (int(array.shape[0]), int(array.shape[1]))
  resized_shape, offset = _plan(shape, size, (float(spacing[0]), float(spacing[1])), mode,
                                upscale, name)
  resized = _resize(array, resized_shape, nearest=False)
  if on_resized is not None:
    resized = on_resized(resized)
  out = _place(resized, size, offset, fill)
  scale = (resized_shape[0] / shape[0], resized_shape[1] / shape[1])
  return out, FitTransform(original_shape=shape, shape=size, resized_shape=resized_shape,
                           scale=scale, offset=offset, mode=mode)


def to_original(prediction: np.ndarray, transform: FitTransform, *, nearest: bool | None = None,
                fill: float = 0.0) -> np.ndarray:
  """A prediction on the fitted grid ((x, y) or (x, y, C)) -> the original image's grid.

  nearest: nearest-neighbour resampling (label masks); default: True for integer/bool arrays,
  bilinear for floats (probabilities, heat maps). Original pixels outside the output (cropped
  away) get `fill`. The result has the prediction's dtype.
  """
  prediction = np.asarray(prediction)
  if tuple(prediction.shape[:2]) != tuple(transform.shape):
    raise errors.DataError(f"prediction of shape {prediction.shape} does not match the fitted "
                           f"shape {transform.shape}.")
  if nearest is None:
    nearest = prediction.dtype.kind in "biu"
  dtype = prediction.dtype
  values = prediction.astype(np.float32)
  # Output grid -> the resized image's grid (undo the padding/cropping).
  resized = _place(values, transform.resized_shape,
                   (-transform.offset[0], -transform.offset[1]), fill)
  if resized.ndim == 2:
    back = _resize(resized, transform.original_shape, nearest)
  else:
    back = np.stack([_resize(resized[..., c], transform.original_shape, nearest)
                     for c in range(resized.shape[2])], axis=-1)
  if dtype.kind in "biu":
    back = np.rint(back)
  return back.astype(dtype)


def preprocess(image: Any, size: Sequence[int], *, mode: str = "letterbox", upscale: bool = False,
               norm: str = "percentile", percentiles: Sequence[float] = (0.5, 99.5)
               ) -> tuple[np.ndarray, FitTransform]:
  """An `images2d.Image2D` -> (float32 (x, y) of `size` in [0, 1], transform).

  The image is scaled first, then normalised (the percentiles are those of the scaled image,
  the one the network sees, padding excluded), then placed; the padding is 0. Normalising the
  scaled image rather than the original also keeps the cost of a 2048 x 2500 radiograph's
  percentiles small.
  """
  if mode not in FIT_MODES:
    raise errors.ConfigError(f"fit mode {mode!r}: expected one of {FIT_MODES}.")
  return _fit(np.asarray(image.array, np.float32), size, mode, image.spacing, upscale, 0.0,
              image.path, lambda a: normalise(a, norm, percentiles, name=image.path))
