"""Command line of the phantom generator: writes (or reuses) a phantom data set folder."""
from __future__ import annotations

import argparse
import csv
import time

from genesis_jax.data.phantoms import dataset


def main(argv=None) -> None:
  """`python -m genesis_jax.data.phantoms --out DIR [--subjects N] [--seed S] [--shape X Y Z]
  [--xray]`; --xray writes the radiographs (DRRs, xray_dataset.py) instead of the CT set."""
  parser = argparse.ArgumentParser(
      prog="python -m genesis_jax.data.phantoms",
      description="Write the built-in procedural chest-CT phantom data set (NIfTI, MSD layout).")
  parser.add_argument("--out", required=True, help="Data set folder to create (or reuse).")
  parser.add_argument("--subjects", type=int, default=24, help="Number of subjects.")
  parser.add_argument("--seed", type=int, default=0, help="Data set seed.")
  parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96),
                      metavar=("X", "Y", "Z"), help="Voxels per subject along x, y, z.")
  parser.add_argument("--xray", action="store_true", help="Write PA and lateral radiographs "
                      "(DRRs) of the subjects, labels.csv and 2D nodule masks instead.")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if args.xray:
    from genesis_jax.data.phantoms import xray_dataset  # pylint: disable=import-outside-toplevel
    root = xray_dataset.write_xray_dataset(args.out, args.subjects, args.seed, tuple(args.shape))
    with open(root / xray_dataset.LABELS_CSV) as f:
      rows = list(csv.DictReader(f))
    free = sum(r["Finding Labels"] == "No Finding" for r in rows)
    print(f"{root}: {len(rows)} radiographs of {args.subjects} subjects ({free} with no finding), "
          f"{time.perf_counter() - start:.1f} s.")
    return
  root = dataset.write_phantom_dataset(args.out, args.subjects, args.seed, tuple(args.shape))
  with open(root / "candidates.csv") as f:
    labels = [int(r["class"]) for r in csv.DictReader(f)]
  print(f"{root}: {args.subjects} subjects of {tuple(args.shape)}, {len(labels)} candidates "
        f"({sum(labels)} nodules), {time.perf_counter() - start:.1f} s.")

