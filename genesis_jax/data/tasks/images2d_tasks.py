"""Target tasks on 2D images (radiographs): multi-label classification and 2D segmentation.

Two layouts, both written by the built-in radiographs (`data.source="phantom_xray"`,
genesis_jax/data/phantoms/xray_dataset.py) and readable from a user's folder (`data.source=
"folder"` with `model.spatial_dims=2` and image files in it):

  multilabel  <root>/labels.csv (or config.data.candidates): ChestX-ray8 style, columns
              `Image Index,Finding Labels[,Patient ID,View Position]`, findings joined by "|" or
              "No Finding"; images at <root>/imagesTr/<Image Index>, <root>/images/<...> or
              <root>/<...>. Class k is finding k of dataset.json's "findings" (else the sorted
              findings of the CSV); config.task.n_class must equal their number.
  segment     <root>/imagesTr/<case>_0000.png and <root>/labelsTr/<case>.png (MSD / nnU-Net 2D);
              label values are class ids.

Every image is read with data/images2d.read_image, normalised to [0, 1] by its 0.5 and 99.5
percentiles and letterboxed to config.data.crop: scaled (down) to fit, keeping its aspect ratio,
and centred on a zero background. An image smaller than the crop along both scaled axes would have
to be enlarged and is refused (`ImageTooSmallError`). Cases (the split unit) are patients: both
views of a subject stay in one split. One sample per image; the segmentation test set is the same
letterboxed images as single-slice volumes, so the fine-tuning's whole-volume test runs on them.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data.volume import Volume

PERCENTILES = (0.5, 99.5)
XRAY_DIR = "xrays"  # <workdir>/xrays: where data.source="phantom_xray" writes by default.


class ImageTooSmallError(errors.DataError):
  """A 2D image smaller than config.data.crop (letterboxing would have to enlarge it)."""


def is_image_task(config) -> bool:
  """Whether `config` fine-tunes on 2D image files (built-in radiographs or a folder of them)."""
  d = config.data
  if d.source == "phantom_xray":
    return True
  if d.source != "folder" or int(config.model.spatial_dims) != 2 or not d.path:
    return False
  root = pathlib.Path(d.path)
  if (root / "labels.csv").is_file():
    return True
  images = root / "imagesTr"
  return images.is_dir() and any(images2d.is_image_file(p) and not p.name.lower().endswith(
      (".nii", ".nii.gz")) for p in images.iterdir())


def root_folder(config, workdir: pathlib.Path) -> pathlib.Path:
  d = config.data
  if d.source == "phantom_xray":
    from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
    root = pathlib.Path(d.path) if d.path else workdir / XRAY_DIR
    n = int(d.train_cases + d.val_cases + d.test_cases)  # One subject per case.
    return xray_dataset.write_xray_dataset(root, n, int(d.phantom_seed), tuple(d.phantom_shape))
  root = pathlib.Path(d.path)
  if not root.is_dir():
    raise errors.MissingPathError(f"config.data.path={d.path!r}: no such folder of 2D images.")
  return root


def normalise(image: np.ndarray) -> np.ndarray:
  """Clip to the (0.5, 99.5) percentiles and map to [0, 1] (float32; constant -> zeros)."""
  lo, hi = np.percentile(image, PERCENTILES)
  if hi <= lo:
    return np.zeros(image.shape, np.float32)
  return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def letterbox(image: np.ndarray, crop, *, order: int, path: str = "") -> tuple[np.ndarray, float]:
  """(x, y) image -> `crop` (x, y), scaled by one factor to fit and centred on zeros; (out, scale).

  order 1 (linear) for images, 0 (nearest) for label maps. Raises ImageTooSmallError when the
  image would have to be enlarged (scale > 1)."""
  cx, cy = (int(c) for c in crop)
  w, h = image.shape
  scale = min(cx / w, cy / h)
  if scale > 1.0:
    raise ImageTooSmallError(
        f"{path or 'image'}: {w} x {h} pixels is smaller than config.data.crop=({cx}, {cy}) "
        f"(it would have to be enlarged {scale:.2f}x); use a smaller crop or larger images.")
  nw, nh = max(1, min(cx, int(round(w * scale)))), max(1, min(cy, int(round(h * scale))))
  if (nw, nh) != (w, h):
    image = ndimage.zoom(image, (nw / w, nh / h), order=order, mode="nearest", grid_mode=True)
    image = image[:nw, :nh]
  out = np.zeros((cx, cy), image.dtype)
  ox, oy = (cx - image.shape[0]) // 2, (cy - image.shape[1]) // 2
  out[ox:ox + image.shape[0], oy:oy + image.shape[1]] = image
  return out, scale


def load_image(path, crop) -> tuple[np.ndarray, tuple[float, float]]:
  """A 2D image file -> letterboxed float32 (x, y) in [0, 1] and its pixel size after scaling."""
  img = images2d.read_image(path)
  out, scale = letterbox(normalise(img.array), crop, order=1, path=str(path))
  return out, (img.spacing[0] / scale, img.spacing[1] / scale)


def load_label(path, crop) -> np.ndarray:
  """A 2D label map file -> letterboxed uint8 (x, y) class ids."""
  img = images2d.read_image(path)
  return letterbox(np.rint(img.array).astype(np.uint8), crop, order=0, path=str(path))[0]


def findings_of(root: pathlib.Path, rows: list[dict]) -> list[str]:
  """Class order: dataset.json's "findings", else the sorted findings of the CSV."""
  meta = root / "dataset.json"
  if meta.is_file():
    found = json.loads(meta.read_text()).get("findings")
    if found:
      return [str(f) for f in found]
  return sorted({f for r in rows for f in r["findings"]})


