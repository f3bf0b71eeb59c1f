"""The built-in radiograph data set on disk: DRRs of the phantoms, ChestX-ray8-style labels, and
projected nodule masks in an MSD / nnU-Net 2D layout.

  root/imagesTr/<case>_0000.png   16-bit grey radiograph (display orientation, [0, 1] * 65535)
  root/labelsTr/<case>.png        8-bit projected nodule mask (0 background, 1 nodule)
  root/float/<case>.nii.gz        float32 single-slice NIfTI of p_hat = -log(N / I0), pixel size
                                  in the affine (the unscaled radiograph; pre-training reads it)
  root/labels.csv                 Image Index,Finding Labels,Patient ID,View Position
  root/dataset.json               labels {background 0, nodule 1}, findings, file_ending .png
  root/xray_manifest.json         the parameters and every case written so far

Case <case> is `phantom_XXX_<view>` (patient phantom_XXX, view "pa" or "lateral"); subject i is
the 3D phantom `make_phantom(subject_seed(seed, i), shape)`, except that a share
`nodule_free_fraction` of subjects (drawn per subject from the seed) is generated without
nodules, so that "No Finding" images exist. Each subject's radiograph findings (Cardiomegaly,
Effusion, Mass, Consolidation; each with probability `findings_prevalence`, drawn with a generator
of their own) are drawn into a copy of its CT before projection (radiograph_findings.py): the 3D
phantom, and so the 3D NCC/NCS tasks, are unchanged. Both views of a subject carry the subject's
findings; the masks are the projected nodules only.

Kill-safe: every file goes through data/store's atomic writer and the manifest lists each case
once its files are complete, so a rerun writes only what is missing; labels.csv and dataset.json
are written (atomically) when every case is done. A manifest from other parameters is replaced
and its files removed; a non-empty folder without a manifest is refused.
"""
from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from genesis_jax import errors
from genesis_jax.data import store
from genesis_jax.data.phantoms import drr as drr_lib
from genesis_jax.data.phantoms import radiograph_findings, subject

# 2: the radiograph findings (Cardiomegaly, Effusion, Mass, Consolidation) drawn into the CT.
VERSION = 2
MANIFEST = "xray_manifest.json"
LABELS_CSV = "labels.csv"
CSV_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def case_name(index: int, view: str) -> str:
  return f"{subject.subject_name(index)}_{view}"


def _params(subjects: int, seed: int, shape, views, i0: float, nodule_free_fraction: float,
            large_mm: float, findings_prevalence: float) -> dict:
  return {"generator": "genesis_jax.data.phantoms.drr", "version": VERSION,
          "subjects": int(subjects), "seed": int(seed), "shape": [int(n) for n in shape],
          "views": list(views), "i0": float(i0),
          "nodule_free_fraction": float(nodule_free_fraction), "large_mm": float(large_mm),
          "findings_prevalence": float(findings_prevalence)}


def _files(root: pathlib.Path, case: str) -> list[pathlib.Path]:
  return [root / "imagesTr" / f"{case}_0000.png", root / "labelsTr" / f"{case}.png",
          root / "float" / f"{case}.nii.gz"]


def png_bytes(image: np.ndarray, bits: int) -> bytes:
  """A canonical 2D image (x, y) as PNG bytes: 16-bit grey from [0, 1] floats (bits 16) or the
  8-bit values of an integer mask (bits 8)."""
  from PIL import Image  # Imported here: only writing the files needs Pillow.
  a = drr_lib.png_array(image)
  if bits == 16:
    a = np.rint(np.clip(a, 0.0, 1.0) * 65535).astype(np.uint16)
  else:
    a = a.astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def nifti_bytes(image: np.ndarray, spacing: Sequence[float]) -> bytes:
  """A canonical 2D float image (x, y) as a single-slice NIfTI (x, y, 1), pixel size in mm."""
  import nibabel as nib  # Imported here: generating DRRs in memory does not need it.
  affine = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
  img = nib.Nifti1Image(np.asarray(image, np.float32)[:, :, None], affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm")
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)  # .nii.gz: gzip of the .nii.


def _nodule_free(seed: int, index: int, fraction: float) -> bool:
  rng = np.random.default_rng([int(seed), int(index), 19])
  return bool(rng.uniform() < fraction)


def subject_phantom(index: int, seed: int, shape, *, nodule_free_fraction: float = 0.25,
                    findings_prevalence: float = radiograph_findings.PREVALENCE):
  """(the 3D phantom of subject `index`, the copy the radiographs project with the radiograph
  findings drawn into it, the lesions drawn)."""
  free = _nodule_free(seed, index, nodule_free_fraction)
  ph = subject.make_phantom(subject.subject_seed(seed, index), shape,
                            n_nodules=0 if free else None)
  rng = np.random.default_rng([int(seed), int(index), 29])
  xr, lesions = radiograph_findings.add_findings(ph, rng, findings_prevalence)
  return ph, xr, lesions


