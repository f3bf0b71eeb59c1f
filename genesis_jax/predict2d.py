"""`mode=predict` for a run fine-tuned on 2D images (radiographs): outputs on each original image.

  python -m genesis_jax.main --config configs/finetune_xray_seg.py --workdir runs/xray_seg \
      --config.mode=predict --config.predict.input=/data/new_radiographs

A run is a 2D image run when it fine-tuned on image files (data/tasks/images2d_tasks.py: the
built-in radiographs or a folder of PNG/JPEG/TIFF/DICOM/single-slice NIfTI images; task kinds
"multilabel" and "segment"). Every input image (a file, a folder searched recursively, or a glob)
is preprocessed exactly as in training (images2d_tasks: read, normalised to [0, 1] by its 0.5 /
99.5 percentiles, letterboxed to the run's data.crop) and the model's output is mapped back by
undoing that letterbox (`unletterbox`):

  segment     <output>/<stem>_pred.png: uint8 mask (probability >= predict.threshold) or label
              map (argmax, several classes) at the original image's size; with
              predict.probabilities also <stem>_prob.tif, the float32 foreground probability.
  multilabel  <output>/predictions.csv: `image` (the file name), then one probability column per
              finding, named as the run's classes (its eval.json).

A 2D image run given 3D volumes, or a 3D run given 2D images, is a DataError naming the file.
Unreadable images stop the run naming the file, or with predict.on_error="skip" are listed under
"failed" in predictions.json, as for 3D scans.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import pathlib
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data import readers
from genesis_jax.data import store
from genesis_jax.data.tasks import images2d_tasks
from genesis_jax.eval import inference
from genesis_jax.eval import metrics

# 2D-only files: a 3D run given one of these was given a radiograph, not a scan.
PLAIN_IMAGE_SUFFIXES = images2d.PIL_SUFFIXES


class DimensionMismatchError(errors.DataError):
  """2D images given to a 3D run, or 3D volumes given to a 2D image run."""


def is_image_run(run_cfg) -> bool:
  """Whether the fine-tuning run `run_cfg` (its config.json) was trained on 2D image files."""
  if str(run_cfg.task.kind) == "multilabel":
    return True
  return int(run_cfg.model.get("spatial_dims", 3)) == 2 and images2d_tasks.is_image_task(run_cfg)


# ------------------------------------------------------------------------------ geometry
def letterbox_box(shape, crop) -> tuple[tuple[int, int], tuple[int, int]]:
  """Where images2d_tasks.letterbox puts an image of `shape` (x, y) in `crop`: (the scaled
  image's (nw, nh), its corner (ox, oy) in the crop). The same arithmetic as letterbox (tests
  check the two agree)."""
  cx, cy = (int(c) for c in crop)
  w, h = (int(s) for s in shape)
  scale = min(cx / w, cy / h)
  nw, nh = max(1, min(cx, int(round(w * scale)))), max(1, min(cy, int(round(h * scale))))
  return (nw, nh), ((cx - nw) // 2, (cy - nh) // 2)


def unletterbox(pred: np.ndarray, original_shape, *, order: int) -> np.ndarray:
  """A prediction on the letterboxed grid ((cx, cy) or (cx, cy, K)) -> the original (x, y) grid.

  The inverse of images2d_tasks.letterbox: the scaled image's box is cut out of the crop and
  zoomed back by the same scipy zoom (grid_mode, edges repeated), `order` 0 (nearest: masks,
  label maps) or 1 (linear: probabilities). Keeps the dtype.
  """
  pred = np.asarray(pred)
  w, h = (int(s) for s in original_shape)
  (nw, nh), (ox, oy) = letterbox_box((w, h), pred.shape[:2])
  inner = pred[ox:ox + nw, oy:oy + nh]
  if (nw, nh) == (w, h):
    return inner.copy()
  zoom = (w / nw, h / nh) + (1.0,) * (pred.ndim - 2)
  back = ndimage.zoom(inner, zoom, order=order, mode="nearest", grid_mode=True)
  back = back[:w, :h]
  if back.shape[:2] != (w, h):  # Rounding in zoom: repeat the last row/column.
    pad = [(0, w - back.shape[0]), (0, h - back.shape[1])] + [(0, 0)] * (pred.ndim - 2)
    back = np.pad(back, pad, mode="edge")
  return back.astype(pred.dtype)


def load_for_model(path, crop) -> tuple[np.ndarray, tuple[int, int]]:
  """(letterboxed float32 (cx, cy) image, the original (x, y) shape): images2d_tasks.load_image's
  preprocessing (tests check the two agree) plus the shape needed to map back."""
  img = images2d.read_image(path)
  out, _ = images2d_tasks.letterbox(images2d_tasks.normalise(img.array), crop, order=1,
                                    path=str(path))
  return out, tuple(int(s) for s in img.array.shape)


# -------------------------------------------------------------------------------- inputs
def find_images(spec: str) -> list[pathlib.Path]:
  """An image file, a folder of images (recursive), or a glob; 3D volumes are refused."""
  if not spec:
    raise errors.ConfigError("config.predict.input is empty: give an image, a folder of images "
                             "or a glob.")
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    found = sorted(p for p in path.rglob("*") if p.is_file() and images2d.is_image_file(p))
    # Volume files (MetaImage, NRRD); NIfTI is checked below, DICOM files are read one by one.
    try:
      scans = [p for p in readers.find_scans(path)
               if not p.is_dir() and not images2d.is_image_file(p)]
    except readers.VolumeReadError:  # No volume files at all: the expected case.
      scans = []
    if scans:
      raise _volume_given(scans[0])
    if not found:
      raise errors.MissingPathError(f"config.predict.input={spec!r}: no 2D image files (PNG, "
                                    f"JPEG, TIFF, DICOM, single-slice NIfTI) in this folder.")
  elif path.exists():
    found = [path]
  else:
    found = sorted(pathlib.Path(m) for m in glob.glob(os.path.expanduser(spec)))
    if not found:
      raise errors.MissingPathError(f"config.predict.input={spec!r}: no such file, folder or "
                                    f"glob match; give an image, a folder of images or a glob.")
  for p in found:
    if p.is_dir() or not images2d.is_image_file(p):
      raise _volume_given(p)
    if p.name.lower().endswith(readers.NIFTI_SUFFIXES):
      shape = _nifti_shape(p)
      if shape is not None and len([s for s in shape if s > 1]) > 2:
        raise _volume_given(p, f" (a {' x '.join(map(str, shape))} NIfTI)")
  return found


def _nifti_shape(path: pathlib.Path):
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  try:
    return tuple(int(s) for s in nib.load(str(path)).shape)
  except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read.
    return None


def _volume_given(path: pathlib.Path, what: str = "") -> DimensionMismatchError:
  return DimensionMismatchError(
      f"{path}{what}: a 3D volume, but this run is a 2D image model (fine-tuned on radiographs "
      f"or other 2D images); predict it with a 3D run, or give 2D images (PNG, JPEG, TIFF, DICOM "
      f"or single-slice NIfTI).")


def check_not_images(spec: str, run_cfg=None) -> None:
  """For a 3D run: refuses 2D image files (PNG, JPEG, TIFF) given as input, naming one: a file
  or glob match, or a folder that holds images but no scans (a folder of scans may also hold
  images, e.g. previews, which the 3D path ignores)."""
  hint = ""
  if run_cfg is not None and int(run_cfg.model.get("spatial_dims", 3)) == 2:
    d = run_cfg.data
    if d.get("source") == "folder" and not pathlib.Path(str(d.get("path", ""))).is_dir():
      hint = (f" (the run's training folder config.data.path={d.get('path')!r} is gone, so "
              f"predict cannot tell whether it was fine-tuned on 2D image files: restore it)")
  path = pathlib.Path(str(spec)).expanduser()
  if path.is_dir():
    try:
      if readers.find_scans(path):
        return
    except readers.VolumeReadError:
      pass
    candidates = (p for p in path.rglob("*") if p.is_file())
  elif path.exists():
    candidates = iter([path])
  else:
    candidates = (pathlib.Path(m) for m in glob.glob(os.path.expanduser(str(spec))))
  for p in candidates:
    if p.name.lower().endswith(PLAIN_IMAGE_SUFFIXES) and not p.name.startswith("."):
      raise DimensionMismatchError(
          f"{p}: a 2D image, but this run segments or classifies 3D volumes{hint}; predict 2D "
          f"images with a run fine-tuned on 2D images (configs/finetune_xray_seg.py, "
          f"configs/finetune_xray_cls.py), or give 3D scans.")


def by_stem(paths: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """stem (file name without its image suffix and nnU-Net's _0000) -> path; duplicates refused."""
  out: dict[str, pathlib.Path] = {}
  for p in paths:
    stem = images2d_tasks.images2d_stem(p)
    stem = stem[:-5] if stem.endswith("_0000") else stem
    if stem in out:
      raise errors.ConfigError(f"two inputs have the name {stem!r}: {out[stem]} and {p}; their "
                               f"outputs would collide. Predict them in separate runs "
                               f"(predict.output).")
    out[stem] = p
  return out


def skip_or_raise(path, error: ValueError, p, failed: list, noun: str) -> None:
  """An input that could not be read or preprocessed (2D images here, 3D scans in predict.py):
  with predict.on_error="raise" a DataError naming `path` (a DataError keeps its class), with
  "skip" printed and recorded in `failed`."""
  if p.on_error == "raise":
    bad = type(error) if isinstance(error, errors.DataError) else errors.DataError
    raise bad(("" if str(path) in str(error) else f"{path}: ") + f"{error} Set "
              f"config.predict.on_error='skip' to skip such {noun} (they are listed under "
              "'failed' in predictions.json).") from error
  print(f"predict: skipped {path}: {error}", flush=True)
  failed.append({"scan": str(path), "error": str(error)})


def _read_or_skip(path, crop, p, failed: list):
  """load_for_model, or None after recording a failure (on_error="skip")."""
  try:
    return load_for_model(path, crop)
  except ValueError as e:  # DataError / ImageReadError / ImageTooSmallError
    skip_or_raise(path, e, p, failed, "images")
    return None


# -------------------------------------------------------------------------------- outputs
def _png_bytes(array_xy: np.ndarray, mode: str | None = None) -> bytes:
  """An (x, y) array as image-file bytes (the file's rows are y); TIFF for float32."""
  buf = io.BytesIO()
  img = Image.fromarray(np.ascontiguousarray(array_xy.T), mode=mode)
  img.save(buf, format="TIFF" if array_xy.dtype == np.float32 else "PNG")
  return buf.getvalue()


def segment_all(config, run_cfg, apply: Callable, images: dict[str, pathlib.Path],
                out_dir: pathlib.Path, result: dict) -> None:
  """Segments every image of `images` (by_stem) into out_dir, recording each output in
  `result` as it is written."""
  p = config.predict
  crop = tuple(int(c) for c in run_cfg.data.crop)
  written, kept, failed = result["written"], result["kept"], result["failed"]
  for stem, path in images.items():
    out = out_dir / f"{stem}_pred.png"
    prob_out = out_dir / f"{stem}_prob.tif"
    if out.exists() and (prob_out.exists() or not p.probabilities) and not p.overwrite:
      kept.append(str(out))
      continue
    loaded = _read_or_skip(path, crop, p, failed)
    if loaded is None:
      continue
    x, shape = loaded
    probs = inference.segment_volume(apply, x[..., None], crop, overlap=float(config.eval.overlap),
                                     tta_flip=bool(config.eval.tta_flip),
                                     batch_size=int(p.batch_size))[:, :, 0]  # (cx, cy, K)
    mask = unletterbox(inference.segmentation_output(probs, float(p.threshold)), shape, order=0)
    entry: dict[str, Any] = {"scan": str(path), "output": str(out), "shape": list(shape)}
    if p.probabilities:
      fg = unletterbox(metrics.foreground_probability(probs), shape, order=1)
      store.write_bytes(prob_out, _png_bytes(fg.astype(np.float32), "F"))
      entry["probabilities"] = str(prob_out)
    store.write_bytes(out, _png_bytes(mask.astype(np.uint8), "L"))
    counts = np.bincount(mask.reshape(-1), minlength=2)
    entry["foreground_pixels"] = {str(k): int(counts[k]) for k in range(1, len(counts))}
    written.append(entry)
    print(f"predict: {path} -> {out}", flush=True)


def class_names(run_cfg, workdir: pathlib.Path, n_class: int) -> list[str]:
  """The run's findings in class order: its eval.json "classes", else those of its training
  folder (images2d_tasks.findings_of), else p_0 .. p_{K-1}."""
  ev = workdir / "eval.json"
  if ev.is_file():
    names = json.loads(ev.read_text()).get("classes")
    if names and len(names) == n_class:
      return [str(n) for n in names]
  d = run_cfg.data
  root = pathlib.Path(d.path) if d.get("path") else workdir / images2d_tasks.XRAY_DIR
  csv_path = pathlib.Path(d.candidates) if d.get("candidates") else root / "labels.csv"
  if csv_path.is_file():
    from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
    names = images2d_tasks.findings_of(root, xray_dataset.read_labels_csv(csv_path))
    if len(names) == n_class:
      return names
  return [f"p_{k}" for k in range(n_class)]


def classify_all(config, run_cfg, apply: Callable, images: dict[str, pathlib.Path],
                 workdir: pathlib.Path, out_dir: pathlib.Path, result: dict) -> None:
  """One row of class probabilities per image in <out_dir>/predictions.csv."""
  p = config.predict
  out = out_dir / "predictions.csv"
  if out.exists() and not p.overwrite:
    raise errors.ConfigError(f"{out} exists; set config.predict.overwrite=True to replace it, or "
                             f"choose another config.predict.output.")
  n_class = int(run_cfg.task.n_class)
  names = class_names(run_cfg, workdir, n_class)
  crop = tuple(int(c) for c in run_cfg.data.crop)
  rows = io.StringIO()
  w = csv.writer(rows)
  w.writerow(["image", *names])
  batch, pending = int(p.batch_size), []

  def flush():
    probs = np.asarray(apply(np.stack([x for _, x in pending])[..., None])).reshape(
        len(pending), n_class)
    for (path, _), pr in zip(pending, probs):
      w.writerow([path.name, *(f"{v:.6f}" for v in pr)])
    pending.clear()

  n = 0
  for path in images.values():
    loaded = _read_or_skip(path, crop, p, result["failed"])
    if loaded is None:
      continue
    pending.append((path, loaded[0]))
    n += 1
    if len(pending) == batch:
      flush()
  if pending:
    flush()
  store.write_bytes(out, rows.getvalue().encode())
  print(f"predict: {n} images -> {out}", flush=True)
  result["written"].append(str(out))
  result.update(n=n, classes=names)
