"""Cube extraction for pre-training: scans -> memory-mappable per-scan shards + a manifest.

`ensure_dataset` turns `config.data` into a complete prepared dataset (the layout is described in
`manifest`); `prepare` does the work for a folder of scans, `prepare_npy_view` for released cube
files. Cubes are drawn by `sampling`, files are written by `store`.

Kill safety: every file is written atomically (`store.atomic_write`), and cube extraction for a
scan depends only on (seed, scan id), so an interrupted `prepare` re-run on the same folder resumes
and gives a byte-identical dataset.
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import logging
import os
import pathlib
import re
import sys
from typing import Any

import numpy as np

from genesis_jax import errors
from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import nnunet_preprocessed, sampling
from genesis_jax.data import store


class PrepareError(errors.DataError):
  """A prepare run that cannot produce a usable dataset (no scans, all failed, zero cubes)."""


# The way out of a bad scan under data.on_error='raise', appended to its error.
SKIP_HINT = (" To go on without such scans, set config.data.on_error='skip' (they are then "
             "listed in manifest.json).")


def scan_key(rel_path: str) -> str:
  """A file-name-safe, unique id of a scan: its path relative to the source folder, sanitised,
  plus a short hash of the exact relative path (two names may sanitise alike)."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel_path)[-80:]
  return f"{stem}-{hashlib.sha256(rel_path.encode()).hexdigest()[:8]}"


def process_scan(path: pathlib.Path, scan_id: str, settings: sampling.CubeSettings,
                 data_cfg: Any, seed: int) -> tuple[np.ndarray, dict]:
  """Reads, preprocesses and crops one scan. Raises ValueError/OSError naming the file."""
  # Imported here: readers and preprocess pull in nibabel/SimpleITK, not needed to read a dataset.
  # pylint: disable-next=import-outside-toplevel
  from genesis_jax.data import preprocess as preprocess_lib
  from genesis_jax.data import readers  # pylint: disable=import-outside-toplevel

  if path.suffix in nnunet_preprocessed.SUFFIXES:  # Listed only from a preprocessed folder.
    volume = nnunet_preprocessed.load_case(path)
  else:
    volume = readers.load_volume(path)
  readers.check_volume(volume)  # NaN/Inf or constant scans; size is checked after preprocessing.
  raw_shape, raw_spacing = volume.shape, volume.spacing
  volume = preprocess_lib.preprocess(volume, data_cfg)
  cubes = sampling.extract_cubes(volume.data, settings, sampling.scan_rng(seed, scan_id),
                                 source=str(path))
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
  from genesis_jax.data import prepare2d  # pylint: disable=import-outside-toplevel
  record = prepare2d.matching_sidecar(job.sidecar, job.identity)
  if record is None:
    return None
  return record if "error" in record or job.npy.exists() else None


def _run_job(job: _Job, settings: sampling.CubeSettings, data_cfg: Any, seed: int
             ) -> tuple[dict | None, Exception | None]:
  """Scan -> shard + sidecar (in that order: the sidecar marks the shard complete)."""
  try:
    cubes, info = process_scan(job.path, job.rel, settings, data_cfg, seed)
  except ValueError as e:
    # Bad content stays bad until the file changes (size/mtime): remember it, so re-running a
    # complete prepare touches nothing. I/O errors (OSError) may be transient: not remembered.
    store.write_json(job.sidecar, {**job.identity, "error": f"{type(e).__name__}: {e}"})
    return None, e
  except OSError as e:
    return None, e
  store.write_npy(job.npy, cubes)
  record = {**job.identity, **info, "count": int(cubes.shape[0])}
  store.write_json(job.sidecar, record)
  return record, None