def make_subject_drrs(index: int, seed: int, shape, views, *, i0: float = 2e4,
                      nodule_free_fraction: float = 0.25,
                      large_mm: float = drr_lib.LARGE_NODULE_MM,
                      findings_prevalence: float = radiograph_findings.PREVALENCE
                      ) -> dict[str, drr_lib.DRR]:
  """{view: DRR} of subject `index` of the set drawn with `seed` (in memory, no files)."""
  _, xr, lesions = subject_phantom(index, seed, shape, nodule_free_fraction=nodule_free_fraction,
                                   findings_prevalence=findings_prevalence)
  out = {}
  for k, view in enumerate(views):
    rng = np.random.default_rng([int(seed), int(index), 23, k])
    out[view] = drr_lib.make_drr(xr, view, rng, i0=i0, large_mm=large_mm, lesions=lesions)
  return out


def _load_manifest(root: pathlib.Path) -> dict | None:
  try:
    return json.loads((root / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def write_xray_dataset(root, subjects: int, seed: int = 0, shape=(128, 128, 96),
                       views: Sequence[str] = ("pa", "lateral"), *, i0: float = 2e4,
                       nodule_free_fraction: float = 0.25,
                       large_mm: float = drr_lib.LARGE_NODULE_MM,
                       findings_prevalence: float = radiograph_findings.PREVALENCE,
                       progress=None) -> pathlib.Path:
  """Writes (or completes, or reuses) the DRR data set at `root`; returns its path.

  See the module docstring for the layout. `progress(done, total)` is called after each case.
  """
  root = pathlib.Path(root)
  views = tuple(drr_lib.check_view(v) for v in views)
  if not views or len(set(views)) != len(views):
    raise errors.ConfigError(f"write_xray_dataset({root}): views must be distinct, from "
                             f"{tuple(drr_lib.VIEWS)}; got {views}.")
  if subjects < 1:
    raise errors.ConfigError(f"write_xray_dataset({root}): subjects must be >= 1, got {subjects}.")
  if not 0.0 <= nodule_free_fraction <= 1.0:
    raise errors.ConfigError(f"write_xray_dataset({root}): nodule_free_fraction must be in "
                             f"[0, 1], got {nodule_free_fraction}.")
  if not 0.0 <= findings_prevalence <= 1.0:
    raise errors.ConfigError(f"write_xray_dataset({root}): findings_prevalence must be in "
                             f"[0, 1], got {findings_prevalence}.")
  params = _params(subjects, seed, shape, views, i0, nodule_free_fraction, large_mm,
                   findings_prevalence)
  found = _load_manifest(root)
  if found is None and root.exists() and any(root.iterdir()):
    raise errors.ConfigError(f"{root} exists, is not empty and holds no {MANIFEST}: refusing to "
                             "write a radiograph data set there; choose another folder.")
  if found is not None and found.get("params") != params:
    for case in found.get("done", {}):  # Another data set: remove the files it wrote.
      for f in _files(root, case):
        f.unlink(missing_ok=True)
    for f in (LABELS_CSV, "dataset.json"):
      (root / f).unlink(missing_ok=True)
    found = None
  manifest = found or {"params": params, "done": {}, "complete": False}
  if manifest.get("complete") and _all_present(root, manifest):
    return root
  manifest["complete"] = False
  for sub in ("imagesTr", "labelsTr", "float"):
    (root / sub).mkdir(parents=True, exist_ok=True)
    store.remove_temp_files(root / sub)
  store.remove_temp_files(root)
  done = manifest["done"]
  total = subjects * len(views)
  for i in range(subjects):
    cases = [case_name(i, v) for v in views]
    if all(c in done and all(f.is_file() for f in _files(root, c)) for c in cases):
      continue
    for view, image in make_subject_drrs(i, seed, shape, views, i0=i0,
                                         nodule_free_fraction=nodule_free_fraction,
                                         large_mm=large_mm,
                                         findings_prevalence=findings_prevalence).items():
      case = case_name(i, view)
      png, label, flt = _files(root, case)
      store.write_bytes(png, png_bytes(image.image, 16))
      store.write_bytes(label, png_bytes(image.mask, 8))
      store.write_bytes(flt, nifti_bytes(image.log_integral, image.spacing))
      done[case] = {"patient": subject.subject_name(i), "view": view,
                    "findings": list(image.findings), "spacing": list(image.spacing),
                    "shape": list(image.image.shape), "mask_pixels": int(image.mask.sum())}
    store.write_json(root / MANIFEST, manifest)  # After the files: the subject is complete.
    if progress is not None:
      progress(len(done), total)
  order = [case_name(i, v) for i in range(subjects) for v in views]
  _write_labels(root, order, done)
  _write_dataset_json(root, order)
  manifest["complete"] = True
  store.write_json(root / MANIFEST, manifest)
  return root


def _all_present(root: pathlib.Path, manifest: dict) -> bool:
  return ((root / LABELS_CSV).is_file() and (root / "dataset.json").is_file()
          and all(f.is_file() for c in manifest["done"] for f in _files(root, c)))


def _write_labels(root: pathlib.Path, order: list[str], done: dict) -> None:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_COLUMNS)
  for case in order:
    rec = done[case]
    w.writerow([f"{case}_0000.png", drr_lib.finding_labels(rec["findings"]), rec["patient"],
                drr_lib.VIEW_POSITION[rec["view"]]])
  store.write_bytes(root / LABELS_CSV, buf.getvalue().encode())


def _write_dataset_json(root: pathlib.Path, order: list[str]) -> None:
  store.write_json(root / "dataset.json", {
      "name": "GenesisPhantomDRR",
      "description": "Digitally reconstructed radiographs of the procedural chest-CT phantoms "
                     "(genesis_jax.data.phantoms.drr); masks are projected nodule masks.",
      "channel_names": {"0": "X-ray"},
      "labels": {"background": 0, "nodule": 1},
      "findings": list(drr_lib.FINDINGS),
      "numTraining": len(order),
      "file_ending": ".png",
      "training": [{"image": f"./imagesTr/{c}_0000.png", "label": f"./labelsTr/{c}.png"}
                   for c in order],
  })


def read_labels_csv(path) -> list[dict]:
  """Rows of a ChestX-ray8-style CSV: {"image", "findings" (tuple), "patient", "view"}; a
  missing Patient ID falls back to the image name (each image its own case)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingPathError(f"{path}: no labels CSV (columns 'Image Index,Finding "
                                  "Labels'); give it with config.data.candidates.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"Image Index", "Finding Labels"} - set(reader.fieldnames or ())
    if missing:
      raise errors.DataError(f"{path}: missing column(s) {sorted(missing)}; a ChestX-ray8-style "
                             "CSV has 'Image Index,Finding Labels[,Patient ID,View Position]'.")
    rows = []
    for r in reader:
      image = (r["Image Index"] or "").strip()
      if not image:
        raise errors.DataError(f"{path}, line {reader.line_num}: empty 'Image Index'.")
      rows.append({"image": image, "findings": drr_lib.parse_finding_labels(r["Finding Labels"]),
                   "patient": (r.get("Patient ID") or "").strip() or image,
                   "view": (r.get("View Position") or "").strip()})
  return rows


def pretraining_source(data_cfg, root, *, seed: int = 0):
  """`data.source="phantom_xray"` pre-training: writes (or reuses) the DRR set of
  `data.phantom_subjects` subjects drawn with `seed` at `root`; returns (the folder of its float
  radiographs, float/*.nii.gz single slices, and the data config to prepare them with), for the
  ordinary prepare to cut into 2D crops (same manifest, kill-safety and skip report).

  Radiographs are not in Hounsfield units: the returned config normalises each image to [0, 1]
  by its `data.mri_percentiles` (default 0.5 and 99.5, as the 2D image tasks do), whatever
  `data.modality` says; the CT-only `lung_filter`, `sampler="lung_centred"` and `body_crop` are
  refused."""
  from genesis_jax.data import sampling  # pylint: disable=import-outside-toplevel
  crop = tuple(sampling.config_field(data_cfg, "crop", ()))
  if len(crop) != 2:
    raise errors.ConfigError(f"config.data.source='phantom_xray' holds 2D radiographs: set a "
                             f"2-entry config.data.crop (and model.spatial_dims=2), got {crop}.")
  for key, off in (("lung_filter", False), ("sampler", "anywhere"), ("body_crop", False)):
    if sampling.config_field(data_cfg, key, off) != off:
      raise errors.ConfigError(f"config.data.{key} is for CT scans; leave it at {off!r} with "
                               "config.data.source='phantom_xray'.")
  shape = tuple(int(s) for s in sampling.config_field(data_cfg, "phantom_shape", (128, 128, 96)))
  n_subjects = int(sampling.config_field(data_cfg, "phantom_subjects", 24))
  root = write_xray_dataset(root, n_subjects, seed, shape)
  cfg = data_cfg.copy_and_resolve_references() if hasattr(
      data_cfg, "copy_and_resolve_references") else copy.deepcopy(data_cfg)
  cfg.modality, cfg.mri_norm = "mri", "percentile"
  return root / "float", cfg