def _image_path(root: pathlib.Path, name: str, csv_path: pathlib.Path) -> pathlib.Path:
  for folder in (root / "imagesTr", root / "images", root):
    if (folder / name).is_file():
      return folder / name
  raise errors.MissingPathError(f"{csv_path}: image {name!r} is in none of {root}/imagesTr, "
                                f"{root}/images or {root}.")


def load_multilabel(config, root: pathlib.Path, split_ids: Callable) -> dict[str, Any]:
  from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
  d = config.data
  csv_path = pathlib.Path(d.candidates) if d.candidates else root / xray_dataset.LABELS_CSV
  rows = xray_dataset.read_labels_csv(csv_path)
  classes = findings_of(root, rows)
  if int(config.task.n_class) != len(classes):
    raise errors.ConfigError(
        f"config.task.n_class={config.task.n_class} but {csv_path} has {len(classes)} findings "
        f"{classes}; set config.task.n_class={len(classes)}.")
  index = {f: k for k, f in enumerate(classes)}
  unknown = sorted({f for r in rows for f in r["findings"]} - set(index))
  if unknown:
    raise errors.DataError(f"{csv_path}: findings {unknown} are not in {root}/dataset.json's "
                           f"findings {classes}.")
  split = split_ids(sorted({r["patient"] for r in rows}), d, f"multi-label data at {csv_path}")
  out: dict[str, Any] = {"split": split, "case_ids": {}, "classes": classes}
  for k, patients in split.items():
    chosen = [r for r in rows if r["patient"] in set(patients)]
    x = np.stack([load_image(_image_path(root, r["image"], csv_path), d.crop)[0]
                  for r in chosen])[..., None]
    y = np.zeros((len(chosen), len(classes)), np.float32)
    for i, r in enumerate(chosen):
      y[i, [index[f] for f in r["findings"]]] = 1.0
    if k == "val" and not np.any(y.min(axis=0) < y.max(axis=0)):
      raise errors.DataError(f"{csv_path}: every finding is constant over the validation split "
                             f"({len(patients)} patients), so no AUC is defined; raise "
                             "config.data.val_cases.")
    out[k] = (x, y)
    out["case_ids"][k] = np.array([r["patient"] for r in chosen])
  return out


