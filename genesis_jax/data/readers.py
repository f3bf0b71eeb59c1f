"""Scan readers: NIfTI, MetaImage (LUNA16 .mhd/.raw), NRRD and DICOM series -> `Volume`.

Every reader returns float32 data in (x, y, z) order, reoriented to the closest canonical RAS+
orientation (index i grows towards +R, j towards +A, k towards +S; a permutation and flips only,
oblique rotations stay in the affine), with the 4x4 voxel -> world (RAS mm) affine kept. The array
is contiguous in C or Fortran memory order, whichever was cheaper to produce.
Scaled integers are read with their slope/intercept applied (NIfTI scl_slope/scl_inter, DICOM
RescaleSlope/RescaleIntercept), so CT data comes back in Hounsfield units.

NIfTI goes through nibabel (a core dependency). The other formats go through SimpleITK, an optional
extra (`pip install genesis_jax[io]`): a missing SimpleITK is an ImportError that says so, not a
failure at import time of this module.

Anything wrong with an input file (unreadable, truncated, inconsistent header, real 4D data, an
empty folder) raises `VolumeReadError` (a `genesis_jax.errors.DataError`, so a ValueError) whose
message names the file and the problem.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import pathlib
import zlib
from typing import Sequence

import nibabel as nib
import numpy as np

from genesis_jax import errors
from genesis_jax.data.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# Voxel counts above this are a corrupt header, not a scan (2**31 float32 voxels = 8 GiB).
_MAX_VOXELS = 2**31
# ITK's LPS+ world -> nibabel's RAS+ world: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The way out for a 2D image: slices are cut from 3D scans, also for a 2D model.
SLICES_HINT = ("2D models (config.model.spatial_dims=2) also read 3D scans and cut slices from "
               "them, so stack the slices into one 3D file.")

_log = logging.getLogger(__name__)


class VolumeReadError(errors.DataError):
  """A scan could not be read or fails a sanity check; the message names the file."""


class MissingExtraError(errors.EnvironmentSetupError, ImportError):
  """An optional dependency (the `io` extra, SimpleITK) is needed for this file format."""


def scan_id(path: str | pathlib.Path) -> str:
  """The scan's name without its format suffix: LUNA16's seriesuid for `<seriesuid>.mhd`."""
  name = pathlib.Path(path).name
  for suffix in SCAN_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return name


def case_id(path: str | pathlib.Path) -> str:
  """`scan_id` without the nnU-Net channel suffix: imagesTr/case_007_0000.nii.gz -> case_007."""
  sid = scan_id(path)
  return sid[: -len("_0000")] if sid.endswith("_0000") else sid


def _suffix(path: pathlib.Path) -> str:
  name = path.name.lower()
  for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
    if name.endswith(suffix):
      return suffix
  return ""


def _is_dicom_file(path: pathlib.Path) -> bool:
  """A DICOM Part 10 file: 128-byte preamble then "DICM" (many exports have no .dcm suffix)."""
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError:
    return False


def is_dicom_dir(path: pathlib.Path) -> bool:
  """Whether `path` is a folder holding one DICOM series (read as one scan)."""
  files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
  if any(p.suffix.lower() == ".dcm" for p in files):
    return True
  # Suffix-less exports (IM0001, ...): look at one such file only, to keep the scan cheap.
  bare = sorted(p for p in files if not p.suffix)
  return bool(bare) and _is_dicom_file(bare[0])


def find_scans(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """All scans under `folder` (searched recursively), sorted by path, each real file once.

  A scan is a file with a supported suffix (.nii, .nii.gz, .mhd, .mha, .nrrd, .nhdr) or a folder
  holding .dcm files or suffix-less DICOM files (one DICOM series). Hidden files (".*", e.g. the
  "._x.nii.gz" AppleDouble files shipped inside the Decathlon archives) are skipped. `.raw` files
  belong to their `.mhd`.

  Symbolic links are followed, except into a folder that is already on the way down (by real
  path), so a link loop (`d/self -> .`) lists nothing twice; two paths to one real file (links, or
  a linked folder) give one scan, the first in path order. A dangling link with a scan suffix is
  listed, so that reading it fails with an error naming it (a skipped, reported scan under
  `data.on_error='skip'`).
  """
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise VolumeReadError(f"{root}: scan folder does not exist or is not a folder.")
  found = []
  # (folder, real paths of the folders above it): a folder whose real path is among them is a
  # link back up the tree.
  dirs: list[tuple[pathlib.Path, frozenset[str]]] = [(root, frozenset())]
  while dirs:
    d, above = dirs.pop()
    real = os.path.realpath(d)
    if real in above:
      _log.warning("%s links back to %s; not searched again.", d, real)
      continue
    above = above | {real}
    if is_dicom_dir(d):
      found.append(d)
    for p in d.iterdir():
      if p.name.startswith("."):
        continue
      if p.is_dir():
        dirs.append((p, above))
      elif _suffix(p) in SCAN_SUFFIXES:
        found.append(p)
  if not found:
    raise VolumeReadError(
        f"{root}: no scans found (looked for {', '.join(SCAN_SUFFIXES)} files and folders of"
        " DICOM files).")
  scans, first_of, repeats = [], {}, []
  for p in sorted(found, key=str):
    real = os.path.realpath(p)
    if real in first_of:
      repeats.append(f"{p} (= {first_of[real]})")
      continue
    first_of[real] = p
    scans.append(p)
  if repeats:
    _log.warning("%s: %d path(s) lead to a scan already listed, each listed once: %s%s", root,
                 len(repeats), ", ".join(repeats[:3]), " ..." if len(repeats) > 3 else "")
  return scans


def broken_link_message(path: pathlib.Path) -> str | None:
  """What is wrong when `path` is a symbolic link to nothing; None when it is not one."""
  if not path.is_symlink() or path.exists():
    return None
  return (f"{path}: broken symbolic link to {os.readlink(path)!r} (no such file); fix or remove "
          "the link.")


def load_volume(path: str | pathlib.Path, *, channel: int | None = None) -> Volume:
  """Reads one scan as a canonical (RAS+) float32 `Volume` with (x, y, z) axes.

  Args:
    path: a .nii/.nii.gz/.mhd/.mha/.nrrd/.nhdr file, or a folder holding one DICOM series.
    channel: for a real 4D image (x, y, z, c), e.g. the Decathlon's 4-channel brain MRI, the index
      of the channel to read. Without it a real 4D image is an error; a singleton 4th (and any
      further trailing singleton) dimension is always squeezed.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise VolumeReadError(broken_link_message(path) or f"{path}: no such file or folder.")
  suffix = _suffix(path)
  if path.is_dir():
    data, affine = _read_dicom_series(path)
  elif suffix in NIFTI_SUFFIXES:
    data, affine = _read_nifti(path)
  elif suffix in ITK_SUFFIXES:
    data, affine = _read_itk(path)
  else:
    raise VolumeReadError(
        f"{path}: unsupported file type; expected one of {', '.join(SCAN_SUFFIXES)} or a DICOM"
        " series folder.")
  data = _to_3d(data, channel, path)
  if data.size == 0:
    raise VolumeReadError(f"{path}: the image is empty (shape {data.shape}).")
  _check_affine(affine, path)
  data, affine = _to_canonical(data, affine)
  return Volume(data=_compact(data), affine=affine, source=str(path))


