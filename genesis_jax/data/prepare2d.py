"""Prepare a folder of 2D images (radiographs: PNG, JPEG, TIFF, DICOM, single-slice NIfTI) for 2D
pre-training: read, normalise to [0, 1], fit to a fixed size, cut samples, write shards.

The result is a prepared dataset in the layout of `manifest` (the 3D prepare's): float32 shards
(N, cx, cy) in [0, 1] under shards/, one JSON sidecar per shard, manifest.json written last with
the split, counts, settings and the skip report, so `pipeline.CubeSource` and the pre-training
read it unchanged. Config (`config.data`, pre-training family):

  source="images2d", path=<folder of images>, prepared_dir (default <workdir>/data_images2d)
  crop=(cx, cy)          the sample size the network sees (model.spatial_dims=2)
  image_size=(sx, sy)    every image is first fitted to this size; () = crop (the whole image is
                         the sample); larger than crop: cubes_per_scan random crops per image
  image_fit              letterbox (whole image, padded with 0) or crop (centre-crop)
  image_upscale          allow enlarging small images (otherwise letterbox pads them at native
                         size and crop rejects them: skipped and reported)
  image_norm, image_percentiles   percentile clip (0.5, 99.5) or min-max, per image, to [0, 1]
  val_fraction, on_error, num_workers   as for scans

Images are grouped into shards of `IMAGES_PER_SHARD` (sorted by relative path within each split),
so tens of thousands of images make hundreds of files, not tens of thousands of memory maps. The
split is per image, by a hash of (seed, relative path): adding images never moves others between
train and val. Each image's samples depend only on (seed, its relative path).

Kill safety and resume, as in `prepare`: every file is written atomically, a shard's sidecar is
written after it and names the exact member files (size and mtime) and settings, the manifest is
removed before any shard changes and written last. A re-run reuses every shard whose sidecar
matches and redoes the rest; the result is byte-identical to an uninterrupted run. Unreadable
images (`images2d.ImageReadError`, constant images, too small for crop fit) are skipped and
listed in manifest.json "skipped" (on_error="skip"), or stop the run naming the file ("raise").
I/O errors (OSError) are skipped for this run and retried on the next.

`image_records(dataset_dir)` lists every prepared image with its shard, sample rows and fit
transform (`radiograph.FitTransform.from_dict`), to map predictions back to the original grid.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import re
from typing import Any

import numpy as np

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import radiograph
from genesis_jax.data import sampling
from genesis_jax.data import store

IMAGES_PER_SHARD = 256
SKIP_HINT = (" To go on without such images, set config.data.on_error='skip' (they are then "
             "listed in manifest.json).")
_SHARD_NAME = re.compile(r"^(train|val)_\d{5}_[0-9a-f]{10}\.(npy|json)$")


class PrepareImagesError(errors.DataError):
  """A 2D prepare that cannot produce a usable dataset (no images, all failed, or a bad image
  under on_error='raise')."""


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """The subset of `config.data` that decides what a 2D image shard contains."""
  crop: tuple[int, int]
  image_size: tuple[int, int]
  fit: str
  upscale: bool
  norm: str
  percentiles: tuple[float, float]
  crops_per_image: int  # Used only when image_size is larger than crop.

  @classmethod
  def from_config(cls, data_cfg: Any) -> ImageSettings:
    crop = tuple(int(c) for c in sampling.config_field(data_cfg, "crop", ()))
    if len(crop) != 2 or min(crop) <= 0:
      raise errors.ConfigError(f"config.data.crop={crop!r}: 2D images need two positive sizes "
                               "(x, y).")
    size = tuple(int(c) for c in sampling.config_field(data_cfg, "image_size", ())) or crop
    if len(size) != 2 or any(s < c for s, c in zip(size, crop)):
      raise errors.ConfigError(f"config.data.image_size={size!r} must be two sizes (x, y), each "
                               f">= config.data.crop={crop} (or empty: the crop size).")
    s = cls(crop=crop, image_size=size,
            fit=str(sampling.config_field(data_cfg, "image_fit", "letterbox")),
            upscale=bool(sampling.config_field(data_cfg, "image_upscale", False)),
            norm=str(sampling.config_field(data_cfg, "image_norm", "percentile")),
            percentiles=tuple(float(p) for p in sampling.config_field(
                data_cfg, "image_percentiles", (0.5, 99.5))),
            crops_per_image=int(sampling.config_field(data_cfg, "cubes_per_scan", 32)))
    if s.fit not in radiograph.FIT_MODES or s.norm not in radiograph.NORMS:
      raise errors.ConfigError(f"config.data.image_fit={s.fit!r} / image_norm={s.norm!r}: "
                               f"expected {radiograph.FIT_MODES} / {radiograph.NORMS}.")
    return s

  @property
  def samples_per_image(self) -> int:
    return 1 if self.image_size == self.crop else self.crops_per_image

  def fingerprint(self) -> str:
    """Short hash of the settings and the shard format: a shard made with others is stale."""
    fields = dataclasses.asdict(self)
    if self.image_size == self.crop:
      del fields["crops_per_image"]  # Unused: one sample per image.
    blob = json.dumps({"format": manifest_lib.FORMAT_VERSION, "kind": "images2d", **fields},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_images(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Image files under `folder` (recursive, sorted, hidden files and labels*/ folders skipped,
  each real file once; linked folders are followed once)."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise PrepareImagesError(f"{root}: image folder does not exist or is not a folder.")
  found, seen_dirs, seen_files = [], set(), set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen_dirs:
      dirnames[:] = []
      continue
    seen_dirs.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                         and not d.lower().startswith("labels"))
    for name in filenames:
      path = pathlib.Path(dirpath) / name
      if images2d.is_image_file(path):
        key = os.path.realpath(path)
        if key not in seen_files:
          seen_files.add(key)
          found.append(path)
  return sorted(found, key=str)


def image_samples(path: pathlib.Path, rel: str, settings: ImageSettings, seed: int
                  ) -> tuple[np.ndarray, dict]:
  """One image -> (samples float32 (k, cx, cy) in [0, 1], record). Raises ValueError/OSError."""
  image = images2d.read_image(path)
  fitted, transform = radiograph.preprocess(
      image, settings.image_size, mode=settings.fit, upscale=settings.upscale,
      norm=settings.norm, percentiles=settings.percentiles)
  if settings.samples_per_image == 1:
    samples = fitted[None]
  else:
    rng = sampling.scan_rng(seed, rel)
    starts = []
    for axis in range(2):
      size, crop = settings.image_size[axis], settings.crop[axis]
      # Inside the image where it is large enough, anywhere otherwise (padding included).
      lo = max(transform.offset[axis], 0)
      hi = min(transform.offset[axis] + transform.resized_shape[axis], size) - crop
      if hi < lo:
        lo, hi = 0, size - crop
      starts.append(rng.integers(lo, hi + 1, size=settings.crops_per_image))
    samples = np.stack([fitted[x:x + settings.crop[0], y:y + settings.crop[1]]
                        for x, y in zip(*starts)])
  record = {"source": rel, "shape": list(image.shape),
            "spacing": [round(s, 6) for s in image.spacing], "transform": transform.to_dict(),
            "format": image.meta.get("format", ""), "modality": image.meta.get("modality", "")}
  return np.ascontiguousarray(samples, np.float32), record


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One shard to make: plain data, so it crosses into worker processes."""
  key: str
  split: str
  members: tuple[tuple[str, str], ...]  # (absolute path, relative path)
  npy: pathlib.Path
  sidecar: pathlib.Path
  identity: dict


