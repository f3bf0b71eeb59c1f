"""Metrics against hand-computed values, sklearn/scipy references and a brute-force HD95."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from genesis_jax.eval import metrics


def test_auc_hand_computed_and_sklearn():
  # Positive/negative pairs: (0.35 > 0.1), (0.35 < 0.4), (0.8 > both) -> 3 of 4 ordered right.
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
  assert metrics.auc([1, 0], [0.9, 0.1]) == 1.0
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  s = rng.random(200) + 0.3 * y
  assert metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s))
  assert isinstance(metrics.auc(y, s), float)


def test_auc_rejects_single_class_and_mismatch():
  with pytest.raises(ValueError, match="both classes"):
    metrics.auc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="entries"):
    metrics.auc([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="every class"):
    metrics.auc([0, 1, 1], np.full((3, 3), 1 / 3))


def test_auc_two_column_and_multiclass():
  y = np.array([0, 0, 1, 1])
  s = np.array([0.1, 0.4, 0.35, 0.8])
  assert metrics.auc(y, np.stack([1 - s, s], 1)) == pytest.approx(0.75)
  rng = np.random.default_rng(2)
  y3 = np.arange(30) % 3
  p = rng.random((30, 3)) + np.eye(3)[y3]
  p /= p.sum(1, keepdims=True)
  assert metrics.auc(y3, p) == pytest.approx(roc_auc_score(y3, p, multi_class="ovr"))


def test_dice_iou_hand_computed():
  pred = np.array([1, 1, 0, 0], bool).reshape(1, 2, 2)
  target = np.array([1, 0, 1, 0], bool).reshape(1, 2, 2)
  assert metrics.dice(pred, target) == pytest.approx(0.5)  # 2*1 / (2+2)
  assert metrics.iou(pred, target) == pytest.approx(1 / 3)  # 1 / 3
  a = np.zeros((6, 6, 6), np.uint8)
  b = np.zeros((6, 6, 6), np.uint8)
  a[:4], b[2:] = 1, 1  # 144 and 144 voxels, overlap 72.
  assert metrics.dice(a, b) == pytest.approx(0.5)
  assert metrics.iou(a, b) == pytest.approx(72 / 216)
  assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0


def test_dice_iou_relation_on_random_masks():
  rng = np.random.default_rng(1)
  p, t = rng.random((2, 5, 6, 7)) > 0.6
  d, j = metrics.dice(p, t), metrics.iou(p, t)
  assert d == pytest.approx(2 * j / (1 + j))


def test_empty_mask_policy():
  z = np.zeros((4, 4, 4), bool)
  o = z.copy()
  o[1, 1, 1] = True
  assert metrics.dice(z, z) == 1.0 and metrics.iou(z, z) == 1.0
  assert metrics.dice(z, o) == 0.0 and metrics.dice(o, z) == 0.0
  assert metrics.iou(o, z) == 0.0
  assert metrics.hd95(z, z) == 0.0
  assert metrics.hd95(z, o) == float("inf") and metrics.hd95(o, z) == float("inf")


def test_bad_masks_raise():
  with pytest.raises(ValueError, match="binary"):
    metrics.dice(np.full((2, 2, 2), 0.7), np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="shape"):
    metrics.iou(np.ones((2, 2, 2)), np.ones((2, 2, 3)))
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(np.ones((2, 3, 3, 3)), np.ones((2, 3, 3, 3)))


def test_hd95_single_voxels_with_spacing():
  a = np.zeros((8, 4, 4), bool)
  b = np.zeros((8, 4, 4), bool)
  a[1, 2, 2], b[4, 2, 2] = True, True
  assert metrics.hd95(a, b) == pytest.approx(3.0)
  assert metrics.hd95(a, b, spacing=(2.0, 1.0, 0.5)) == pytest.approx(6.0)
  assert metrics.hd95(a, a) == 0.0


def _brute_hd95(p, t, spacing):
  """Reference: surface voxels by explicit 6-neighbour test, all pairwise distances."""
  def surface(m):
    padded = np.pad(m, 1)
    inner = np.ones_like(m)
    for ax in range(m.ndim):
      for sh in (-1, 1):
        inner &= np.roll(padded, sh, axis=ax)[tuple(slice(1, -1) for _ in m.shape)]
    return np.argwhere(m & ~inner) * np.asarray(spacing)
  ps, ts = surface(p), surface(t)
  d = cdist(ps, ts)
  return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*(np.arange(n) for n in (14, 12, 10)), indexing="ij"), -1)
  spacing = (0.7, 1.0, 2.5)

  def blob():
    c = rng.uniform(3, 8, 3)
    r = rng.uniform(2, 4)
    return (np.linalg.norm((grid - c) * spacing, axis=-1) < r * 1.5) | (rng.random(grid.shape[:3]) > 0.995)

  p, t = blob(), blob()
  assert metrics.hd95(p, t, spacing) == pytest.approx(_brute_hd95(p, t, spacing), rel=1e-6)


def test_hd95_2d():
  a = np.zeros((10, 10), bool)
  b = np.zeros((10, 10), bool)
  a[2:5, 2:5] = True
  b[2:5, 6:9] = True
  assert metrics.hd95(a, b, spacing=(1.0, 1.0)) == pytest.approx(_brute_hd95(a, b, (1, 1)))


def test_segmentation_metrics_per_case_and_means():
  a = np.zeros((3, 6, 6, 6), bool)
  b = np.zeros((3, 6, 6, 6), bool)
  a[0, :4], b[0, 2:] = True, True  # dice 0.5
  a[1, :3], b[1, :3] = True, True  # dice 1
  b[2, 0, 0, 0] = True  # pred empty, target not: dice 0, hd95 undefined
  r = metrics.segmentation_metrics(a, b, spacing=(1.0, 1.0, 2.0), hd=True)
  assert r["n"] == 3
  assert r["dice"] == pytest.approx([0.5, 1.0, 0.0])
  assert r["iou"] == pytest.approx([1 / 3, 1.0, 0.0])
  assert r["mean_dice"] == pytest.approx(0.5)
  assert r["std_dice"] == pytest.approx(np.std([0.5, 1.0, 0.0]))
  assert r["hd95"][1] == 0.0 and r["hd95"][2] == float("inf")
  assert r["hd95"][0] == pytest.approx(metrics.hd95(a[0], b[0], (1.0, 1.0, 2.0)))
  assert r["mean_hd95"] == pytest.approx(np.mean(r["hd95"][:2]))
  assert r["hd95_undefined"] == 1
  # Cases of different shapes, one spacing per case.
  r2 = metrics.segmentation_metrics([a[0], a[1, :5]], [b[0], b[1, :5]],
                                    spacing=[(1, 1, 1), (2, 2, 2)], hd=True)
  assert r2["dice"] == pytest.approx([0.5, 1.0]) and "hd95" in r2
  with pytest.raises(ValueError, match="case 1"):
    metrics.segmentation_metrics([a[0], a[1]], [b[0], b[1, :5]])
  with pytest.raises(ValueError, match="spacings"):
    metrics.segmentation_metrics(a, b, spacing=[(1, 1, 1)] * 2, hd=True)


def test_foreground_rule_matches_the_written_masks():
  from genesis_jax.eval import inference
  p1 = np.array([0.2, 0.5, 0.5000001, 0.9], np.float32).reshape(4, 1, 1, 1)
  np.testing.assert_array_equal(metrics.foreground(p1)[:, 0, 0], [False, True, True, True])
  np.testing.assert_array_equal(metrics.foreground(p1, 0.6)[:, 0, 0], [False, False, False, True])
  p3 = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]], np.float32).reshape(3, 1, 1, 3)
  np.testing.assert_array_equal(metrics.foreground(p3)[:, 0, 0], [False, True, True])
  # What predict / predict_to_nifti write, > 0, is the same mask for one and for several classes.
  for p in (p1, p3):
    np.testing.assert_array_equal(inference.segmentation_output(p, 0.5) > 0, metrics.foreground(p))


def test_iou_original_hand_computed():
  # 8 voxels, 3 foreground. Probabilities straddle the thresholds 0.5 .. 0.95.
  target = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
  prob = np.array([0.97, 0.7, 0.4, 0.6, 0.1, 0.0, 0.2, 0.3])
  counts = metrics.threshold_confusion(prob, target)
  assert counts.shape == (10, 4)
  # t = 0.5: predicted {0.97, 0.7, 0.6} -> tp 2, fp 1, fn 1, tn 4.
  np.testing.assert_array_equal(counts[0], [2, 1, 1, 4])
  # t = 0.95: predicted {0.97} -> tp 1, fp 0, fn 2, tn 5.
  np.testing.assert_array_equal(counts[-1], [1, 0, 2, 5])
  # Per threshold: (fg IoU + bg IoU) / 2. t = 0.5, 0.55: fg 2/4, bg 4/6; t = 0.6 .. 0.65: the
  # voxel at 0.6 is not > 0.6 -> fg 2/3, bg 5/6; t = 0.7 .. 0.95: fg 1/3, bg 5/7.
  expected = np.mean([(2 / 4 + 4 / 6) / 2] * 2 + [(2 / 3 + 5 / 6) / 2] * 2
                     + [(1 / 3 + 5 / 7) / 2] * 6)
  assert metrics.iou_original(counts) == pytest.approx(expected)
  # Foreground IoU of the same prediction at 0.5 is much lower (the background dominates).
  assert metrics.iou(prob >= 0.5, target) == pytest.approx(2 / 4)
  # Perfect and empty cases; counts of cases add up to their union.
  assert metrics.iou_original(metrics.threshold_confusion(target * 1.0, target)) == 1.0
  none = np.zeros(8, bool)
  assert metrics.iou_original(metrics.threshold_confusion(np.zeros(8), none)) == 1.0
  both = metrics.threshold_confusion(np.concatenate([prob, prob]), np.concatenate([target] * 2))
  np.testing.assert_array_equal(both, 2 * counts)


def test_segmentation_metrics_original_iou_fields():
  target = np.zeros((2, 4, 4, 2), bool)
  target[0, :2] = True
  target[1, 1:3, 1:3] = True
  prob = np.where(target, 0.8, 0.2)
  prob[1, 0, 0, 0] = 0.9  # One false positive in case 1.
  pred = prob >= 0.5
  confusions = [metrics.threshold_confusion(p, t) for p, t in zip(prob, target)]
  out = metrics.segmentation_metrics(pred, target, confusions=confusions)
  plain = metrics.segmentation_metrics(pred, target)
  for k, v in plain.items():  # The existing fields are unchanged.
    assert out[k] == v
  # Case 0 (16 of 32 voxels foreground at 0.8): t = 0.5 .. 0.75 perfect (1.0); t = 0.8 .. 0.95
  # nothing predicted (strict >): fg IoU 0, bg IoU 16/32 -> 0.25.
  assert out["iou_original"][0] == pytest.approx((6 * 1.0 + 4 * 0.25) / 10)
  assert out["mean_iou_original"] == pytest.approx(np.mean(out["iou_original"]))
  assert out["pooled_iou_original"] == pytest.approx(
      metrics.iou_original(confusions[0] + confusions[1]))
  np.testing.assert_allclose(metrics.foreground_probability(prob[..., None]), prob)
  softmax = np.stack([1 - prob, prob * 0.5, prob * 0.5], -1)
  np.testing.assert_allclose(metrics.foreground_probability(softmax), prob, rtol=1e-6)
  with pytest.raises(ValueError, match="confusion counts"):
    metrics.segmentation_metrics(pred, target, confusions=confusions[:1])