def prepare(data_cfg: Any, src_folder: str | os.PathLike, out_dir: str | os.PathLike, *,
            seed: int = 0, progress: bool = True) -> pathlib.Path:
  """Extracts cubes from every scan under `src_folder` into a prepared dataset at `out_dir`.

  Incremental: scans whose shard was made with the same settings from the same file (size and
  mtime) are reused; the rest are (re)computed, in `data.num_workers` processes when > 0. Bad
  scans are skipped and reported (`data.on_error="skip"`) or raise (`"raise"`). Returns `out_dir`.
  """
  from genesis_jax.data import readers  # pylint: disable=import-outside-toplevel
  from genesis_jax.data import prepare2d  # pylint: disable=import-outside-toplevel

  settings = sampling.CubeSettings.from_config(data_cfg)
  on_error = str(sampling.config_field(data_cfg, "on_error", "skip"))
  if on_error not in ("skip", "raise"):
    raise errors.ConfigError(f"config.data.on_error must be 'skip' or 'raise', got {on_error!r}.")
  val_fraction = float(sampling.config_field(data_cfg, "val_fraction", 0.2))
  src_folder = pathlib.Path(src_folder).absolute()
  out_dir = pathlib.Path(out_dir)
  if nnunet_preprocessed.plans_of(src_folder) is not None:  # nnU-Net preprocessed cases.
    scans = nnunet_preprocessed.find_cases(src_folder)
  else:  # Label maps of Decathlon/nnU-Net style folders (labelsTr/, labelsTs/) are not images.
    scans = sorted(p for p in (pathlib.Path(p).absolute() for p in readers.find_scans(src_folder))
                   if not any(part.lower().startswith("labels")
                              for part in p.relative_to(src_folder).parts[:-1]))
  if not scans:
    raise PrepareError(f"{src_folder}: no scans found.")
  manifest_path = out_dir / manifest_lib.MANIFEST
  shard_dir = out_dir / "shards"
  shard_dir.mkdir(parents=True, exist_ok=True)
  # Temp files of a killed run (one writer per dataset dir is assumed).
  store.remove_temp_files(out_dir, shard_dir)

  fingerprint = settings.fingerprint()
  jobs, records = [], {}
  for path in scans:
    rel = pathlib.Path(os.path.relpath(path, src_folder)).as_posix()
    key = scan_key(rel)
    # A dangling link has no target to stat: its own stat stands in, and reading it fails with
    # an error naming it (skipped and reported, or raised, like any bad scan).
    stat = path.stat() if path.exists() else path.lstat()
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
    raise PrepareError(f"{next(j.path for j in jobs if j.key == key)}: {error}{SKIP_HINT}")
  for key in errors:
    records[key] = None
  # Each shard depends only on (seed, scan id): the result does not depend on the worker count.
  for job, (record, error) in prepare2d.run_jobs(
      _run_job, todo, (settings, data_cfg, seed),
      int(sampling.config_field(data_cfg, "num_workers", 0)), progress, total=len(scans),
      desc="prepare", unit="scan"):
    if error is not None:
      if on_error == "raise":
        raise PrepareError(f"{prepare2d.error_message(job.path, error)}{SKIP_HINT}") from error
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
                      f"(lung_filter={settings.lung_filter}, sampler={settings.sampler!r})"})
    else:
      shards.append({"key": job.key, "file": f"shards/{job.key}.npy", "source": str(job.path),
                     "count": record["count"], "shape": record["shape"],
                     "spacing": record["spacing"], "prepared_shape": record["prepared_shape"],
                     "prepared_spacing": record["prepared_spacing"]})

  if not shards:
    report = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
    raise PrepareError(f"{src_folder}: no scan yielded any cube ({len(scans)} scans):\n{report}")
  split = manifest_lib.split_by_scan([s["key"] for s in shards], val_fraction, seed)
  for s in shards:
    s["split"] = split[s["key"]]
  manifest = manifest_lib.build_manifest(
      shards, settings, skipped, seed=seed, val_fraction=val_fraction,
      source={"kind": "folder", "path": str(src_folder), "scans": len(scans)}, on_error=on_error)
  store.write_json(manifest_path, manifest)
  if skipped:
    logging.warning("prepare: %d of %d scans skipped (listed in %s).", len(skipped), len(scans),
                    manifest_path)
  return out_dir


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
  settings = sampling.CubeSettings.from_config(data_cfg)
  shards = []
  for f in files:
    try:
      array = store.open_cubes(f)
    except (OSError, ValueError) as e:
      raise PrepareError(f"{f}: not a readable .npy file ({e}).") from e
    if array.ndim != len(settings.crop) + 1 or array.shape[1:] != settings.crop:
      raise PrepareError(f"{f}: shape {array.shape}, expected "
                         f"(N, {', '.join(map(str, settings.crop))}) from config.data.crop.")
    if array.dtype.kind != "f":
      raise PrepareError(f"{f}: dtype {array.dtype}, expected floating cubes in [0, 1].")
    if array.shape[0] and not (0.0 <= float(array[0].min()) and float(array[0].max()) <= 1.0):
      raise PrepareError(f"{f}: values outside [0, 1] in its first cube; not normalised cubes.")
    path = str(pathlib.Path(f).resolve())
    shards.append({"key": pathlib.Path(f).stem, "file": path, "source": path,
                   "count": int(array.shape[0])})
  if not any(s["count"] for s in shards):
    raise PrepareError(f"{pattern}: the .npy files hold zero cubes.")
  val_fraction = float(sampling.config_field(data_cfg, "val_fraction", 0.2))
  split = manifest_lib.split_by_scan([s["key"] for s in shards], val_fraction, seed)
  for s in shards:
    s["split"] = split[s["key"]]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  manifest = manifest_lib.build_manifest(
      shards, settings, [], seed=seed, val_fraction=val_fraction,
      source={"kind": "npy", "path": pattern, "files": len(files)},
      on_error=str(sampling.config_field(data_cfg, "on_error", "skip")))
  store.write_json(out_dir / manifest_lib.MANIFEST, manifest)
  return out_dir


