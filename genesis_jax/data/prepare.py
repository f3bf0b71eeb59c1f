"""Cube extraction for pre-training: scans -> memory-mappable per-scan shards + a manifest.

Layout of a prepared dataset directory:

  <dir>/shards/<scan_key>.npy   float32 (N, *crop), intensities in [0, 1], axis order (x, y, z)
                                (3D) or (x, y) (2D slices); no channel axis on disk.
  <dir>/shards/<scan_key>.json  sidecar: what produced the shard (settings fingerprint, source
                                size/mtime, cube count). Written after the shard: it marks it done.
  <dir>/manifest.json           sources, split, counts, spacing, settings, library versions and the
                                skip report. Written last: a directory without it is incomplete.

Kill safety: every file is written to a temporary name and moved in place with `os.replace`
(atomic on POSIX), and cube extraction for a scan depends only on (seed, scan id), so an
interrupted `prepare` re-run on the same folder resumes and gives a byte-identical dataset.

A released-cubes view (`source="npy"`, the original's `bat_32_s_64x64x32_{k}.npy` files, (N, 64, 64,
32) in [0, 1]) is a directory holding only a manifest that points at the .npy files.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob as globlib
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# The original's chest-CT filter keeps a crop when under 15% of its voxels are >= -150 HU
# (i.e. mostly lung and air). It tries up to 50 crops per wanted cube before giving up on a scan.
LUNG_HU_THRESHOLD = -150.0
LUNG_MAX_FRACTION = 0.15
ATTEMPTS_PER_CUBE = 50


class PrepareError(ValueError):
  """A prepare run that cannot produce a usable dataset (no scans, all failed, zero cubes)."""


class DatasetIncompleteError(ValueError):
  """A dataset directory without a (valid) manifest, or with missing shards."""


class VolumeTooSmallError(ValueError):
  """A (preprocessed) volume smaller than the crop it should yield."""


# --------------------------------------------------------------------------------------------
# Settings.


def _field(cfg: Any, name: str, default: Any) -> Any:
  try:
    value = cfg[name]
  except (KeyError, AttributeError, TypeError):
    value = getattr(cfg, name, default)
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class CubeSettings:
  """The subset of `config.data` that decides what a shard contains."""
  crop: tuple[int, ...]  # (x, y, z) for cubes, (x, y) for 2D axial slices.
  scales: tuple[float, ...]  # In-plane (x, y) zoom-out factors: crop round(s * size) and resize.
  cubes_per_scan: int
  modality: str
  hu_window: tuple[float, float]
  mri_norm: str
  mri_percentiles: tuple[float, float]
  spacing: tuple[float, ...]
  body_crop: bool
  lung_filter: bool

  @classmethod
  def from_config(cls, data_cfg: Any) -> CubeSettings:
    crop = tuple(int(c) for c in _field(data_cfg, "crop", ()))
    if len(crop) not in (2, 3) or min(crop) <= 0:
      raise ValueError(f"config.data.crop must have 2 or 3 positive entries, got {crop!r}.")
    scales = tuple(float(s) for s in _field(data_cfg, "scales", (1.0,)))
    if not scales or min(scales) <= 0:
      raise ValueError(f"config.data.scales must be positive numbers, got {scales!r}.")
    s = cls(
        crop=crop,
        scales=scales,
        cubes_per_scan=int(_field(data_cfg, "cubes_per_scan", 32)),
        modality=str(_field(data_cfg, "modality", "ct")),
        hu_window=tuple(float(v) for v in _field(data_cfg, "hu_window", (-1000.0, 1000.0))),
        mri_norm=str(_field(data_cfg, "mri_norm", "percentile")),
        mri_percentiles=tuple(float(v) for v in _field(data_cfg, "mri_percentiles", (0.5, 99.5))),
        spacing=tuple(float(v) for v in _field(data_cfg, "spacing", ())),
        body_crop=bool(_field(data_cfg, "body_crop", False)),
        lung_filter=bool(_field(data_cfg, "lung_filter", False)),
    )
    if s.cubes_per_scan <= 0:
      raise ValueError(f"config.data.cubes_per_scan must be positive, got {s.cubes_per_scan}.")
    if s.lung_filter:
      s.lung_threshold()  # Validates modality and window early.
    return s

  def lung_threshold(self) -> float:
    """-150 HU expressed on the [0, 1] scale of the preprocessed volume.

    The CT window maps HU linearly (after clipping) to [0, 1], so comparing the normalised data
    against the mapped threshold is the same test as comparing raw HU, and it stays valid after
    resampling and body cropping (the crop positions are those of the preprocessed volume).
    """
    lo, hi = self.hu_window
    if self.modality != "ct":
      raise ValueError(f"config.data.lung_filter needs modality 'ct', got {self.modality!r}.")
    if not lo <= LUNG_HU_THRESHOLD <= hi:
      raise ValueError(f"config.data.lung_filter needs -150 HU inside hu_window, got {self.hu_window}.")
    return (LUNG_HU_THRESHOLD - lo) / (hi - lo)

  def fingerprint(self) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Cube extraction from one preprocessed volume.


def scan_rng(seed: int, scan_id: str) -> np.random.Generator:
  """The only randomness of a scan's extraction: a function of (seed, scan id), never of order."""
  digest = int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:8], "little")
  return np.random.default_rng(np.random.SeedSequence([int(seed), digest]))


