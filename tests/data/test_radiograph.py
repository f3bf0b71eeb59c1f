"""Radiograph preprocessing: normalisation, letterbox/crop fits, the recorded transform and the
way back (masks, probabilities, points), images smaller than the target."""
from __future__ import annotations

import numpy as np
import pytest

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data import radiograph


def test_percentile_normalisation_clips_outliers_and_minmax_does_not():
  rng = np.random.default_rng(0)
  a = rng.normal(100.0, 10.0, (64, 48)).astype(np.float32)
  a[0, 0], a[1, 1] = 1e6, -1e6  # Two outliers (burnt-in markers, dead pixels).
  p = radiograph.normalise(a, "percentile", (1.0, 99.0))
  assert p.dtype == np.float32 and p.min() == 0.0 and p.max() == 1.0
  lo, hi = np.percentile(a, (1.0, 99.0))
  np.testing.assert_allclose(p[5, 5], np.clip((a[5, 5] - lo) / (hi - lo), 0, 1), rtol=1e-5)
  assert 0.3 < float(np.median(p)) < 0.7  # The bulk keeps its contrast.
  m = radiograph.normalise(a, "minmax")
  assert float(np.ptp(m[2:, 2:])) < 1e-3  # The outliers squash everything else.
  with pytest.raises(errors.DataError, match=r"flat\.png: constant image"):
    radiograph.normalise(np.full((4, 4), 7.0), name="flat.png")


def test_percentiles_of_equals_numpy():
  rng = np.random.default_rng(0)
  for a in (rng.integers(0, 4096, (64, 48)).astype(np.float32),  # Integer-valued: histogram.
            rng.integers(-1024, 3000, (5, 7)).astype(np.float32),
            rng.normal(0.0, 1.0, (30, 20)).astype(np.float32)):  # Floats: np.percentile.
    for qs in ((0.5, 99.5), (0.0, 100.0), (37.0, 50.0)):
      assert radiograph.percentiles_of(a, qs) == tuple(float(q) for q in np.percentile(a, qs))


def test_letterbox_keeps_aspect_and_pads():
  a = np.ones((300, 200), np.float32)
  out, t = radiograph.fit(a, (64, 64))
  assert out.shape == (64, 64) and t.resized_shape == (64, 43) and t.offset == (0, 10)
  assert t.scale[0] == pytest.approx(t.scale[1], rel=0.01)  # Aspect kept.
  assert out[:, :10].max() == 0.0 and out[:, 53:].max() == 0.0  # Padding.
  np.testing.assert_allclose(out[:, 10:53], 1.0, atol=1e-6)


def test_crop_fit_covers_the_target():
  a = np.ones((300, 200), np.float32)
  out, t = radiograph.fit(a, (64, 64), mode="crop")
  assert t.resized_shape == (96, 64) and t.offset == (-16, 0)
  np.testing.assert_allclose(out, 1.0, atol=1e-6)  # No padding anywhere.


def test_non_square_pixels_keep_the_physical_aspect():
  # 0.1 mm x 0.2 mm pixels: 300 x 200 pixels are 30 x 40 mm.
  out, t = radiograph.fit(np.ones((300, 200), np.float32), (64, 64), spacing=(0.1, 0.2))
  assert t.resized_shape == (48, 64)
  assert t.scale[1] / t.scale[0] == pytest.approx(2.0)


def test_image_smaller_than_the_target():
  a = np.random.default_rng(0).random((40, 30)).astype(np.float32)
  with pytest.raises(radiograph.ImageTooSmallError, match=r"small\.png: image of 40 x 30 .* 64 x "
                     r"64.*letterbox.*upscal"):
    radiograph.fit(a, (64, 64), mode="crop", name="small.png")
  out, t = radiograph.fit(a, (64, 64))  # Letterbox: padded at native size, never enlarged.
  assert t.scale == (1.0, 1.0) and t.offset == (12, 17)
  np.testing.assert_array_equal(out[12:52, 17:47], a)
  out, t = radiograph.fit(a, (64, 64), mode="crop", upscale=True)
  assert t.resized_shape == (85, 64) and out.shape == (64, 64)  # 40 * 64 / 30 = 85.3.


@pytest.mark.parametrize("mode", ["letterbox", "crop"])
def test_mask_and_points_round_trip(mode):
  shape = (300, 200)
  mask = np.zeros(shape, np.uint8)
  mask[100:180, 40:120] = 1  # A 80 x 80 px lesion.
  fitted, t = radiograph.fit(mask.astype(np.float32), (96, 96), mode=mode)
  back = radiograph.to_original((fitted > 0.5).astype(np.uint8), t)
  assert back.shape == shape and back.dtype == np.uint8
  # Only a boundary band of about one output pixel (~3 original pixels) may differ.
  boundary = 4 * 80 * (300 / 96)
  assert np.count_nonzero(back != mask) < boundary
  probs = radiograph.to_original(fitted, t)  # Floats: bilinear, float32.
  assert probs.dtype == np.float32 and abs(float(probs[140, 80]) - 1.0) < 1e-5
  points = np.array([[140.0, 80.0], [0.0, 0.0], [299.0, 199.0]])
  np.testing.assert_allclose(t.to_original_points(t.to_output_points(points)), points,
                             atol=1e-9)
  # The lesion centre lands on the fitted lesion.
  cx, cy = np.rint(t.to_output_points(points[0])).astype(int)
  assert fitted[cx, cy] > 0.99


def test_transform_dict_round_trip_and_channels():
  _, t = radiograph.fit(np.ones((50, 70), np.float32), (32, 32))
  assert radiograph.FitTransform.from_dict(t.to_dict()) == t
  pred = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
  assert radiograph.to_original(pred, t).shape == (50, 70, 3)
  with pytest.raises(errors.DataError, match="does not match the fitted shape"):
    radiograph.to_original(np.zeros((16, 16), np.float32), t)


def test_preprocess_an_image2d():
  rng = np.random.default_rng(1)
  img = images2d.Image2D(array=rng.normal(1000, 50, (120, 80)).astype(np.float32),
                         spacing=(0.5, 0.5), path="x.dcm", meta={})
  out, t = radiograph.preprocess(img, (64, 64), norm="percentile")
  assert out.shape == (64, 64) and 0.0 <= out.min() and out.max() <= 1.0
  assert t.original_shape == (120, 80) and t.resized_shape == (64, 43)