# --------------------------------------------------------------------------------------------
# Config -> dataset.


def process_info() -> tuple[int, int]:
  """(process index, process count) of a multi-host run; (0, 1) when JAX is not in use."""
  if "jax" not in sys.modules:  # Never initialise a backend just to learn we are alone.
    return 0, 1
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def ensure_dataset(data_cfg: Any, workdir: str | os.PathLike, *, seed: int = 0,
                   wait_timeout_s: float = 24 * 3600.0) -> pathlib.Path:
  """Resolves `config.data` to a complete prepared dataset directory.

  source="phantom": phantom scans in <workdir>/phantoms (or data.path), then prepared;
  "folder": data.path prepared into data.prepared_dir (default <workdir>/data);
  "prepared": data.path validated as complete; "npy": a view over released .npy cubes;
  "images2d": a folder of 2D images (radiographs) prepared by `prepare2d.prepare_images`.
  In multi-process runs only process 0 writes; the others wait for its manifest.
  """
  workdir = pathlib.Path(workdir)
  source = str(sampling.config_field(data_cfg, "source", "phantom"))
  path = str(sampling.config_field(data_cfg, "path", ""))
  prepared_dir = str(sampling.config_field(data_cfg, "prepared_dir", ""))
  if source == "prepared":
    if not path:
      raise errors.ConfigError("config.data.source='prepared' needs config.data.path (a prepared "
                               "dataset dir).")
    if not os.path.exists(path):
      raise errors.MissingPathError(f"config.data.path={path!r}: no such folder; give the folder "
                                    "of a prepared dataset (one holding manifest.json).")
    manifest_lib.validate_dataset(path)
    return pathlib.Path(path)
  if source not in ("phantom", "phantom_xray", "folder", "npy", "images2d"):
    raise errors.ConfigError(f"config.data.source must be phantom|phantom_xray|folder|prepared|"
                             f"npy|images2d, got {source!r}.")
  if source in ("folder", "npy", "images2d") and not path:
    raise errors.ConfigError(f"config.data.source={source!r} needs config.data.path.")
  default_name = {"phantom": "data", "phantom_xray": "data", "folder": "data", "npy": "data_npy",
                  "images2d": "data_images2d"}[source]
  out_dir = pathlib.Path(prepared_dir) if prepared_dir else workdir / default_name

  process_index, _ = process_info()
  if process_index != 0:
    manifest_lib.wait_for_manifest(out_dir, wait_timeout_s)
    return out_dir
  if source == "npy":
    return prepare_npy_view(data_cfg, path, out_dir, seed=seed)
  if source == "phantom_xray":  # Built-in radiographs (DRRs of the phantoms), 2D crops.
    from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
    src, xray_cfg = xray_dataset.pretraining_source(
        data_cfg, pathlib.Path(path) if path else workdir / "xrays", seed=seed)
    return prepare(xray_cfg, src, out_dir, seed=seed)
  if source == "images2d":
    from genesis_jax.data import prepare2d  # pylint: disable=import-outside-toplevel
    if not os.path.isdir(path):
      raise errors.MissingPathError(f"config.data.path={path!r}: no such folder; give the folder "
                                    "of 2D images to prepare.")
    return prepare2d.prepare_images(data_cfg, path, out_dir, seed=seed)
  if source == "phantom":
    from genesis_jax.data import phantoms  # pylint: disable=import-outside-toplevel
    root = pathlib.Path(path) if path else workdir / "phantoms"
    shape = tuple(int(s) for s in sampling.config_field(data_cfg, "phantom_shape",
                                                        (128, 128, 96)))
    n_subjects = int(sampling.config_field(data_cfg, "phantom_subjects", 24))
    src = pathlib.Path(phantoms.write_phantom_dataset(root, n_subjects, seed, shape))
  else:
    src = pathlib.Path(path)
    if not src.exists():
      raise errors.MissingPathError(f"config.data.path={path!r}: no such folder; give the folder "
                                    "of scans to prepare.")
  return prepare(data_cfg, src, out_dir, seed=seed)