def _window_size(crop: Sequence[int], scale: float) -> tuple[int, int, int]:
  """Voxel extent (x, y, z) read from the volume for one output crop at `scale` (in-plane only,
  as in the original, whose multi-resolution crops zoom rows and columns but keep the depth)."""
  x, y = (max(1, int(round(c * scale))) for c in crop[:2])
  z = crop[2] if len(crop) == 3 else 1
  return x, y, z


def extract_cubes(data: np.ndarray, settings: CubeSettings, rng: np.random.Generator,
                  source: str = "") -> np.ndarray:
  """Random crops of one preprocessed volume (x, y, z) in [0, 1] -> float32 (N, *crop).

  Cube k uses scale `scales[k % len(scales)]`; with the lung filter, rejected crops are redrawn, up
  to ATTEMPTS_PER_CUBE * cubes_per_scan tries, so N may be below cubes_per_scan (even 0).
  """
  crop = settings.crop
  sizes = [_window_size(crop, s) for s in settings.scales]
  need = tuple(max(sz[a] for sz in sizes) for a in range(3))
  if any(d < n for d, n in zip(data.shape, need)):
    raise VolumeTooSmallError(
        f"{source or 'volume'}: shape {tuple(data.shape)} (x, y, z) after preprocessing is smaller "
        f"than the crop window {need} (crop {crop}, scales {settings.scales}).")
  threshold = settings.lung_threshold() if settings.lung_filter else None
  cubes = []
  for _ in range(ATTEMPTS_PER_CUBE * settings.cubes_per_scan):
    if len(cubes) == settings.cubes_per_scan:
      break
    size = sizes[len(cubes) % len(sizes)]
    origin = [int(rng.integers(0, d - s + 1)) for d, s in zip(data.shape, size)]
    window = data[tuple(slice(o, o + s) for o, s in zip(origin, size))]
    if threshold is not None and np.mean(window >= threshold) >= LUNG_MAX_FRACTION:
      continue
    window = window if len(crop) == 3 else window[..., 0]
    if window.shape != crop:
      factors = [c / w for c, w in zip(crop, window.shape)]
      window = np.clip(scipy.ndimage.zoom(window, factors, order=1), 0.0, 1.0)
      assert window.shape == crop, (window.shape, crop)
    cubes.append(np.asarray(window, np.float32))
  if not cubes:
    return np.zeros((0, *crop), np.float32)
  return np.stack(cubes)


# --------------------------------------------------------------------------------------------
# Atomic files.


