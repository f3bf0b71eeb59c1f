"""Classification data: candidate locations from a LUNA16-style CSV, cut into centred cubes.

  seriesuid,coordX,coordY,coordZ,class

with world coordinates in mm. LUNA16's are ITK/LPS world coordinates (the .mhd "Offset" frame),
so `read_candidates_csv` converts them to the RAS world of `Volume.affine` (x and y negated);
`frame="ras"` reads files already written in RAS.
"""
from __future__ import annotations

import csv
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from genesis_jax.data import preprocess as preprocess_lib
from genesis_jax.data import readers
from genesis_jax.data.readers import VolumeReadError, check_volume
from genesis_jax.data.tasks.cubes import as_3d_crop, extract_cube, stack_cubes
from genesis_jax.data.volume import Candidate, Volume


def read_candidates_csv(path: str | pathlib.Path, *, frame: str = "lps",
                        labels: bool = True) -> list[Candidate]:
  """Reads `seriesuid,coordX,coordY,coordZ,class` rows (the LUNA16 candidates format).

  Args:
    path: the CSV file; the header row names the columns (case-insensitive; "label" is accepted
      for "class").
    frame: the world frame of coordX/Y/Z. "lps" (LUNA16 and anything written from ITK/SimpleITK
      physical points) is converted to RAS by negating x and y; "ras" is taken as is.
    labels: False for candidates to predict: the class column may be missing or blank (label -1).
  """
  path = pathlib.Path(path)
  if frame not in ("lps", "ras"):
    raise ValueError(f"frame must be 'lps' or 'ras', got {frame!r}.")
  sign = np.array([-1.0, -1.0, 1.0]) if frame == "lps" else np.ones(3)
  try:
    text = path.read_text(encoding="utf-8-sig")  # -sig: CSVs saved by Excel start with a BOM.
  except (OSError, UnicodeDecodeError) as e:
    raise VolumeReadError(f"{path}: cannot read the candidates file ({e}).") from e
  rows = csv.reader(text.splitlines())
  header = [h.strip().lower() for h in next(rows, [])]
  columns = {}
  for want, names in (("id", ("seriesuid", "scan_id")), ("x", ("coordx",)), ("y", ("coordy",)),
                      ("z", ("coordz",)), ("label", ("class", "label"))):
    found = [header.index(n) for n in names if n in header]
    if not found and want == "label" and not labels:
      continue
    if not found:
      raise VolumeReadError(
          f"{path}: header {header} lacks a {'/'.join(names)} column; expected"
          " seriesuid,coordX,coordY,coordZ,class.")
    columns[want] = found[0]
  out = []
  for line_no, row in enumerate(rows, start=2):
    if not any(cell.strip() for cell in row):
      continue
    try:
      xyz = np.array([float(row[columns[k]]) for k in "xyz"])
      cell = row[columns["label"]].strip() if "label" in columns else ""
      label_f = -1.0 if not labels and not cell else float(cell)
      uid = row[columns["id"]].strip()
    except (ValueError, IndexError) as e:
      raise VolumeReadError(f"{path}, line {line_no}: cannot parse {row} ({e}).") from e
    if not np.isfinite(xyz).all() or not uid or label_f != int(label_f):
      raise VolumeReadError(
          f"{path}, line {line_no}: need a scan id, finite coordinates and an integer class,"
          f" got {row}.")
    out.append(Candidate(uid, tuple(float(v) for v in xyz * sign), int(label_f)))
  return out


def world_to_voxel(vol: Volume, world_xyz_mm: Sequence[float]) -> np.ndarray:
  """Continuous (x, y, z) voxel index of a RAS world point in `vol`."""
  return (np.linalg.inv(vol.affine) @ np.array([*world_xyz_mm, 1.0]))[:3]


