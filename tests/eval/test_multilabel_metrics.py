"""Multi-label AUC (per class and mean) against scikit-learn, and its bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from genesis_jax.eval import metrics


def test_multilabel_auc_matches_sklearn_per_class_and_macro():
  rng = np.random.default_rng(0)
  y = (rng.uniform(size=(60, 5)) < [0.1, 0.3, 0.5, 0.7, 0.9]).astype(int)
  s = y * rng.uniform(0.0, 1.0, y.shape) + rng.uniform(0.0, 0.8, y.shape)
  out = metrics.multilabel_auc(y, s)
  for k in range(5):
    assert out["per_class"][k] == pytest.approx(sk_metrics.roc_auc_score(y[:, k], s[:, k]))
  assert out["mean"] == pytest.approx(sk_metrics.roc_auc_score(y, s, average="macro"))
  assert out["n_defined"] == 5


def test_a_single_class_column_has_no_auc_and_is_left_out_of_the_mean():
  y = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 1, 0]])
  s = np.array([[0.9, 0.2, 0.8], [0.1, 0.7, 0.3], [0.5, 0.4, 0.6], [0.3, 0.9, 0.1]])
  out = metrics.multilabel_auc(y, s)
  assert out["per_class"][0] is None
  expected = [sk_metrics.roc_auc_score(y[:, k], s[:, k]) for k in (1, 2)]
  assert out["per_class"][1:] == pytest.approx(expected)
  assert out["mean"] == pytest.approx(np.mean(expected)) and out["n_defined"] == 2
  assert metrics.multilabel_auc(np.ones((3, 2)), np.zeros((3, 2)))["mean"] is None


@pytest.mark.parametrize("y, s, match", [
    (np.zeros((3, 2)), np.zeros((3, 3)), "one \\(N, K\\) shape"),
    (np.array([[0, 2], [1, 0]]), np.zeros((2, 2)), "must be 0/1"),
    (np.array([[0, 1], [1, 0]]), np.array([[np.nan, 0], [0, 0]]), "NaN"),
])
def test_bad_inputs_are_named(y, s, match):
  with pytest.raises(metrics.MetricInputError, match=match):
    metrics.multilabel_auc(y, s)