def _atomic_write(path: pathlib.Path, write_fn) -> None:
  """Write via a temp file in the same directory, fsync, then os.replace: readers (and a re-run
  after a kill) see either the old file or the complete new one, never a partial one."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _write_json(path: pathlib.Path, obj: Any) -> None:
  blob = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
  _atomic_write(path, lambda f: f.write(blob))


def _write_npy(path: pathlib.Path, array: np.ndarray) -> None:
  _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


# --------------------------------------------------------------------------------------------
# Manifest.


def library_versions() -> dict[str, str]:
  versions = {"python": platform.python_version()}
  for name in ("numpy", "scipy", "nibabel", "grain", "genesis_jax"):
    try:
      module = __import__(name)
      versions[name] = str(getattr(module, "__version__", "unknown"))
    except ImportError:
      pass
  return versions


def load_manifest(dataset_dir: str | os.PathLike) -> dict:
  """The manifest of a complete dataset; DatasetIncompleteError if it is missing or broken."""
  dataset_dir = pathlib.Path(dataset_dir)
  path = dataset_dir / MANIFEST
  if not path.is_file():
    raise DatasetIncompleteError(
        f"{dataset_dir}: no {MANIFEST}; the dataset is incomplete (an interrupted prepare?). "
        "Run prepare again on the same folder to finish it.")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DatasetIncompleteError(f"{path}: unreadable manifest ({e}).") from e
  if manifest.get("format") != FORMAT_VERSION or "shards" not in manifest:
    raise DatasetIncompleteError(f"{path}: not a genesis_jax dataset manifest (format "
                                 f"{manifest.get('format')!r}, expected {FORMAT_VERSION}).")
  return manifest


def shard_path(dataset_dir: str | os.PathLike, shard: dict) -> pathlib.Path:
  """Shards are stored relative to the dataset dir, except external (released .npy) files."""
  return pathlib.Path(dataset_dir) / shard["file"]


def npy_shape(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) from a .npy header, checking the file holds all the data it announces (a
  truncated copy would otherwise fail only when a late cube is read)."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    data_start = f.tell()
  expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if fortran or dtype.hasobject:
    raise ValueError("not a C-ordered numeric array")
  if os.path.getsize(path) != expected:
    raise ValueError(f"file size {os.path.getsize(path)} bytes, the header needs {expected}")
  return tuple(shape), dtype


def validate_dataset(dataset_dir: str | os.PathLike) -> dict:
  """Checks every shard named by the manifest exists with its recorded shape; returns the manifest."""
  manifest = load_manifest(dataset_dir)
  crop = tuple(manifest["crop"])
  for shard in manifest["shards"]:
    path = shard_path(dataset_dir, shard)
    try:
      shape, _ = npy_shape(path)
    except (OSError, ValueError) as e:
      raise DatasetIncompleteError(f"{dataset_dir}: shard {path} is missing or unreadable ({e}).") from e
    if shape != (shard["count"], *crop):
      raise DatasetIncompleteError(
          f"{path}: shape {shape}, the manifest says {(shard['count'], *crop)}.")
  return manifest


# --------------------------------------------------------------------------------------------
# Split by scan.


def split_by_scan(keys: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
  """Assigns each scan (never a cube) to "train" or "val"; depends only on (seed, set of keys).

  At least one scan stays in train, and at least one goes to val when val_fraction > 0 and there
  are two or more scans.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"config.data.val_fraction must be in [0, 1), got {val_fraction}.")
  keys = sorted(keys)
  order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117])).permutation(len(keys))
  n_val = int(round(val_fraction * len(keys)))
  if val_fraction > 0 and len(keys) >= 2:
    n_val = max(n_val, 1)
  n_val = min(n_val, len(keys) - 1)
  val = {keys[i] for i in order[:n_val]}
  return {k: ("val" if k in val else "train") for k in keys}


# --------------------------------------------------------------------------------------------
# Bulk prepare.