def check_volume(vol: Volume, min_shape: Sequence[int] | None = None) -> None:
  """Raises VolumeReadError naming `vol.source` if the volume cannot be trained on.

  Rejects: not 3D, NaN/Inf voxels, a constant volume (no signal to learn from; it also breaks
  per-volume normalisation), and any axis shorter than `min_shape` (x, y, z), e.g. the crop size.
  """
  name = vol.source or "<volume>"
  if vol.data.ndim != 3:
    raise VolumeReadError(f"{name}: expected a 3D (x, y, z) volume, got shape {vol.data.shape}.")
  finite = np.isfinite(vol.data)
  if not finite.all():
    bad = int(vol.data.size - np.count_nonzero(finite))
    raise VolumeReadError(f"{name}: {bad} of {vol.data.size} voxels are NaN or Inf.")
  lo, hi = float(vol.data.min()), float(vol.data.max())
  if lo == hi:
    raise VolumeReadError(f"{name}: constant volume (every voxel is {lo}).")
  if min_shape is not None:
    min_shape = tuple(int(s) for s in min_shape)
    if any(s < m for s, m in zip(vol.data.shape, min_shape)):
      raise VolumeReadError(
          f"{name}: volume of shape {vol.data.shape} (x, y, z) is smaller than the required"
          f" {min_shape}.")


def _to_3d(data: np.ndarray, channel: int | None, path: pathlib.Path) -> np.ndarray:
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim == 4 and channel is not None:
    if not 0 <= channel < data.shape[3]:
      raise VolumeReadError(
          f"{path}: channel {channel} requested but the image has {data.shape[3]} channels.")
    return data[..., channel]
  if data.ndim == 4:
    raise VolumeReadError(
        f"{path}: expected a 3D volume (x, y, z), got a 4D image of shape {data.shape} "
        f"({data.shape[3]} channels or time points); save the channel you want as a 3D file of "
        "its own (nnU-Net: <case>_0000.nii.gz, <case>_0001.nii.gz, ...), or in Python pass "
        "channel=<k> to load_volume.")
  if data.ndim != 3:
    raise VolumeReadError(
        f"{path}: expected a 3D volume (x, y, z), got a {data.ndim}D image of shape "
        f"{data.shape}; give one 3D scan per file.")
  return data


