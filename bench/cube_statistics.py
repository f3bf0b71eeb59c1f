"""What pre-training cubes contain, per `data.sampler`, next to the NCC candidate cubes.

  python bench/cube_statistics.py                      # 6 subjects, the configs' shape and crop
  python bench/cube_statistics.py --subjects 3 --shape 64 64 48 --crop 16 16 8   # quick look

Writes phantom subjects (the NCC target task's phantom seed, so both sides see the same kind of
anatomy) into --root, then for each sampler prepares pre-training cubes as `prepare` does
(configs/pretrain_phantom.py's data settings with the sampler set) and cuts the NCC candidate
cubes (configs/finetune_ncc.py's data settings). Per cube, on the [0, 1] scale of the default CT
window (-1000..1000 HU):
  air share:  voxels below -900 HU (value < 0.05): outside the body, airways;
  lung share: voxels in sampling.LUNG_WINDOW_HU (-900..-500 HU), lung parenchyma.
Prints the median and mean of both per row; the lung filter (`data.lung_filter`) is shown on top
of each sampler as well.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=wrong-import-position
from genesis_jax.data import prepare as prepare_lib
from genesis_jax.data import readers
from genesis_jax.data import sampling
from genesis_jax.data.phantoms import dataset as phantom_dataset
from genesis_jax.data.tasks import candidates as candidates_lib

AIR_BELOW_HU = -900.0


def cube_shares(cubes: np.ndarray, hu_window: tuple[float, float]) -> tuple[np.ndarray,
                                                                               np.ndarray]:
  """(air share, lung share) per cube of `cubes` (N, ...) in [0, 1] under `hu_window`."""
  lo, hi = hu_window
  to_unit = lambda hu: (hu - lo) / (hi - lo)  # pylint: disable=unnecessary-lambda-assignment
  flat = cubes.reshape(len(cubes), -1)
  air = np.mean(flat < to_unit(AIR_BELOW_HU), axis=1)
  w_lo, w_hi = (to_unit(h) for h in sampling.LUNG_WINDOW_HU)
  lung = np.mean((flat >= w_lo) & (flat <= w_hi), axis=1)
  return air, lung


def pretrain_cubes(data_cfg, root: pathlib.Path, seed: int = 0) -> np.ndarray:
  """The cubes `prepare` would write for every scan under `root` (N, *crop)."""
  settings = sampling.CubeSettings.from_config(data_cfg)
  out = []
  for path in readers.find_scans(root / "imagesTr"):
    cubes, _ = prepare_lib.process_scan(path, readers.case_id(path), settings, data_cfg, seed)
    out.append(cubes)
  return np.concatenate(out)


def candidate_cubes(data_cfg, root: pathlib.Path) -> np.ndarray:
  """All NCC candidate cubes of the phantom set at `root` (N, *crop, 1)."""
  cands = candidates_lib.read_candidates_csv(root / "candidates.csv")
  paths = {readers.case_id(p): p for p in readers.find_scans(root / "imagesTr")}
  x, _ = candidates_lib.classification_cubes(candidates_lib.LazyScans(paths), cands,
                                             data_cfg.crop, data_cfg)
  return x


def main(argv=None) -> None:
  # Imported here: the configs folder is not a package.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
  import finetune_ncc  # pylint: disable=import-outside-toplevel
  import pretrain_phantom  # pylint: disable=import-outside-toplevel

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", default="/tmp/cube_statistics_phantoms")
  ap.add_argument("--subjects", type=int, default=6)
  ap.add_argument("--shape", type=int, nargs=3, default=None, help="default: the configs'")
  ap.add_argument("--crop", type=int, nargs=3, default=None, help="default: the configs'")
  ap.add_argument("--cubes-per-scan", type=int, default=32)
  args = ap.parse_args(argv)

  ncc = finetune_ncc.get_config().data
  pre = pretrain_phantom.get_config().data
  shape = tuple(args.shape or ncc.phantom_shape)
  for d in (ncc, pre):
    d.crop = tuple(args.crop or d.crop)
  pre.cubes_per_scan = args.cubes_per_scan
  root = phantom_dataset.write_phantom_dataset(pathlib.Path(args.root), args.subjects,
                                               int(ncc.phantom_seed), shape)
  print(f"{args.subjects} phantom subjects {shape}, crop {tuple(pre.crop)}, "
        f"{args.cubes_per_scan} cubes per scan; air < {AIR_BELOW_HU:g} HU, "
        f"lung {sampling.LUNG_WINDOW_HU[0]:g}..{sampling.LUNG_WINDOW_HU[1]:g} HU")
  print(f"{'cubes':38s} {'n':>5s} {'air med':>8s} {'air mean':>9s} {'lung med':>9s} "
        f"{'lung mean':>10s}")
  rows = []
  for sampler in sampling.SAMPLERS:
    for lung_filter in (False, True):
      pre.sampler, pre.lung_filter = sampler, lung_filter
      rows.append((f"pretrain sampler={sampler}" + (" +filter" if lung_filter else ""),
                   pretrain_cubes(pre, root), tuple(pre.hu_window)))
  rows.append(("NCC candidates", candidate_cubes(ncc, root), tuple(ncc.hu_window)))
  for name, cubes, window in rows:
    air, lung = cube_shares(cubes, window)
    print(f"{name:38s} {len(cubes):5d} {np.median(air):8.3f} {np.mean(air):9.3f} "
          f"{np.median(lung):9.3f} {np.mean(lung):10.3f}")


if __name__ == "__main__":
  main()
