"""How separable is the built-in DRR multi-label task from raw pixels? A cheap baseline.

  python bench/drr_separability.py [--subjects 120] [--crop 64] [--pixels 32] [--folds 5]

Draws the radiographs of configs/finetune_xray_cls.py's subjects in memory (phantom_seed 1, both
views, genesis_jax.data.phantoms.xray_dataset.make_subject_drrs), prepares each image as the task
does (percentile normalisation, letterboxed to --crop), averages it down to --pixels a side, and
fits one L2 logistic regression per finding (scikit-learn) on the standardised pixels. Folds are
grouped by subject (both views of a subject in one fold); the AUC of each finding is computed on
the out-of-fold predictions of every image; the means are over all findings, the nodule findings
(from the 3D nodules) and the radiograph findings (radiograph_findings.py). A task a learned model
can gain on has a mean AUC here clearly above 0.5 but well below 1.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from genesis_jax.data.phantoms import drr, xray_dataset
from genesis_jax.data.tasks import images2d_tasks


def images_and_labels(subjects: int, seed: int, shape, crop: int, pixels: int):
  """(x (N, pixels * pixels), y (N, K) 0/1, groups (N,)) of both views of every subject."""
  xs, ys, groups = [], [], []
  for i in range(subjects):
    for image in xray_dataset.make_subject_drrs(i, seed, shape, ("pa", "lateral")).values():
      boxed, _ = images2d_tasks.letterbox(images2d_tasks.normalise(image.image), (crop, crop),
                                          order=1)
      f = crop // pixels
      xs.append(boxed.reshape(pixels, f, pixels, f).mean(axis=(1, 3)).ravel())
      ys.append([float(k in image.findings) for k in drr.FINDINGS])
      groups.append(i)
  return np.stack(xs), np.asarray(ys), np.asarray(groups)


def out_of_fold_auc(x, y, groups, folds: int, c: float) -> list[float | None]:
  """Per-finding AUC of out-of-fold logistic-regression scores (None: a constant finding)."""
  aucs = []
  for k in range(y.shape[1]):
    if y[:, k].min() == y[:, k].max():
      aucs.append(None)
      continue
    score = np.zeros(len(y))
    for train, test in GroupKFold(folds).split(x, y[:, k], groups):
      if y[train, k].min() == y[train, k].max():
        score[test] = y[train, k].mean()
        continue
      model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
      model.fit(x[train], y[train, k])
      score[test] = model.predict_proba(x[test])[:, 1]
    aucs.append(float(roc_auc_score(y[:, k], score)))
  return aucs


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--subjects", type=int, default=120)
  p.add_argument("--seed", type=int, default=1)
  p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
  p.add_argument("--crop", type=int, default=64, help="letterboxed image size (the task's crop)")
  p.add_argument("--pixels", type=int, default=32, help="pixels a side fed to the regression")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--c", type=float, default=0.01, help="inverse L2 strength")
  args = p.parse_args(argv)
  t0 = time.time()
  x, y, groups = images_and_labels(args.subjects, args.seed, tuple(args.shape), args.crop,
                                   args.pixels)
  t1 = time.time()
  aucs = out_of_fold_auc(x, y, groups, args.folds, args.c)
  print(f"{args.subjects} subjects x 2 views, crop {args.crop}, {args.pixels}x{args.pixels} "
        f"pixels, {args.folds} folds by subject, C={args.c} (images {t1 - t0:.0f} s, "
        f"fits {time.time() - t1:.0f} s)")
  print(f"{'finding':<18} {'prevalence':>10} {'AUC':>6}")
  for name, prev, auc in zip(drr.FINDINGS, y.mean(axis=0), aucs):
    print(f"{name:<18} {prev:>10.2f} {'-' if auc is None else f'{auc:.3f}':>6}")
  groups_of = {"mean": drr.FINDINGS, "mean, nodule findings": drr.NODULE_FINDINGS,
               "mean, radiograph findings": drr.RADIOGRAPH_FINDINGS}
  for label, names in groups_of.items():
    valid = [a for n, a in zip(drr.FINDINGS, aucs) if a is not None and n in names]
    if valid:
      print(f"{label:<29} {np.mean(valid):.3f}")


if __name__ == "__main__":
  main()