def _check_affine(affine: np.ndarray, path: pathlib.Path) -> None:
  if affine.shape != (4, 4) or not np.isfinite(affine).all():
    raise VolumeReadError(f"{path}: the voxel-to-world affine is not finite:\n{affine}")
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  if not (spacing > 0).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12 * np.prod(spacing):
    raise VolumeReadError(
        f"{path}: the voxel-to-world affine is singular (voxel sizes {spacing} mm):\n{affine}")


def _compact(data: np.ndarray) -> np.ndarray:
  """float32 in one contiguous block, in whichever order (C or F) the data is closest to.

  Files store x fastest, so most volumes arrive Fortran-ordered (flipped views after
  reorientation); forcing C order would be a cache-hostile transpose costing seconds per CT.
  """
  data = np.asarray(data, dtype=np.float32)
  if data.flags.c_contiguous or data.flags.f_contiguous:
    return data
  strides = np.abs(data.strides)
  return np.asfortranarray(data) if strides[0] <= strides[-1] else np.ascontiguousarray(data)


def _to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Permutes and flips the axes so that i, j, k point closest to +R, +A, +S (nibabel's rule)."""
  ornt = nib.orientations.io_orientation(affine)
  if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
    return data, affine.astype(np.float64)
  # inv_ornt_aff wants the shape before reorientation.
  affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
  data = nib.orientations.apply_orientation(data, ornt)
  return data, affine.astype(np.float64)


# --- NIfTI -------------------------------------------------------------------------------------


def _read_nifti(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads the whole file into memory and checks the header against the bytes actually there.

  nibabel reads lazily and, when the header's dimensions shrink, silently reads a prefix of the
  data; a size check on the decompressed bytes turns such header corruption into an error.
  """
  try:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise VolumeReadError(f"{path}: cannot read or decompress the file ({e}).") from e
  if len(raw) < 348:
    raise VolumeReadError(f"{path}: {len(raw)} bytes, too short to be a NIfTI file.")
  sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
  klass = nib.Nifti2Image if 540 in sizeof_hdr else nib.Nifti1Image
  try:
    header = klass.header_class.from_fileobj(io.BytesIO(raw))
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    offset = int(header.get_data_offset())
    img = klass.from_bytes(raw)
  except Exception as e:  # nibabel raises many types for bad headers; all mean "not a NIfTI".
    raise VolumeReadError(f"{path}: not a valid NIfTI header ({type(e).__name__}: {e}).") from e
  if dtype.kind not in "iuf" or dtype.fields is not None:
    raise VolumeReadError(f"{path}: unsupported voxel type {dtype} (need integers or floats).")
  if any(s <= 0 for s in shape):
    raise VolumeReadError(f"{path}: bad image dimensions {shape} in the header.")
  if len(shape) < 3:
    raise VolumeReadError(
        f"{path}: expected a 3D volume (x, y, z), got a {len(shape)}D image of shape {shape}; "
        + SLICES_HINT)
  count = int(np.prod(shape, dtype=np.float64))
  if count > _MAX_VOXELS:
    raise VolumeReadError(f"{path}: header claims {count} voxels {shape}; corrupt header?")
  expected = offset + count * dtype.itemsize
  if len(raw) != expected:
    raise VolumeReadError(
        f"{path}: header describes {shape} {dtype} voxels at offset {offset} ({expected} bytes)"
        f" but the file holds {len(raw)} bytes; truncated file or corrupt header.")
  slope, inter = header.get_slope_inter()
  if any(v is not None and not np.isfinite(v) for v in (slope, inter)):
    raise VolumeReadError(f"{path}: non-finite scaling (scl_slope={slope}, scl_inter={inter}).")
  try:
    with np.errstate(all="ignore"):
      # get_fdata applies scl_slope/scl_inter; float32 keeps the memory of a CT at 4 bytes/voxel.
      data = img.get_fdata(dtype=np.float32)
    affine = img.affine
  except Exception as e:
    raise VolumeReadError(f"{path}: cannot decode the voxel data ({type(e).__name__}: {e}).") from e
  if affine is None:
    raise VolumeReadError(f"{path}: no usable affine in the header.")
  raw_scaling = (float(header["scl_slope"]), float(header["scl_inter"]))
  if dtype.kind in "iu" and not np.isfinite(data).all():
    # Integers cannot hold NaN/Inf: these come from a corrupt scl_slope/scl_inter.
    raise VolumeReadError(
        f"{path}: scaling (scl_slope, scl_inter) = {raw_scaling} turns integer voxels into "
        "NaN/Inf.")
  return data, np.asarray(affine, dtype=np.float64)


# --- SimpleITK formats: MetaImage, NRRD, DICOM ------------------------------------------------


def _sitk():
  try:
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingExtraError(
        "Reading MetaImage (.mhd/.mha), NRRD and DICOM needs SimpleITK: "
        "pip install 'genesis_jax[io]'") from e
  return sitk


def _itk_error(path: pathlib.Path, e: Exception) -> VolumeReadError:
  # ITK messages carry a C++ source location first; the last non-empty line says what is wrong.
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  reason = " | ".join(lines[-2:]) if lines else type(e).__name__
  return VolumeReadError(f"{path}: cannot read the image ({reason}).")


def _sitk_to_array(image, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  sitk = _sitk()
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise VolumeReadError(
        f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar"
        " image.")
  dim = image.GetDimension()
  if dim not in (3, 4):
    raise VolumeReadError(
        f"{path}: expected a 3D volume (x, y, z), got a {dim}D image of size {image.GetSize()}; "
        + SLICES_HINT)
  # GetArrayFromImage returns (z, y, x) (or (t, z, y, x)); reverse to (x, y, z[, t]).
  data = sitk.GetArrayViewFromImage(image)
  data = np.transpose(data, tuple(range(data.ndim))[::-1]).astype(np.float32)
  direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
  spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
  origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
  lps = np.eye(4)
  lps[:3, :3] = direction * spacing  # Column i = direction of index axis i times its spacing.
  lps[:3, 3] = origin
  return data, _LPS_TO_RAS @ lps


def _read_itk(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  sitk = _sitk()
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise _itk_error(path, e) from e
  size = reader.GetSize()
  if int(np.prod(size, dtype=np.float64)) > _MAX_VOXELS:
    raise VolumeReadError(f"{path}: header claims a {size} image; corrupt header?")
  try:
    image = reader.Execute()
  except RuntimeError as e:
    raise _itk_error(path, e) from e
  return _sitk_to_array(image, path)


def _read_dicom_series(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads the DICOM series in `folder`, slices ordered by position (GDCM), rescale applied."""
  sitk = _sitk()
  if not any(folder.iterdir()):
    raise VolumeReadError(f"{folder}: empty folder, no DICOM series to read.")
  try:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
  except RuntimeError as e:
    raise _itk_error(folder, e) from e
  if not series:
    raise VolumeReadError(f"{folder}: no readable DICOM series in this folder.")
  files_by_series = {
      s: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series}
  chosen = max(series, key=lambda s: len(files_by_series[s]))
  if len(series) > 1:
    _log.warning("%s holds %d DICOM series; reading the largest, %s (%d files).", folder,
                 len(series), chosen, len(files_by_series[chosen]))
  files = files_by_series[chosen]
  in_series = {pathlib.Path(f).name for s in series for f in files_by_series[s]}
  unreadable = sorted(p.name for p in folder.iterdir()
                      if p.suffix.lower() == ".dcm" and p.name not in in_series
                      and not p.name.startswith("."))
  if unreadable:
    # GDCM silently leaves out files it cannot parse, which would leave a gap in the volume.
    raise VolumeReadError(
        f"{folder}: unreadable DICOM file(s) {', '.join(unreadable[:5])}"
        f"{' ...' if len(unreadable) > 5 else ''}.")
  if len(files) < 2:
    raise VolumeReadError(f"{folder}: the DICOM series {chosen} has a single slice; need a volume.")
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(files)
  reader.MetaDataDictionaryArrayUpdateOn()
  try:
    image = reader.Execute()
  except RuntimeError as e:
    raise _itk_error(folder, e) from e
  _check_slice_positions(reader, image, folder)
  return _sitk_to_array(image, folder)


def _check_slice_positions(reader, image, folder: pathlib.Path) -> None:
  """Slices must be evenly spaced along the slice normal: ITK takes the spacing from the first two
  slices, so a missing slice or a mixed series would otherwise give silently wrong geometry."""
  normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
  positions = []
  for i in range(image.GetSize()[2]):
    if not reader.HasMetaDataKey(i, "0020|0032"):
      return  # No ImagePositionPatient to check against (e.g. secondary capture).
    try:
      positions.append(float(np.dot(normal, [float(v) for v in
                                             reader.GetMetaData(i, "0020|0032").split("\\")])))
    except ValueError:
      return
  steps = np.diff(positions)
  if len(steps) and not np.allclose(steps, steps[0], rtol=1e-3, atol=1e-3):
    raise VolumeReadError(
        f"{folder}: DICOM slices are not evenly spaced (steps {np.round(steps, 3).tolist()} mm);"
        " missing slices or several series mixed in one folder?")
