"""Preprocessing: intensity windows, exact-spacing resampling, body crop, the config-driven chain."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from configs import pretrain_genesis
from genesis_jax.data import preprocess as pp
from genesis_jax.data.volume import Volume


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = pretrain_genesis.get_config().data
  cfg.update(overrides)
  return cfg


def _world(vol: Volume, ijk) -> np.ndarray:
  return (vol.affine @ np.array([*ijk, 1.0]))[:3]


# --- normalize_intensity ---------------------------------------------------------------------------


def test_ct_default_window_maps_minus1000_1000_to_unit_interval():
  hu = np.array([-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 3071.0], np.float32)
  out = pp.normalize_intensity(hu, _cfg())
  np.testing.assert_allclose(out, [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-7)
  assert out.dtype == np.float32


def test_ct_custom_window():
  out = pp.normalize_intensity(np.array([-160.0, 40.0, 240.0, 1000.0]), _cfg(hu_window=(-160, 240)))
  np.testing.assert_allclose(out, [0, 0.5, 1, 1], atol=1e-7)


def test_mri_percentile_is_per_volume_and_clips_outliers():
  rng = np.random.default_rng(0)
  data = rng.normal(300, 50, size=(20, 20, 20)).astype(np.float32)
  data[0, 0, 0] = 1e6  # A hot voxel must not squash everything else to ~0.
  out = pp.normalize_intensity(data, _cfg(modality="mri", mri_percentiles=(1.0, 99.0)))
  assert out.min() == 0.0 and out.max() == 1.0
  assert 0.4 < np.median(out) < 0.6
  np.testing.assert_allclose(np.mean(out == 1.0), 0.01, atol=0.002)
  # Scaling the raw intensities must not change the result (no absolute MRI scale).
  np.testing.assert_allclose(
      pp.normalize_intensity(data * 7.0, _cfg(modality="mri", mri_percentiles=(1.0, 99.0))), out,
      atol=1e-5)


def test_mri_minmax_and_zscore():
  data = np.array([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
  np.testing.assert_allclose(pp.normalize_intensity(data, _cfg(modality="mri", mri_norm="minmax")),
                             data / 7.0, atol=1e-7)
  z = pp.normalize_intensity(data, _cfg(modality="mri", mri_norm="zscore"))
  expected = (np.clip((data - data.mean()) / data.std(), -3, 3) + 3) / 6
  np.testing.assert_allclose(z, expected, atol=1e-6)


def test_constant_mri_volume_maps_to_zeros_not_nan():
  out = pp.normalize_intensity(np.full((3, 3, 3), 5.0), _cfg(modality="mri"))
  np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("overrides, key", [
    ({"modality": "pet"}, "data.modality"),
    ({"modality": "mri", "mri_norm": "robust"}, "data.mri_norm"),
    ({"hu_window": (100, -100)}, "data.hu_window"),
    ({"modality": "mri", "mri_percentiles": (50, 10)}, "data.mri_percentiles"),
])
def test_bad_config_names_the_key(overrides, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    pp.normalize_intensity(np.zeros((2, 2, 2)), _cfg(**overrides))


# --- resample --------------------------------------------------------------------------------------


def _oblique_volume(shape=(20, 16, 10), spacing=(0.5, 0.75, 2.0)) -> Volume:
  rot = np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot * np.array(spacing)
  affine[:3, 3] = [10.0, -5.0, 30.0]
  i, j, k = np.indices(shape).astype(np.float32)
  data = 3.0 * i + 2.0 * j - 1.5 * k  # Linear: trilinear resampling reproduces it exactly.
  return Volume(data.astype(np.float32), affine, "ramp.nii.gz")


def test_resample_hits_target_spacing_and_keeps_world_positions():
  vol = _oblique_volume()
  out = pp.resample(vol, (1.0, 1.5, 1.0))
  np.testing.assert_allclose(out.spacing, (1.0, 1.5, 1.0))
  assert out.shape == (10, 8, 19)  # floor((n - 1) / scale) + 1 per axis: no extrapolation.
  assert out.source == vol.source
  np.testing.assert_allclose(_world(out, (0, 0, 0)), _world(vol, (0, 0, 0)))
  # A linear function of position resamples exactly; compare at the same world point.
  ijk_new = np.indices(out.shape).reshape(3, -1)
  ijk_old = np.linalg.solve(vol.affine[:3, :3], out.affine[:3, :3] @ ijk_new
                            + (out.affine[:3, 3] - vol.affine[:3, 3])[:, None])
  expected = 3.0 * ijk_old[0] + 2.0 * ijk_old[1] - 1.5 * ijk_old[2]
  np.testing.assert_allclose(out.data.reshape(-1), expected, atol=1e-4)


def test_resample_nearest_keeps_label_values_and_noop_at_same_spacing():
  vol = _oblique_volume()
  labels = Volume((vol.data > 20).astype(np.uint8), vol.affine)
  out = pp.resample(labels, (1.0, 1.0, 1.0), order=0)
  assert out.data.dtype == np.uint8 and set(np.unique(out.data)) == {0, 1}
  assert pp.resample(vol, vol.spacing) is vol


def test_resample_rejects_bad_spacing():
  with pytest.raises(ValueError, match="data.spacing"):
    pp.resample(_oblique_volume(), (1.0, 0.0, 1.0))


# --- body crop -------------------------------------------------------------------------------------


def _ct_phantom() -> Volume:
  data = np.full((40, 30, 12), -1000.0, np.float32)
  data[8:30, 5:25, 2:10] = 40.0  # Body.
  data[14:20, 10:18, 4:8] = -850.0  # A lung inside the body: stays inside the box.
  data[2:38, 27:29, :] = 200.0  # The scanner table, not touching the body.
  affine = np.diag([0.8, 0.8, 2.0, 1.0])
  affine[:3, 3] = [-16.0, -12.0, 5.0]
  return Volume(data, affine, "ct.nii.gz")


def test_body_crop_keeps_largest_component_and_world_coordinates():
  vol = _ct_phantom()
  out = pp.body_crop(vol)
  assert out.shape == (22, 20, 8)
  np.testing.assert_array_equal(out.data, vol.data[8:30, 5:25, 2:10])
  np.testing.assert_allclose(_world(out, (0, 0, 0)), _world(vol, (8, 5, 2)))
  np.testing.assert_allclose(out.spacing, vol.spacing)


def test_body_crop_of_all_air_returns_whole_volume():
  vol = Volume(np.full((4, 4, 4), -1000.0, np.float32), np.eye(4))
  assert pp.body_crop(vol).shape == (4, 4, 4)


# --- preprocess (the chain) ------------------------------------------------------------------------


def test_preprocess_default_only_normalizes():
  vol = _ct_phantom()
  out = pp.preprocess(vol, _cfg())
  assert out.shape == vol.shape and out.data.dtype == np.float32
  assert out.data.min() >= 0.0 and out.data.max() <= 1.0
  np.testing.assert_allclose(out.data[0, 0, 0], 0.0)
  np.testing.assert_allclose(out.affine, vol.affine)


def test_preprocess_resample_then_crop_then_normalize_with_labels():
  vol = _ct_phantom()
  labels = np.zeros(vol.shape, np.uint8)
  labels[14:20, 10:18, 4:8] = 2
  out, lab = pp.preprocess_pair(vol, labels, _cfg(spacing=(1.6, 1.6, 2.0), body_crop=True))
  np.testing.assert_allclose(out.spacing, (1.6, 1.6, 2.0))
  assert lab.shape == out.shape and lab.dtype == np.uint8
  assert out.shape == (11, 10, 8)  # Body 22 x 20 x 8 voxels at 0.8 mm -> half in x and y.
  assert out.data.min() >= 0 and out.data.max() <= 1
  # The lung label still sits on the lung's intensity (-850 HU -> 0.075) after both steps.
  np.testing.assert_allclose(out.data[lab == 2], 0.075, atol=1e-6)
  assert (lab == 2).sum() == 3 * 4 * 4
