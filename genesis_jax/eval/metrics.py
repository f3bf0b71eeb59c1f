"""Evaluation metrics for the target tasks: AUC (classification; per class and mean for
multi-label), Dice, IoU and HD95 (segmentation).

numpy in, python floats out. Masks are binary arrays (bool or {0, 1}) of any spatial shape,
(x, y, z) for 3D or (x, y) for 2D. `dice` and `iou` pool every voxel they are given, so a stack
(N, x, y, z) gives the global (dataset-level) score; `segmentation_metrics` gives per-case scores.

Empty-mask policy (chosen so that every case has a finite Dice/IoU and means stay defined):
- Dice and IoU: prediction and ground truth both empty -> 1.0 (perfect agreement on "nothing
  there"); exactly one of them empty -> 0.0.
- HD95: both empty -> 0.0; exactly one empty -> inf (no surface to measure to). The mean HD95 in
  `segmentation_metrics` is taken over the finite cases and the undefined ones are counted.

AUC is sklearn's `roc_auc_score`; surface distances use scipy.ndimage's Euclidean distance
transform with the voxel spacing in millimetres, so HD95 is in millimetres.

The original's IoU. `iou` is the foreground IoU. The IoU the original code reports for its
segmentation tasks (its Keras `mean_iou` metric, docs/method.md) is another quantity: for each
threshold t in 0.5, 0.55, ..., 0.95 the prediction is `probability > t`, the IoU of the foreground
and the IoU of the background are averaged (TensorFlow's two-class mean IoU over the pooled
confusion matrix; a class with an empty union is left out), and the ten values are averaged.
Background voxels dominate, so it is much higher than the foreground IoU of the same prediction.
`threshold_confusion` counts one case, `iou_original` scores counts summed over any cases.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn import metrics as sk_metrics

from genesis_jax import errors


class MetricInputError(errors.DataError):
  """Inputs a metric cannot score: wrong shapes, non-binary masks, a single class for AUC."""


def _as_mask(x, name: str) -> np.ndarray:
  """Returns `x` as a bool array; raises if it holds values other than 0/1 (e.g. probabilities)."""
  a = np.asarray(x)
  if a.dtype == bool:
    return a
  if a.size and not np.all((a == 0) | (a == 1)):
    bad = a[(a != 0) & (a != 1)].ravel()[0]
    raise MetricInputError(
        f"{name} must be a binary mask (bool or 0/1), found value {bad!r}; threshold "
        "probabilities first (e.g. probs >= 0.5).")
  return a.astype(bool)


def foreground(probs, threshold: float = 0.5) -> np.ndarray:
  """(..., K) segmentation probabilities -> bool foreground mask, the rule every output uses.

  K = 1 (sigmoid): probability >= threshold. K > 1 (softmax, class 0 = background): the argmax
  is not class 0 (threshold unused). Fine-tuning's validation and test metrics and `predict`'s
  masks all go through this, so a voxel at exactly the threshold counts the same everywhere.
  """
  p = np.asarray(probs)
  if p.shape[-1] == 1:
    return p[..., 0] >= threshold
  return np.argmax(p, axis=-1) > 0


def foreground_probability(probs) -> np.ndarray:
  """(..., K) segmentation probabilities -> (...) foreground probability: the sigmoid output for
  K = 1, 1 - p(class 0) for a softmax over K > 1 classes (class 0 = background)."""
  p = np.asarray(probs, dtype=np.float32)
  return p[..., 0] if p.shape[-1] == 1 else 1.0 - p[..., 0]


# The thresholds of the original's `mean_iou` metric: np.arange(0.5, 1.0, 0.05).
ORIGINAL_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def threshold_confusion(fg_prob, target,
                        thresholds: Sequence[float] = ORIGINAL_IOU_THRESHOLDS) -> np.ndarray:
  """(T, 4) int64 voxel counts (tp, fp, fn, tn) of `fg_prob > t` against a binary target, one row
  per threshold t. Counts of several cases add up to those of their union."""
  prob = np.asarray(fg_prob)
  t = _as_mask(target, "target")
  if prob.shape != t.shape:
    raise MetricInputError(f"fg_prob shape {prob.shape} != target shape {t.shape}")
  n_pos = int(t.sum())
  rows = []
  for thr in thresholds:
    p = prob > thr
    tp = int(np.logical_and(p, t).sum())
    fp = int(p.sum()) - tp
    fn = n_pos - tp
    rows.append((tp, fp, fn, t.size - tp - fp - fn))
  return np.asarray(rows, dtype=np.int64).reshape(len(thresholds), 4)


def iou_original(confusion) -> float:
  """The original's IoU from `threshold_confusion` counts (see the module docstring): per
  threshold the mean of foreground IoU tp / (tp + fp + fn) and background IoU tn / (tn + fp + fn)
  over the classes whose union is non-empty (0 if neither is), then the mean over thresholds."""
  c = np.asarray(confusion, dtype=np.float64).reshape(-1, 4)
  tp, fp, fn, tn = c.T
  fg_union, bg_union = tp + fp + fn, tn + fp + fn
  valid = (fg_union > 0).astype(np.float64) + (bg_union > 0)
  total = (np.where(fg_union > 0, tp / np.maximum(fg_union, 1), 0.0)
           + np.where(bg_union > 0, tn / np.maximum(bg_union, 1), 0.0))
  return float(np.mean(np.where(valid > 0, total / np.maximum(valid, 1), 0.0)))


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
  p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
  if p.shape != t.shape:
    raise MetricInputError(f"pred shape {p.shape} != target shape {t.shape}")
  return p, t


def auc(labels, scores) -> float:
  """Area under the ROC curve.

  Binary: labels 0/1 (N,), scores (N,) real-valued, higher = positive; (N, 2) class
  probabilities use column 1. Multi-class: integer labels 0..K-1 and scores (N, K) class
  probabilities (rows summing to 1), macro-averaged one-vs-rest AUC.
  """
  y = np.asarray(labels).ravel()
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim == 2 and s.shape[1] == 2:
    s = s[:, 1]
  if s.ndim == 2 and s.shape[1] == 1:
    s = s[:, 0]
  if s.ndim > 2 or s.shape[0] != y.size:
    raise MetricInputError(f"labels has {y.size} entries but scores has shape {s.shape}")
  if not np.all(np.isfinite(s)):
    raise MetricInputError("scores contain NaN or Inf")
  classes = np.unique(y)
  if s.ndim == 2:
    if not set(classes.tolist()) <= set(range(s.shape[1])) or classes.size != s.shape[1]:
      raise MetricInputError(
          f"multi-class AUC needs every class 0..{s.shape[1] - 1} present in labels, found "
          f"{classes.tolist()}")
    return float(sk_metrics.roc_auc_score(y, s, multi_class="ovr", average="macro"))
  if classes.size != 2:
    raise MetricInputError(
        f"AUC needs both classes present in labels, found {classes.tolist()}")
  return float(sk_metrics.roc_auc_score(y, s))


def multilabel_auc(labels, scores) -> dict:
  """Per-class and mean AUC of a multi-label task (ChestX-ray8's metric).

  labels (N, K) 0/1, scores (N, K) real (e.g. sigmoid probabilities). Class k's AUC is
  sklearn's `roc_auc_score` on column k, None when column k holds a single class (no AUC
  defined); "mean" averages the defined ones (None if none is) and "n_defined" counts them.
  """
  y = np.asarray(labels)
  s = np.asarray(scores, dtype=np.float64)
  if y.ndim != 2 or s.shape != y.shape:
    raise MetricInputError(f"multi-label AUC needs labels and scores of one (N, K) shape, got "
                           f"{y.shape} and {s.shape}")
  if not np.all(np.isfinite(s)):
    raise MetricInputError("scores contain NaN or Inf")
  if y.size and not np.all((y == 0) | (y == 1)):
    raise MetricInputError("multi-label labels must be 0/1")
  per_class = [float(sk_metrics.roc_auc_score(y[:, k], s[:, k]))
               if np.unique(y[:, k]).size == 2 else None for k in range(y.shape[1])]
  defined = [a for a in per_class if a is not None]
  return {"per_class": per_class, "mean": float(np.mean(defined)) if defined else None,
          "n_defined": len(defined)}


def dice(pred, target) -> float:
  """Dice = 2|P & T| / (|P| + |T|); 1.0 when both are empty (see module docstring)."""
  p, t = _pair(pred, target)
  denom = int(p.sum()) + int(t.sum())
  if denom == 0:
    return 1.0
  return 2.0 * int(np.logical_and(p, t).sum()) / denom


def iou(pred, target) -> float:
  """Intersection over union (Jaccard) = |P & T| / |P | T|; 1.0 when both are empty."""
  p, t = _pair(pred, target)
  union = int(np.logical_or(p, t).sum())
  if union == 0:
    return 1.0
  return int(np.logical_and(p, t).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of `mask` with a face-neighbour outside it; the array border counts as outside."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, target, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances in mm: (pred surface -> target surface, target -> pred).

  Both masks must be non-empty.
  """
  p, t = _pair(pred, target)
  sp = tuple(float(s) for s in spacing)
  if len(sp) != p.ndim:
    raise MetricInputError(
        f"spacing {sp} has {len(sp)} entries for masks with {p.ndim} spatial axes {p.shape}")
  if not p.any() or not t.any():
    raise MetricInputError("surface distances need non-empty pred and target")
  ps, ts = _surface(p), _surface(t)
  # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel.
  to_t = ndimage.distance_transform_edt(~ts, sampling=sp)
  to_p = ndimage.distance_transform_edt(~ps, sampling=sp)
  return to_t[ps], to_p[ts]


