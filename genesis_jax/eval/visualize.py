"""PNG grids of 2D slices: corruption previews and (input, corrupted, restored) training samples.

Arrays are channels-last like everywhere in genesis_jax; `mid_slice` takes the middle axial (z)
slice of a cube (x, y, z[, C]) and shows it with x down the rows and y across the columns.

  python -m genesis_jax.eval.visualize --out corruptions.png                 # a phantom cube
  python -m genesis_jax.eval.visualize --input cubes.npy --index 3 --out c.png  # (N,x,y,z)/(x,y,z)
  python -m genesis_jax.eval.visualize --input scan.nii.gz --out c.png  # CT, HU [-1000, 1000]
"""
from __future__ import annotations

import argparse
import math
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from genesis_jax import errors


MIN_PANEL_PX = 192  # Default upscale target: a panel's long side in pixels.
LABEL_PX = 16  # Label font size in pixels.


class ImageGridError(errors.DataError):
  """Bad input to a grid: wrong rank, ragged rows, or labels that do not match."""


def mid_slice(volume, channel: int = 0) -> np.ndarray:
  """(x, y) float32 middle z slice of (x, y, z), (x, y, z, C); (x, y[, C]) images pass through.

  A trailing axis of size <= 4 is read as channels; a 3D array with a longer last axis is (x, y, z).
  """
  v = np.asarray(volume, dtype=np.float32)
  if v.ndim == 4 or (v.ndim == 3 and v.shape[-1] <= 4):
    v = v[..., channel]
  if v.ndim == 3:
    return v[:, :, v.shape[2] // 2]
  if v.ndim == 2:
    return v
  raise ImageGridError(f"mid_slice: expected (x, y[, z][, C]), got shape {np.shape(volume)}.")


def font(size: int) -> ImageFont.ImageFont:
  """Pillow's default font at `size` px (the small fixed bitmap font without FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType.
    return ImageFont.load_default()


def auto_scale(height: int, width: int, min_panel: int = MIN_PANEL_PX) -> int:
  """The least integer upscale giving a (height, width) panel `min_panel` px on its long side."""
  return max(1, math.ceil(min_panel / max(height, width, 1)))


def save_image_grid(path, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (),
                    col_labels: Sequence[str] = (), scale: int | None = None) -> pathlib.Path:
  """Write a grey PNG: rows x columns of 2D arrays in [0, 1] (clipped), labels on top/left.

  Each image is (x, y) and drawn with x down and y across, upscaled `scale` times (nearest
  neighbour, so voxels stay sharp); by default (None) enough for panels of at least
  `MIN_PANEL_PX` px, so a 32x32 slice is readable. Column titles are centred over the panels,
  row labels sit left of their row.
  """
  if not rows or not all(len(r) == len(rows[0]) for r in rows) or not rows[0]:
    raise ImageGridError(f"save_image_grid({path}): rows must be a non-empty rectangle of images.")
  if row_labels and len(row_labels) != len(rows):
    raise ImageGridError(
        f"save_image_grid({path}): {len(row_labels)} row labels, {len(rows)} rows.")
  if col_labels and len(col_labels) != len(rows[0]):
    raise ImageGridError(
        f"save_image_grid({path}): {len(col_labels)} column labels, {len(rows[0])} columns.")
  imgs = [[np.asarray(im, dtype=np.float32) for im in r] for r in rows]
  for r in imgs:
    for im in r:
      if im.ndim != 2:
        raise ImageGridError(f"save_image_grid({path}): images must be 2D, got {im.shape}.")
  h = max(im.shape[0] for r in imgs for im in r)
  w = max(im.shape[1] for r in imgs for im in r)
  scale = auto_scale(h, w) if scale is None else int(scale)
  h, w = h * scale, w * scale
  label_font = font(LABEL_PX)
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  pad = 4
  left = (max(measure.textlength(str(s), font=label_font) for s in row_labels) + 3 * pad
          if row_labels else 0)
  left = int(math.ceil(left))
  top = LABEL_PX + 3 * pad if col_labels else 0
  size = (left + len(imgs[0]) * (w + pad) + pad, top + len(imgs) * (h + pad) + pad)
  canvas = Image.new("L", size, color=32)
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(col_labels):
    draw.text((left + pad + j * (w + pad) + w // 2, top // 2), str(label), fill=255,
              font=label_font, anchor="mm")
  for i, r in enumerate(imgs):
    y0 = top + pad + i * (h + pad)
    if row_labels:
      draw.text((left - pad, y0 + h // 2), str(row_labels[i]), fill=255, font=label_font,
                anchor="rm")
    for j, im in enumerate(r):
      im = np.nan_to_num(np.clip(im, 0.0, 1.0))
      tile = Image.fromarray(np.round(im * 255).astype(np.uint8), mode="L")
      tile = tile.resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST)
      canvas.paste(tile, (left + pad + j * (w + pad), y0))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path


def corruption_grid(path, cube: np.ndarray, seeds: Sequence[int] = (0, 1, 2, 3),
                    params=None) -> pathlib.Path:
  """Rows = seeds; columns = original, each transform forced on, flip, combined pipeline.

  `cube` is (x, y, z) or (x, y, z, C) (or a 2D slice (x, y[, C])) with intensities in [0, 1].
  """
  import jax
  import jax.numpy as jnp
  from genesis_jax import corruptions

  params = params or corruptions.CorruptionParams()
  x = np.asarray(cube, dtype=np.float32)
  if x.ndim in (2, 3) and not (x.ndim == 3 and x.shape[-1] <= 4):
    x = x[..., None]
  x = jnp.asarray(x)
  ops = {
      "original": lambda k, v: v,
      "flip": lambda k, v: corruptions.flip(k, v, 1.0, params.flip_compat),
      "local shuffle": lambda k, v: corruptions.local_shuffle(k, v, params.local_blocks),
      "non-linear": corruptions.nonlinear,
      "in-painting": corruptions.inpaint,
      "out-painting": corruptions.outpaint,
      "combined": lambda k, v: corruptions.corrupt(k, v, params)[0],
  }
  # One program for every column and seed: a single compile.
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  cols = jax.jit(jax.vmap(lambda k: tuple(f(k, x) for f in ops.values())))(keys)
  rows = [[mid_slice(np.asarray(c[i])) for c in cols] for i in range(len(keys))]
  return save_image_grid(path, rows, row_labels=[f"seed {s}" for s in seeds],
                         col_labels=list(ops))


def _load_cube(args) -> np.ndarray:
  """A cube in [0, 1]: a phantom crop, a .npy (N, x, y, z) / (x, y, z) in [0, 1], or a scan."""
  if args.input is None:
    from genesis_jax.data import phantoms
    hu = phantoms.make_phantom(args.seed, shape=(96, 96, 64)).volume.data
    return _window(_centre_crop(hu, args.crop), -1000.0, 1000.0)
  p = pathlib.Path(args.input)
  if p.suffix == ".npy":
    a = np.load(p)
    if a.ndim == 4 and a.shape[-1] > 4:
      a = a[args.index]
    if a.min() < 0.0 or a.max() > 1.0:
      raise ImageGridError(f"{p}: values span [{a.min()}, {a.max()}]; expected cubes in [0, 1].")
    return a
  from genesis_jax.data import readers
  vol = readers.load_volume(p)
  return _window(_centre_crop(vol.data, args.crop), -1000.0, 1000.0)


def _centre_crop(a: np.ndarray, crop: Sequence[int]) -> np.ndarray:
  sl = []
  for s, c in zip(a.shape, crop):
    if s < c:
      raise ImageGridError(f"volume shape {a.shape} is smaller than the crop {tuple(crop)}.")
    sl.append(slice((s - c) // 2, (s - c) // 2 + c))
  return a[tuple(sl)]


def _window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description="Write a PNG grid of each Genesis corruption.")
  ap.add_argument("--input", help=".npy cubes in [0, 1] or a scan (.nii/.nii.gz/.mhd/...; CT)")
  ap.add_argument("--index", type=int, default=0, help="cube index in an (N, x, y, z) .npy")
  ap.add_argument("--crop", type=int, nargs=3, default=(64, 64, 32), help="x y z (scans only)")
  ap.add_argument("--seed", type=int, default=0, help="phantom seed when no --input")
  ap.add_argument("--rows", type=int, default=4, help="number of random draws (rows)")
  ap.add_argument("--flip-compat", action="store_true", help="the original's flip behaviour")
  ap.add_argument("--out", default="corruptions.png")
  args = ap.parse_args(argv)
  from genesis_jax import corruptions
  params = corruptions.CorruptionParams(flip_compat=args.flip_compat)
  path = corruption_grid(args.out, _load_cube(args), seeds=range(args.rows), params=params)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
