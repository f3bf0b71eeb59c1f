"""Command line of the phantom generator: writes (or reuses) a phantom data set folder."""
from __future__ import annotations

import argparse
import csv
import time

from genesis_jax.data.phantoms import dataset


def main(argv=None) -> None:
  """`python -m genesis_jax.data.phantoms --out DIR [--subjects N] [--seed S] [--shape X Y Z]`."""
  parser = argparse.ArgumentParser(
      prog="python -m genesis_jax.data.phantoms",
      description="Write the built-in procedural chest-CT phantom data set (NIfTI, MSD layout).")
  parser.add_argument("--out", required=True, help="Data set folder to create (or reuse).")
  parser.add_argument("--subjects", type=int, default=24, help="Number of subjects.")
  parser.add_argument("--seed", type=int, default=0, help="Data set seed.")
  parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96),
                      metavar=("X", "Y", "Z"), help="Voxels per subject along x, y, z.")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  root = dataset.write_phantom_dataset(args.out, args.subjects, args.seed, tuple(args.shape))
  with open(root / "candidates.csv") as f:
    labels = [int(r["class"]) for r in csv.DictReader(f)]
  print(f"{root}: {args.subjects} subjects of {tuple(args.shape)}, {len(labels)} candidates "
        f"({sum(labels)} nodules), {time.perf_counter() - start:.1f} s.")