def matching_sidecar(sidecar: pathlib.Path, identity: dict) -> dict | None:
  """A shard's sidecar record if it exists, parses and matches `identity` (what made the shard:
  settings, source files, seed) on every key of it, else None (the shard must be redone)."""
  if not sidecar.exists():
    return None
  try:
    record = json.loads(sidecar.read_text())
  except json.JSONDecodeError:
    return None
  return record if {k: record.get(k) for k in identity} == identity else None


def _reusable(chunk: _Chunk) -> dict | None:
  record = matching_sidecar(chunk.sidecar, chunk.identity)
  if record is None or record.get("retry"):
    return None
  return record if record["count"] == 0 or chunk.npy.exists() else None


def _run_chunk(chunk: _Chunk, settings: ImageSettings, seed: int, on_error: str
               ) -> tuple[dict | None, tuple[str, Exception] | None]:
  """Images -> shard + sidecar (the sidecar last: it marks the shard complete). Returns (record,
  None), or (None, (path, error)) for the first bad image under on_error='raise'."""
  samples, images, skipped, retry = [], [], {}, False
  for path, rel in chunk.members:
    try:
      array, record = image_samples(pathlib.Path(path), rel, settings, seed)
    except (ValueError, OSError) as e:
      if on_error == "raise":
        return None, (path, e)
      retry = retry or not isinstance(e, ValueError)  # I/O errors may be transient.
      named = path in str(e) or pathlib.Path(path).name in str(e)
      skipped[rel] = ("" if named else f"{type(e).__name__}: ") + str(e)
      continue
    record["first"] = sum(len(s) for s in samples)
    record["count"] = int(len(array))
    samples.append(array)
    images.append(record)
  count = sum(len(s) for s in samples)
  if count:
    store.write_npy(chunk.npy, np.concatenate(samples))
  record = {**chunk.identity, "count": count, "images": images, "skipped": skipped}
  if retry:
    record["retry"] = True
  store.write_json(chunk.sidecar, record)
  return record, None


