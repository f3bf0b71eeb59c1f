"""Target-task data for fine-tuning (`load(config, workdir)`), split by case: train / val / test.

Cases are the subjects of an MSD / nnU-Net layout folder (segmentation), or the scans that a
LUNA16-style candidates CSV refers to (classification). The built-in phantom data is written in
exactly that layout first, so the built-in tasks go through the same code as users' data.
Splits take cases in sorted order: the first `train_cases` train, the next `val_cases` validate,
the next `test_cases` test; they never depend on the trial seed, so every arm and trial of an
experiment sees the same split. `train_subset` k > 0 trains on only the first k of the training
cases with validation and test unchanged: a labelled-budget sweep keeps its test set.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from genesis_jax import errors
from genesis_jax.data import preprocess as preprocess_lib
from genesis_jax.data import readers
from genesis_jax.data.tasks import candidates as candidates_lib
from genesis_jax.data.tasks import segmentation


def num_cases(d) -> int:
  """Cases a target task uses (config.data): train + val + test; also the phantom data's size."""
  return int(d.train_cases + d.val_cases + d.test_cases)


def _root(config, workdir: pathlib.Path) -> pathlib.Path:
  d = config.data
  if d.source == "phantom":
    from genesis_jax.data import phantoms
    n = num_cases(d)
    root = pathlib.Path(d.path) if d.path else workdir / "phantoms"
    return pathlib.Path(phantoms.write_phantom_dataset(root, n, int(d.phantom_seed),
                                                       tuple(d.phantom_shape)))
  if d.source != "folder":
    raise errors.ConfigError(
        f"fine-tuning reads config.data.source 'phantom' or 'folder', got {d.source!r}.")
  if not pathlib.Path(d.path).exists():
    raise errors.MissingPathError(f"config.data.path={d.path!r}: no such folder; give the folder "
                                  "of the target task (imagesTr/, labelsTr/ or scans).")
  return pathlib.Path(d.path)


def split_ids(ids: list[str], d, what: str) -> dict[str, list[str]]:
  """Sorted case ids -> {"train", "val", "test": ids} by config.data's case counts."""
  need = num_cases(d)
  if len(ids) < need:
    raise errors.ConfigError(
        f"{what}: {len(ids)} cases, but train_cases + val_cases + test_cases = {need} "
        f"({d.train_cases} + {d.val_cases} + {d.test_cases}); lower them in config.data.")
  a, b = int(d.train_cases), int(d.train_cases + d.val_cases)
  subset = int(d.get("train_subset", 0))
  if not 0 <= subset <= a:
    raise errors.ConfigError(f"config.data.train_subset={subset} must be in [0, train_cases={a}] "
                             f"(0 = all training cases).")
  return {"train": ids[:subset or a], "val": ids[a:b], "test": ids[b:need]}


def _segmentation(config, root: pathlib.Path) -> dict[str, Any]:
  d = config.data
  cases = segmentation.segmentation_cases(root)
  num_classes = segmentation.read_num_classes(root)
  by_id = {c.case_id: c for c in cases}
  split = split_ids(sorted(by_id), d, f"segmentation data at {root}")
  pairs = {k: [segmentation.load_segmentation_case(by_id[i], num_classes) for i in ids]
           for k, ids in split.items()}
  out = {}
  for k, seed in (("train", 0), ("val", 1)):  # Fixed data seeds: the same cubes in every trial.
    out[k] = segmentation.segmentation_cubes(pairs[k], d.crop, d,
                                             per_case=int(d.cubes_per_case),
                                             fg_fraction=float(d.fg_fraction), seed=seed)
  out["test_volumes"] = [preprocess_lib.preprocess_pair(v, lab, d) for v, lab in pairs["test"]]
  out["split"] = split
  out["case_ids"] = {k: np.repeat(split[k], int(d.cubes_per_case)) for k in ("train", "val")}
  return out


def _scan_paths(root: pathlib.Path) -> dict[str, pathlib.Path]:
  folder = root / "imagesTr" if (root / "imagesTr").is_dir() else root
  paths = {}
  for p in readers.find_scans(folder):
    paths[readers.case_id(p)] = p  # nnU-Net channel suffix dropped: phantom_007_0000 -> phantom_007
  return paths


def _classification(config, root: pathlib.Path) -> dict[str, Any]:
  d = config.data
  csv_path = pathlib.Path(d.candidates) if d.candidates else root / "candidates.csv"
  if not csv_path.exists():
    raise errors.MissingPathError(f"candidates CSV {csv_path} does not exist; set "
                                  "config.data.candidates to the CSV of candidate locations.")
  candidates = candidates_lib.read_candidates_csv(csv_path)
  paths = _scan_paths(root)
  ids = sorted({c.scan_id for c in candidates} & set(paths))
  missing = sorted({c.scan_id for c in candidates} - set(paths))
  if missing:
    raise errors.DataError(f"{csv_path}: {len(missing)} scan id(s) have no scan under {root}, "
                           f"e.g. {missing[:3]}.")
  split = split_ids(ids, d, f"classification data at {root}")
  out, case_ids = {}, {}
  for k, sids in split.items():
    chosen = [c for c in candidates if c.scan_id in set(sids)]
    case_ids[k] = np.array([c.scan_id for c in chosen])  # classification_cubes keeps this order.
    scans = candidates_lib.LazyScans({s: paths[s] for s in sids})
    x, y = candidates_lib.classification_cubes(scans, chosen, d.crop, d)
    if k != "test" and len(np.unique(y)) < 2:
      raise errors.DataError(
          f"classification {k} split has only class {np.unique(y)}; add cases.")
    out[k] = (x, y)
  out["split"] = split
  out["case_ids"] = case_ids
  return out


def load(config, workdir: pathlib.Path) -> dict[str, Any]:
  """{"train": (x, y), "val": (x, y), "test": (x, y)} (classify) or with "test_volumes" (segment).

  x: (N, *crop, 1) float32 in [0, 1]; y: (N,) int (classify) or (N, *crop, 1) uint8 (segment).
  Also "split" ({split: case ids}) and "case_ids" ({split: (N,) the case of each cube}).
  """
  from genesis_jax.data.tasks import images2d_tasks  # pylint: disable=import-outside-toplevel
  if config.task.kind == "multilabel" or images2d_tasks.is_image_task(config):  # 2D images.
    return images2d_tasks.load(config, workdir, split_ids)
  root = _root(config, pathlib.Path(workdir))
  if config.task.kind == "segment":
    return _segmentation(config, root)
  return _classification(config, root)