def load_segmentation(config, root: pathlib.Path, manifest: dict | None,
                      split_ids: Callable) -> dict[str, Any]:
  from genesis_jax.data.tasks import segmentation  # pylint: disable=import-outside-toplevel
  d = config.data
  images, labels = root / "imagesTr", root / "labelsTr"
  for folder in (images, labels):
    if not folder.is_dir():
      raise errors.MissingPathError(f"{folder}: missing; a 2D segmentation folder holds "
                                    "imagesTr/<case>_0000.png and labelsTr/<case>.png.")
  label_files = {images2d_stem(p): p for p in labels.iterdir() if images2d.is_image_file(p)}
  cases = {}
  for p in sorted(images.iterdir()):
    if not images2d.is_image_file(p):
      continue
    case = images2d_stem(p)
    case = case[:-5] if case.endswith("_0000") else case
    if case not in label_files:
      raise errors.DataError(f"{labels}: no label for image {p} (expected labelsTr/{case}.png).")
    cases[case] = (p, label_files[case])
  if not cases:
    raise errors.DataError(f"{images}: no 2D image files.")
  done = (manifest or {}).get("done", {})
  patient = {c: done.get(c, {}).get("patient", c) for c in cases}
  split = split_ids(sorted(set(patient.values())), d, f"2D segmentation data at {root}")
  num_classes = segmentation.read_num_classes(root)
  out: dict[str, Any] = {"split": split, "case_ids": {}}
  for k, patients in split.items():
    chosen = [c for c in sorted(cases) if patient[c] in set(patients)]
    xs, ys, vols = [], [], []
    for c in chosen:
      x, spacing = load_image(cases[c][0], d.crop)
      y = load_label(cases[c][1], d.crop)
      if num_classes is not None and int(y.max()) >= num_classes:
        raise errors.DataError(f"{cases[c][1]}: label {int(y.max())} but dataset.json lists "
                               f"{num_classes} classes.")
      xs.append(x)
      ys.append(y)
      affine = np.diag([*spacing, 1.0, 1.0])
      vols.append((Volume(x[..., None], affine, str(cases[c][0])), y[..., None]))
    out["case_ids"][k] = np.array([patient[c] for c in chosen])
    if k == "test":
      out["test_volumes"] = vols
    else:
      out[k] = (np.stack(xs)[..., None], np.stack(ys)[..., None])
  return out


def images2d_stem(path: pathlib.Path) -> str:
  """File name without its image suffix (.png, .tif, .nii.gz, ...)."""
  name = path.name
  for s in sorted(images2d.IMAGE_SUFFIXES, key=len, reverse=True):
    if name.lower().endswith(s):
      return name[:-len(s)]
  return name


def load(config, workdir, split_ids: Callable) -> dict[str, Any]:
  """Like tasks.load for 2D images: multilabel {"train", "val", "test": (x (N, *crop, 1),
  y (N, K) 0/1)}; segment {"train", "val": (x, y (N, *crop, 1) uint8), "test_volumes"}; both with
  "split" and "case_ids". `split_ids(sorted ids, config.data, what)` is tasks.split_ids (passed
  in: tasks.dataset imports this module)."""
  from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
  d = config.data
  if len(tuple(d.crop)) != 2:
    raise errors.ConfigError(f"config.data.crop={tuple(d.crop)}: 2D image tasks need a 2-entry "
                             "crop (x, y) and config.model.spatial_dims=2.")
  root = root_folder(config, pathlib.Path(workdir))
  kind = config.task.kind
  if kind == "multilabel":
    return load_multilabel(config, root, split_ids)
  if kind == "segment":
    if config.eval.write_predictions:  # Checked before any training, not after it.
      raise errors.ConfigError("config.eval.write_predictions writes NIfTI predictions on a "
                               "scan's grid; 2D image tasks do not write them yet: set it False.")
    manifest_path = root / xray_dataset.MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    return load_segmentation(config, root, manifest, split_ids)
  raise errors.ConfigError(f"config.task.kind={kind!r}: 2D image tasks are 'multilabel' (a "
                           "labels.csv) or 'segment' (imagesTr/ and labelsTr/).")