def scan_key(rel_path: str) -> str:
  """A file-name-safe, unique id of a scan: its path relative to the source folder, sanitised,
  plus a short hash of the exact relative path (two names may sanitise alike)."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel_path)[-80:]
  return f"{stem}-{hashlib.sha256(rel_path.encode()).hexdigest()[:8]}"


def _process_scan(path: pathlib.Path, scan_id: str, settings: CubeSettings, data_cfg: Any,
                  seed: int) -> tuple[np.ndarray, dict]:
  """Reads, preprocesses and crops one scan. Raises ValueError/OSError naming the file."""
  # Imported here: readers and preprocess pull in nibabel/SimpleITK, not needed to read a dataset.
  from genesis_jax.data import preprocess as preprocess_lib  # pylint: disable=import-outside-toplevel
  from genesis_jax.data import readers  # pylint: disable=import-outside-toplevel

  volume = readers.load_volume(path)
  readers.check_volume(volume)  # NaN/Inf or constant scans; size is checked after preprocessing.
  raw_shape, raw_spacing = volume.shape, volume.spacing
  volume = preprocess_lib.preprocess(volume, data_cfg)
  cubes = extract_cubes(volume.data, settings, scan_rng(seed, scan_id), source=str(path))
  info = {"shape": list(raw_shape), "spacing": [round(s, 6) for s in raw_spacing],
          "prepared_shape": list(volume.shape),
          "prepared_spacing": [round(s, 6) for s in volume.spacing]}
  return cubes, info


@dataclasses.dataclass(frozen=True)
class _Job:
  """One scan to turn into a shard; plain data so it crosses into worker processes."""
  path: pathlib.Path
  rel: str  # Path relative to the source folder: the scan id that seeds its crops.
  key: str
  npy: pathlib.Path
  sidecar: pathlib.Path
  identity: dict  # What the sidecar must match for the shard to be reused.


def _reusable_record(job: _Job) -> dict | None:
  """The sidecar of an up-to-date shard (or of a scan known to be bad), else None."""
  if not job.sidecar.exists():
    return None
  try:
    record = json.loads(job.sidecar.read_text())
  except json.JSONDecodeError:
    return None
  if {k: record.get(k) for k in job.identity} != job.identity:
    return None
  return record if "error" in record or job.npy.exists() else None


def _run_job(job: _Job, settings: CubeSettings, data_cfg: Any, seed: int
             ) -> tuple[dict | None, Exception | None]:
  """Scan -> shard + sidecar (in that order: the sidecar marks the shard complete)."""
  try:
    cubes, info = _process_scan(job.path, job.rel, settings, data_cfg, seed)
  except ValueError as e:
    # Bad content stays bad until the file changes (size/mtime): remember it, so re-running a
    # complete prepare touches nothing. I/O errors (OSError) may be transient: not remembered.
    _write_json(job.sidecar, {**job.identity, "error": f"{type(e).__name__}: {e}"})
    return None, e
  except OSError as e:
    return None, e
  _write_npy(job.npy, cubes)
  record = {**job.identity, **info, "count": int(cubes.shape[0])}
  _write_json(job.sidecar, record)
  return record, None


def _run_jobs(todo: list[_Job], settings: CubeSettings, data_cfg: Any, seed: int, total: int,
              progress: bool, workers: int):
  """Yields (job, (record, error)); in `workers` spawned processes when > 0. Each shard depends
  only on (seed, scan id), so the result does not depend on the worker count."""
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, initial=total - len(todo), desc="prepare", unit="scan")
  try:
    if workers <= 0 or len(todo) <= 1:
      for job in todo:
        yield job, _run_job(job, settings, data_cfg, seed)
        if bar is not None:
          bar.update()
      return
    context = multiprocessing.get_context("spawn")  # fork + threads (grain, XLA) can deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = {pool.submit(_run_job, job, settings, data_cfg, seed): job for job in todo}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield futures[future], future.result()
          if bar is not None:
            bar.update()
      finally:
        pool.shutdown(cancel_futures=True)
  finally:
    if bar is not None:
      bar.close()


def prepare(data_cfg: Any, src_folder: str | os.PathLike, out_dir: str | os.PathLike, *,
            seed: int = 0, progress: bool = True) -> pathlib.Path:
  """Extracts cubes from every scan under `src_folder` into a prepared dataset at `out_dir`.

  Incremental: scans whose shard was made with the same settings from the same file (size and
  mtime) are reused; the rest are (re)computed, in `data.num_workers` processes when > 0. Bad
  scans are skipped and reported (`data.on_error="skip"`) or raise (`"raise"`). Returns `out_dir`.
  """
  from genesis_jax.data import readers  # pylint: disable=import-outside-toplevel

  settings = CubeSettings.from_config(data_cfg)
  on_error = str(_field(data_cfg, "on_error", "skip"))
  if on_error not in ("skip", "raise"):
    raise ValueError(f"config.data.on_error must be 'skip' or 'raise', got {on_error!r}.")
  val_fraction = float(_field(data_cfg, "val_fraction", 0.2))
  src_folder = pathlib.Path(src_folder).absolute()
  out_dir = pathlib.Path(out_dir)
  # Label maps of Decathlon/nnU-Net style folders (labelsTr/, labelsTs/) are not images.
  scans = sorted(p for p in (pathlib.Path(p).absolute() for p in readers.find_scans(src_folder))
                 if not any(part.lower().startswith("labels")
                            for part in p.relative_to(src_folder).parts[:-1]))
  if not scans:
    raise PrepareError(f"{src_folder}: no scans found.")
  manifest_path = out_dir / MANIFEST
  shard_dir = out_dir / "shards"
  shard_dir.mkdir(parents=True, exist_ok=True)
  # Temp files of a killed run (one writer per dataset dir is assumed).
  for stale in [*out_dir.glob(".*.tmp-*"), *shard_dir.glob(".*.tmp-*")]:
    stale.unlink()

  fingerprint = settings.fingerprint()
  jobs, records = [], {}
  for path in scans:
    rel = pathlib.Path(os.path.relpath(path, src_folder)).as_posix()
    key = scan_key(rel)
    stat = path.stat()
    job = _Job(path=path, rel=rel, key=key, npy=shard_dir / f"{key}.npy",
               sidecar=shard_dir / f"{key}.json",
               identity={"fingerprint": fingerprint, "seed": int(seed), "source": rel,
                         "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    jobs.append(job)
    records[key] = _reusable_record(job)
  todo = [job for job in jobs if records[job.key] is None]
  if todo and manifest_path.exists():
    # Shards are about to change: an earlier manifest must not describe them any more.
    manifest_path.unlink()

  errors = {job.key: records[job.key]["error"] for job in jobs
            if records[job.key] is not None and "error" in records[job.key]}
  if errors and on_error == "raise":
    key, error = next(iter(errors.items()))
    raise PrepareError(f"{next(j.path for j in jobs if j.key == key)}: {error}")
  for key in errors:
    records[key] = None
  for job, (record, error) in _run_jobs(todo, settings, data_cfg, seed, len(scans), progress,
                                        int(_field(data_cfg, "num_workers", 0))):
    if error is not None:
      if on_error == "raise":
        if str(job.path) in str(error) or job.path.name in str(error):
          raise error
        raise PrepareError(f"{job.path}: {type(error).__name__}: {error}") from error
      logging.warning("prepare: skipping %s: %s", job.path, error)
      errors[job.key] = f"{type(error).__name__}: {error}"
    records[job.key] = record

  shards, skipped = [], []
  for job in jobs:  # Scan order, whatever order the workers finished in.
    record = records[job.key]
    if record is None:
      skipped.append({"path": str(job.path), "reason": errors[job.key]})
    elif record["count"] == 0:
      skipped.append({"path": str(job.path), "reason": "no cube passed the filters "
                      f"(lung_filter={settings.lung_filter})"})
    else:
      shards.append({"key": job.key, "file": f"shards/{job.key}.npy", "source": str(job.path),
                     "count": record["count"], "shape": record["shape"],
                     "spacing": record["spacing"], "prepared_shape": record["prepared_shape"],
                     "prepared_spacing": record["prepared_spacing"]})

  if not shards:
    report = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
    raise PrepareError(f"{src_folder}: no scan yielded any cube ({len(scans)} scans):\n{report}")
  split = split_by_scan([s["key"] for s in shards], val_fraction, seed)
  for s in shards:
    s["split"] = split[s["key"]]
  manifest = _manifest(shards, settings, skipped, seed=seed, val_fraction=val_fraction,
                       source={"kind": "folder", "path": str(src_folder), "scans": len(scans)},
                       data_cfg=data_cfg)
  _write_json(manifest_path, manifest)
  if skipped:
    logging.warning("prepare: %d of %d scans skipped (listed in %s).", len(skipped), len(scans),
                    manifest_path)
  return out_dir


def _manifest(shards: list[dict], settings: CubeSettings, skipped: list[dict], *, seed: int,
              val_fraction: float, source: dict, data_cfg: Any) -> dict:
  counts = {split: {"scans": sum(s["split"] == split for s in shards),
                    "cubes": sum(s["count"] for s in shards if s["split"] == split)}
            for split in ("train", "val")}
  return {
      "format": FORMAT_VERSION,
      "crop": list(settings.crop),
      "axes": "N, x, y, z" if len(settings.crop) == 3 else "N, x, y",
      "counts": counts,
      "settings": {**{k: list(v) if isinstance(v, tuple) else v
                      for k, v in dataclasses.asdict(settings).items()},
                   "fingerprint": settings.fingerprint(), "seed": int(seed),
                   "val_fraction": val_fraction,
                   "on_error": str(_field(data_cfg, "on_error", "skip"))},
      "source": source,
      "shards": shards,
      "skipped": skipped,
      "versions": library_versions(),
  }


# --------------------------------------------------------------------------------------------
# Released .npy cubes.


def _natural_key(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def prepare_npy_view(data_cfg: Any, pattern: str | os.PathLike, out_dir: str | os.PathLike, *,
                     seed: int = 0) -> pathlib.Path:
  """A dataset over released cube files ((N, *crop) float in [0, 1], e.g. the original's
  bat_32_s_64x64x32_{0..9}.npy), memory-mapped in place; the split is by file."""
  pattern = str(pattern)
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*.npy")
  files = sorted(globlib.glob(pattern), key=_natural_key)
  if not files:
    raise PrepareError(f"config.data.path={pattern!r}: no .npy files match.")
  settings = CubeSettings.from_config(data_cfg)
  shards = []
  for f in files:
    try:
      array = np.load(f, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise PrepareError(f"{f}: not a readable .npy file ({e}).") from e
    if array.ndim != len(settings.crop) + 1 or array.shape[1:] != settings.crop:
      raise PrepareError(f"{f}: shape {array.shape}, expected (N, {', '.join(map(str, settings.crop))}) "
                         "from config.data.crop.")
    if array.dtype.kind != "f":
      raise PrepareError(f"{f}: dtype {array.dtype}, expected floating cubes in [0, 1].")
    if array.shape[0] and not (0.0 <= float(array[0].min()) and float(array[0].max()) <= 1.0):
      raise PrepareError(f"{f}: values outside [0, 1] in its first cube; not normalised cubes.")
    path = str(pathlib.Path(f).resolve())
    shards.append({"key": pathlib.Path(f).stem, "file": path, "source": path,
                   "count": int(array.shape[0])})
  if not any(s["count"] for s in shards):
    raise PrepareError(f"{pattern}: the .npy files hold zero cubes.")
  val_fraction = float(_field(data_cfg, "val_fraction", 0.2))
  split = split_by_scan([s["key"] for s in shards], val_fraction, seed)
  for s in shards:
    s["split"] = split[s["key"]]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest = _manifest(shards, settings, [], seed=seed, val_fraction=val_fraction,
                       source={"kind": "npy", "path": pattern, "files": len(files)},
                       data_cfg=data_cfg)
  _write_json(out_dir / MANIFEST, manifest)
  return out_dir


# --------------------------------------------------------------------------------------------
# Config -> dataset.


def _process_info() -> tuple[int, int]:
  if "jax" not in sys.modules:  # Never initialise a backend just to learn we are alone.
    return 0, 1
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def _wait_for_manifest(out_dir: pathlib.Path, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while not (out_dir / MANIFEST).exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"{out_dir}: process 0 did not finish preparing within {timeout_s:.0f} s "
                         "(the workdir must be on a filesystem shared by all processes).")
    time.sleep(2.0)


def ensure_dataset(data_cfg: Any, workdir: str | os.PathLike, *, seed: int = 0,
                   wait_timeout_s: float = 24 * 3600.0) -> pathlib.Path:
  """Resolves `config.data` to a complete prepared dataset directory.

  source="phantom": phantom scans in <workdir>/phantoms (or data.path), then prepared;
  "folder": data.path prepared into data.prepared_dir (default <workdir>/data);
  "prepared": data.path validated as complete; "npy": a view over released .npy cubes.
  In multi-process runs only process 0 writes; the others wait for its manifest.
  """
  workdir = pathlib.Path(workdir)
  source = str(_field(data_cfg, "source", "phantom"))
  path = str(_field(data_cfg, "path", ""))
  prepared_dir = str(_field(data_cfg, "prepared_dir", ""))
  if source == "prepared":
    if not path:
      raise ValueError("config.data.source='prepared' needs config.data.path (a prepared dataset dir).")
    validate_dataset(path)
    return pathlib.Path(path)
  if source not in ("phantom", "folder", "npy"):
    raise ValueError(f"config.data.source must be phantom|folder|prepared|npy, got {source!r}.")
  if source in ("folder", "npy") and not path:
    raise ValueError(f"config.data.source={source!r} needs config.data.path.")
  default_name = {"phantom": "data", "folder": "data", "npy": "data_npy"}[source]
  out_dir = pathlib.Path(prepared_dir) if prepared_dir else workdir / default_name

  process_index, _ = _process_info()
  if process_index != 0:
    _wait_for_manifest(out_dir, wait_timeout_s)
    return out_dir
  if source == "npy":
    return prepare_npy_view(data_cfg, path, out_dir, seed=seed)
  if source == "phantom":
    from genesis_jax.data import phantoms  # pylint: disable=import-outside-toplevel
    root = pathlib.Path(path) if path else workdir / "phantoms"
    shape = tuple(int(s) for s in _field(data_cfg, "phantom_shape", (128, 128, 96)))
    n_subjects = int(_field(data_cfg, "phantom_subjects", 24))
    src = pathlib.Path(phantoms.write_phantom_dataset(root, n_subjects, seed, shape))
  else:
    src = pathlib.Path(path)
  return prepare(data_cfg, src, out_dir, seed=seed)
