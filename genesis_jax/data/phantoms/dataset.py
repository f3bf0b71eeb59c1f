"""The phantom data set on disk: an MSD / nnU-Net folder plus LUNA16-style candidate lists.

Written in a sibling temporary folder and renamed into place, so a data set folder is either
absent or complete.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from genesis_jax import errors
from genesis_jax.data.phantoms import subject

# Bump when the generator's output changes, so cached data sets are regenerated.
GENERATOR_VERSION = 2  # 2: candidates.csv in LPS (LUNA16).
MANIFEST = "phantom_manifest.json"


def _manifest(n_subjects: int, seed: int, shape) -> dict:
  """What identifies a phantom data set: reused only when all of it matches."""
  return {"generator": "genesis_jax.data.phantoms", "version": GENERATOR_VERSION,
          "n_subjects": int(n_subjects), "seed": int(seed), "shape": [int(n) for n in shape]}


def _is_complete(root: pathlib.Path, manifest: dict) -> bool:
  try:
    found = json.loads((root / MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  if found != manifest:
    return False
  names = [subject.subject_name(i) for i in range(manifest["n_subjects"])]
  return ((root / "dataset.json").is_file() and (root / "candidates.csv").is_file()
          and all((root / "imagesTr" / f"{n}_0000.nii.gz").is_file() for n in names)
          and all((root / "labelsTr" / f"{n}.nii.gz").is_file() for n in names))


def _nifti(data: np.ndarray, affine: np.ndarray):
  import nibabel as nib  # Imported here: generating phantoms in memory does not need it.
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)  # 1 = scanner coordinates.
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm")
  return img


_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _write_all(tmp: pathlib.Path, n_subjects: int, seed: int, shape) -> None:
  (tmp / "imagesTr").mkdir()
  (tmp / "labelsTr").mkdir()
  training = []
  with open(tmp / "candidates.csv", "w", newline="") as fc, \
      open(tmp / "annotations.csv", "w", newline="") as fa:
    cands, annos = csv.writer(fc), csv.writer(fa)
    cands.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
    annos.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    for i in range(n_subjects):
      name = subject.subject_name(i)
      ph = subject.make_phantom(subject.subject_seed(seed, i), shape)
      affine = ph.volume.affine
      image = np.rint(ph.volume.data).astype(np.int16)
      _nifti(image, affine).to_filename(str(tmp / "imagesTr" / f"{name}_0000.nii.gz"))
      _nifti(ph.nodule_mask.astype(np.uint8), affine).to_filename(
          str(tmp / "labelsTr" / f"{name}.nii.gz"))
      for c in ph.candidates:
        # LUNA16 / ITK convention: world coordinates in LPS (RAS with x and y negated).
        world = np.array(c.world_xyz_mm) * _RAS_TO_LPS
        row = [name, *(f"{w:.3f}" for w in world)]
        cands.writerow(row + [c.label])
        if c.label == 1:
          annos.writerow(row + [f"{c.diameter_mm:.2f}"])
      training.append({"image": f"./imagesTr/{name}_0000.nii.gz",
                       "label": f"./labelsTr/{name}.nii.gz"})
  dataset = {
      "name": "GenesisPhantomChestCT",
      "description": "Procedural chest-CT phantoms (genesis_jax.data.phantoms); HU, RAS+.",
      "channel_names": {"0": "CT"},
      "labels": {"background": 0, "nodule": 1},
      "numTraining": n_subjects,
      "file_ending": ".nii.gz",
      "training": training,
  }
  (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
  # The manifest goes last: its presence (after the rename) marks a complete data set.
  (tmp / MANIFEST).write_text(json.dumps(_manifest(n_subjects, seed, shape), indent=2))


def write_phantom_dataset(root, n_subjects: int, seed: int = 0,
                          shape=(128, 128, 96)) -> pathlib.Path:
  """Writes (or reuses) an MSD/nnU-Net style phantom data set at `root`; returns its path.

  Layout: imagesTr/phantom_XXX_0000.nii.gz (int16 HU), labelsTr/phantom_XXX.nii.gz (uint8 nodule
  mask), dataset.json, candidates.csv and annotations.csv (LUNA16 columns; coordinates are world
  millimetres in LUNA16's LPS frame, i.e. affine @ (i, j, k, 1) with x and y negated), and
  phantom_manifest.json. The set is built in a sibling temporary folder and renamed into place,
  so `root` is either absent or complete; a complete set with the same (n_subjects, seed, shape)
  is reused as is, one from other parameters is replaced, and any other non-empty folder at
  `root` is an error (never deleted).
  """
  root = pathlib.Path(root)
  shape = tuple(int(n) for n in shape)
  if n_subjects < 1:
    raise errors.ConfigError(
        f"write_phantom_dataset({root}): n_subjects must be >= 1, got {n_subjects}.")
  manifest = _manifest(n_subjects, seed, shape)
  if _is_complete(root, manifest):
    return root
  if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
    raise errors.ConfigError(f"{root} exists, is not empty and holds no {MANIFEST}: refusing to "
                     "overwrite it with a phantom data set; choose another folder.")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is meant to be shared.
  old = None
  try:
    _write_all(tmp, n_subjects, seed, shape)
    if root.exists():  # An empty folder, or a phantom set from other parameters.
      old = root.with_name(f".{root.name}.old-{os.getpid()}-{time.monotonic_ns()}")
      os.rename(root, old)
    try:
      os.rename(tmp, root)
    except OSError:
      # Someone else renamed a data set into place in the meantime: use it if it is the one.
      if _is_complete(root, manifest):
        return root
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return root