def classification_cubes(scans: Mapping[str, Volume], candidates: Sequence[Candidate],
                         crop: Sequence[int], cfg: Any, *, missing: str = "raise"
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Cubes centred on candidate locations, with their labels.

  Each scan is preprocessed once with `cfg` (config.data); `scans` is read once per scan id, so a
  lazy Mapping that loads on access keeps only one scan in memory. World mm -> voxel goes through
  the inverse of the (preprocessed) affine; where a cube runs off the volume it is padded with
  0.0, the normalised value of the window's minimum (air for the CT default).

  Args:
    missing: "raise" (default) or "skip" candidates whose scan id is not in `scans`.
  Returns images (N, *crop, 1) float32 in [0, 1] ((N, x, x, 3) for orthogonal slices) and
  labels (N,) int32, in candidate order.
  Raises VolumeReadError when a candidate's centre lies outside its scan, the usual sign of an
  LPS/RAS mix-up.
  """
  if missing not in ("raise", "skip"):
    raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}.")
  crop3, is_2d = as_3d_crop(crop)
  # A 2D model's input: the candidate's central axial slice (x, y), or with cfg.slices
  # "orthogonal" its axial (x, y), coronal (x, z) and sagittal (y, z) slices as 3 channels.
  orthogonal = is_2d and getattr(cfg, "slices", "axial") == "orthogonal"
  if orthogonal and crop3[0] != crop3[1]:
    raise VolumeReadError(f"orthogonal slices need a square crop, got {tuple(crop)}.")
  by_scan: dict[str, list[int]] = {}
  for i, c in enumerate(candidates):
    by_scan.setdefault(c.scan_id, []).append(i)
  cubes: dict[int, np.ndarray] = {}
  for sid, indices in by_scan.items():
    if sid not in scans:
      if missing == "skip":
        continue
      raise VolumeReadError(f"candidate scan id {sid!r} has no scan among the {len(scans)} given.")
    vol = preprocess_lib.preprocess(scans[sid], cfg)
    check_volume(vol)  # NaN/Inf would pass silently into the cubes.
    for i in indices:
      ijk = world_to_voxel(vol, candidates[i].world_xyz_mm)
      center = np.round(ijk).astype(int)
      if ((center < 0) | (center >= vol.shape)).any():
        raise VolumeReadError(
            f"{vol.source or sid}: candidate {i} at {candidates[i].world_xyz_mm} mm (RAS) maps to"
            f" voxel {np.round(ijk, 1)}, outside the volume {vol.shape}; wrong coordinate frame"
            " (LUNA16 CSVs are LPS) or wrong scan?")
      if orthogonal:
        cubes[i] = orthogonal_slices(vol.data, center, crop3[0])
      else:
        cubes[i] = extract_cube(vol.data, center, crop3, pad_value=0.0)
  order = sorted(cubes)
  if orthogonal:
    images = np.stack([cubes[i] for i in order]).astype(np.float32) if order else np.zeros(
        (0, crop3[0], crop3[0], 3), np.float32)
  else:
    images = stack_cubes([cubes[i] for i in order], np.float32, is_2d)
  labels = np.array([candidates[i].label for i in order], dtype=np.int32)
  return images, labels


def orthogonal_slices(data: np.ndarray, center, size: int) -> np.ndarray:
  """(size, size, 3): the axial (x, y), coronal (x, z) and sagittal (y, z) slices of the
  size^3 cube around `center` (padded with 0 off the volume) through its centre voxel."""
  cube = extract_cube(data, center, (size,) * 3, pad_value=0.0)
  c = size // 2  # extract_cube puts `center` at index size // 2.
  return np.stack([cube[:, :, c], cube[:, c, :], cube[c, :, :]], axis=-1)


class LazyScans(dict):
  """scan id -> Volume, read from its file on each access (`classification_cubes` reads each scan
  once, so only one scan is in memory at a time)."""

  def __init__(self, paths: dict[str, pathlib.Path]):
    super().__init__()
    self._paths = paths

  def __contains__(self, key):
    return key in self._paths

  def __getitem__(self, key):
    return readers.load_volume(self._paths[key])

  def keys(self):
    return self._paths.keys()