def run_jobs(fn, todo: list, args: tuple, workers: int, progress: bool, *, total: int, desc: str,
             unit: str, weight=lambda item: 1):
  """Yields (item, fn(item, *args)) for each item of `todo` (both prepares' shard jobs): here in
  order when workers <= 0 or there is one item, else in `workers` spawned processes as they
  finish (fn must be a module-level function). progress: a tqdm bar over `total`, starting at what
  `todo` leaves out, each item advancing it by weight(item)."""
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, initial=total - sum(weight(item) for item in todo), desc=desc,
               unit=unit)
  try:
    if workers <= 0 or len(todo) <= 1:
      for item in todo:
        yield item, fn(item, *args)
        if bar is not None:
          bar.update(weight(item))
      return
    context = multiprocessing.get_context("spawn")  # fork + threads (grain, XLA) can deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = {pool.submit(fn, item, *args): item for item in todo}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield futures[future], future.result()
          if bar is not None:
            bar.update(weight(futures[future]))
      finally:
        pool.shutdown(cancel_futures=True)
  finally:
    if bar is not None:
      bar.close()


def error_message(path: str | os.PathLike, error: BaseException) -> str:
  """`error`'s message, led by the path and the error's type unless it names the file already."""
  named = str(path) in str(error) or pathlib.Path(path).name in str(error)
  return ("" if named else f"{path}: {type(error).__name__}: ") + str(error)


def split_images(rels: list[str], val_fraction: float, seed: int) -> dict[str, str]:
  """Per image "train"/"val" by a hash of (seed, relative path), so adding images moves no other;
  at least one image in train, and one in val when val_fraction > 0 and there are two or more."""
  if not 0.0 <= val_fraction < 1.0:
    raise errors.ConfigError(f"config.data.val_fraction must be in [0, 1), got {val_fraction}.")
  u = {r: int.from_bytes(hashlib.sha256(f"{int(seed)}:{r}".encode()).digest()[:8], "little")
       / 2.0**64 for r in rels}
  split = {r: "val" if u[r] < val_fraction else "train" for r in rels}
  if len(rels) >= 2 and val_fraction > 0 and "val" not in split.values():
    split[min(rels, key=u.get)] = "val"
  if rels and "train" not in split.values():
    split[max(rels, key=u.get)] = "train"
  return split