def hd95(pred, target, spacing: Sequence[float] = (1, 1, 1)) -> float:
  """95th-percentile symmetric Hausdorff distance in mm between the mask surfaces.

  The percentile is taken over both directed distance sets pooled (MedPy's definition).
  `spacing` is the voxel size along each mask axis, e.g. `Volume.spacing`. Both empty -> 0.0,
  one empty -> inf.
  """
  p, t = _pair(pred, target)
  if len(tuple(spacing)) != p.ndim:
    raise MetricInputError(
        f"spacing {tuple(spacing)} does not match masks with {p.ndim} axes {p.shape}; hd95 takes "
        "one case (use segmentation_metrics for a stack) and 2D masks need a 2-entry spacing")
  if not p.any() and not t.any():
    return 0.0
  if not p.any() or not t.any():
    return float("inf")
  d_pt, d_tp = surface_distances(p, t, spacing)
  return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def segmentation_metrics(preds, targets, spacing=None, hd: bool = False,
                         confusions=None) -> dict:
  """Per-case and mean Dice/IoU (and HD95 if `hd`) over a set of cases.

  Args:
    preds, targets: a stacked array (N, x, y, z) / (N, x, y), or sequences of N binary masks
      (cases may differ in shape).
    spacing: None (unit voxels), one spacing for every case, or a sequence of N spacings.
    hd: also compute HD95 (slower: two distance transforms per case).
    confusions: None, or N `threshold_confusion` arrays (one per case, from its probabilities)
      for the original's IoU.

  Returns:
    {"n", "dice", "iou", "mean_dice", "std_dice", "mean_iou", "std_iou"} and, with `hd`,
    {"hd95", "mean_hd95", "hd95_undefined"}: lists hold per-case python floats, std is the
    population std over cases, mean_hd95 is over finite cases (NaN if none) and
    hd95_undefined counts cases with exactly one empty mask. With `confusions`, the original's
    IoU (`iou_original`): "iou_original" per case, "mean_iou_original" their mean, and
    "pooled_iou_original" over every voxel of every case (as the original pools its test cubes).
  """
  preds, targets = list(preds), list(targets)
  if len(preds) != len(targets):
    raise MetricInputError(f"{len(preds)} predictions but {len(targets)} targets")
  n = len(preds)
  if n == 0:
    raise MetricInputError("segmentation_metrics needs at least one case")
  if spacing is None:
    spacings = [None] * n
  elif np.ndim(spacing) == 1:
    spacings = [tuple(float(s) for s in spacing)] * n
  elif np.ndim(spacing) == 2:
    spacings = [tuple(float(v) for v in s) for s in spacing]
    if len(spacings) != n:
      raise MetricInputError(f"{len(spacings)} spacings for {n} cases")
  else:
    raise MetricInputError(f"spacing must be one (x, y, z) tuple or one per case, got {spacing!r}")

  out: dict = {"n": n, "dice": [], "iou": []}
  if hd:
    out["hd95"] = []
  for i, (p, t) in enumerate(zip(preds, targets)):
    try:
      out["dice"].append(dice(p, t))
      out["iou"].append(iou(p, t))
      if hd:
        sp = spacings[i] if spacings[i] is not None else (1.0,) * np.ndim(p)
        out["hd95"].append(hd95(p, t, sp))
    except MetricInputError as e:
      raise MetricInputError(f"case {i}: {e}") from e
  for k in ("dice", "iou"):
    out[f"mean_{k}"] = float(np.mean(out[k]))
    out[f"std_{k}"] = float(np.std(out[k]))
  if confusions is not None:
    confusions = [np.asarray(c) for c in confusions]
    if len(confusions) != n:
      raise MetricInputError(f"{len(confusions)} confusion counts for {n} cases")
    out["iou_original"] = [iou_original(c) for c in confusions]
    out["mean_iou_original"] = float(np.mean(out["iou_original"]))
    out["pooled_iou_original"] = iou_original(np.sum(confusions, axis=0))
  if hd:
    finite = [h for h in out["hd95"] if np.isfinite(h)]
    out["mean_hd95"] = float(np.mean(finite)) if finite else float("nan")
    out["hd95_undefined"] = n - len(finite)
  return out