def prepare_images(data_cfg: Any, src_folder: str | os.PathLike, out_dir: str | os.PathLike, *,
                   seed: int = 0, progress: bool = True,
                   images_per_shard: int = IMAGES_PER_SHARD) -> pathlib.Path:
  """Prepares every image under `src_folder` into a dataset at `out_dir` (see the module doc).

  Incremental and kill-safe; shards are made in `data.num_workers` processes when > 0. Returns
  `out_dir`.
  """
  settings = ImageSettings.from_config(data_cfg)
  on_error = str(sampling.config_field(data_cfg, "on_error", "skip"))
  if on_error not in ("skip", "raise"):
    raise errors.ConfigError(f"config.data.on_error must be 'skip' or 'raise', got {on_error!r}.")
  val_fraction = float(sampling.config_field(data_cfg, "val_fraction", 0.2))
  src_folder = pathlib.Path(src_folder).absolute()
  out_dir = pathlib.Path(out_dir)
  paths = find_images(src_folder)
  if not paths:
    raise PrepareImagesError(f"{src_folder}: no images found (looked for "
                             f"{', '.join(images2d.IMAGE_SUFFIXES)} and DICOM files).")
  rels = {p: pathlib.Path(os.path.relpath(p, src_folder)).as_posix() for p in paths}
  split = split_images(list(rels.values()), val_fraction, seed)
  manifest_path, shard_dir = out_dir / manifest_lib.MANIFEST, out_dir / "shards"
  shard_dir.mkdir(parents=True, exist_ok=True)
  store.remove_temp_files(out_dir, shard_dir)  # Left by a killed run (one writer per dataset).

  fingerprint, chunks = settings.fingerprint(), []
  for name in ("train", "val"):
    members = [(str(p), rels[p]) for p in paths if split[rels[p]] == name]
    for k, start in enumerate(range(0, len(members), images_per_shard)):
      group = tuple(members[start:start + images_per_shard])
      digest = hashlib.sha256("\n".join(r for _, r in group).encode()).hexdigest()[:10]
      key = f"{name}_{k:05d}_{digest}"
      stats = []
      for path, rel in group:
        p = pathlib.Path(path)
        st = p.stat() if p.exists() else p.lstat()  # A dangling link fails when read, reported.
        stats.append([rel, st.st_size, st.st_mtime_ns])
      chunks.append(_Chunk(key=key, split=name, members=group, npy=shard_dir / f"{key}.npy",
                           sidecar=shard_dir / f"{key}.json",
                           identity={"fingerprint": fingerprint, "seed": int(seed),
                                     "members": stats}))
  records = {c.key: _reusable(c) for c in chunks}
  todo = [c for c in chunks if records[c.key] is None]
  if todo and manifest_path.exists():
    manifest_path.unlink()  # Shards are about to change: the old manifest no longer holds.
  if on_error == "raise":
    for c in chunks:
      if records[c.key] is not None and records[c.key]["skipped"]:
        rel, reason = next(iter(records[c.key]["skipped"].items()))
        raise PrepareImagesError(f"{src_folder / rel}: {reason}{SKIP_HINT}")
  for chunk, (record, failure) in run_jobs(
      _run_chunk, todo, (settings, seed, on_error),
      int(sampling.config_field(data_cfg, "num_workers", 0)), progress, total=len(paths),
      desc="prepare images", unit="image", weight=lambda c: len(c.members)):
    if failure is not None:
      path, error = failure
      raise PrepareImagesError(f"{error_message(path, error)}{SKIP_HINT}") from error
    records[chunk.key] = record
  _remove_orphans(shard_dir, {c.key for c in chunks})

  shards, skipped = [], []
  for c in chunks:
    record = records[c.key]
    skipped += [{"path": str(src_folder / rel), "reason": reason}
                for rel, reason in record["skipped"].items()]
    if record["count"]:
      shards.append({"key": c.key, "file": f"shards/{c.key}.npy", "source": str(src_folder),
                     "count": record["count"], "images": len(record["images"]),
                     "split": c.split})
  if not shards:
    report = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped[:20])
    raise PrepareImagesError(f"{src_folder}: no image could be prepared ({len(paths)} "
                             f"images):\n{report}")
  if not any(s["split"] == "train" for s in shards):
    raise PrepareImagesError(f"{src_folder}: every training image failed; see the reasons: "
                             f"{skipped[:3]}")
  manifest = manifest_lib.build_manifest(
      shards, settings, skipped, seed=seed, val_fraction=val_fraction,
      source={"kind": "images2d", "path": str(src_folder), "images": len(paths)},
      on_error=on_error)
  for name in ("train", "val"):  # build_manifest counts shards as "scans"; images are the unit.
    manifest["counts"][name]["images"] = sum(s["images"] for s in shards if s["split"] == name)
  store.write_json(manifest_path, manifest)
  if skipped:
    logging.warning("prepare: %d of %d images skipped (listed in %s).", len(skipped),
                    len(paths), manifest_path)
  return out_dir


def _remove_orphans(shard_dir: pathlib.Path, keys: set[str]) -> None:
  """Shards of earlier runs over a folder that has changed since (their keys are gone)."""
  for p in shard_dir.iterdir():
    if _SHARD_NAME.match(p.name) and p.name.rsplit(".", 1)[0] not in keys:
      p.unlink()


def image_records(dataset_dir: str | os.PathLike) -> list[dict]:
  """Every prepared image of a complete images2d dataset, in shard order: its sidecar record
  (source relative path, original shape, spacing, fit transform, first sample row and count)
  plus "shard" (the shard key) and "split"."""
  manifest = manifest_lib.validate_dataset(dataset_dir)
  if manifest.get("source", {}).get("kind") != "images2d":
    raise manifest_lib.DatasetIncompleteError(f"{dataset_dir}: not a 2D image dataset (source "
                                              f"kind {manifest.get('source', {}).get('kind')}).")
  out = []
  for shard in manifest["shards"]:
    sidecar = manifest_lib.shard_path(dataset_dir, shard).with_suffix(".json")
    for record in json.loads(sidecar.read_text())["images"]:
      out.append({**record, "shard": shard["key"], "split": shard["split"]})
  return out
