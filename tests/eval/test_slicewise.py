"""A 2D model on a 3D volume, slice by slice along z (the paper's 2D approach to 3D tasks): the
stacked prediction has the volume's shape, each axial slice is that slice's own 2D prediction,
and the written mask lies on the scan's grid with its affine."""
from __future__ import annotations

import functools

import jax
import nibabel as nib
import numpy as np

from genesis_jax.data.volume import Volume
from genesis_jax.eval import inference
from genesis_jax.models import heads
from genesis_jax.train import step as step_lib

SHAPE = (20, 24, 7)  # x, y not multiples of the window: padded and overlapping windows.


def _slice_model():
  """A width-4 2D U-Net's probabilities, as `functools.partial(f, variables)` (one compile)."""
  model = heads.build_model({"width": 4, "depth": 2, "spatial_dims": 2}, task="segment")
  variables = step_lib.init_variables(model, (16, 16, 1), seed=0)
  probs = lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False))
  return functools.partial(probs, variables)


def test_slicewise_probabilities_stack_the_axial_slices():
  probs_fn = _slice_model()
  rng = np.random.default_rng(0)
  data = rng.random(SHAPE).astype(np.float32)
  probs = inference.segment_volume(probs_fn, data, (16, 16), overlap=0.5)
  assert probs.shape == (*SHAPE, 1) and probs.dtype == np.float32
  for z in (0, 3, SHAPE[2] - 1):  # Slice z is the 2D prediction of slice z alone.
    alone = inference.sliding_window_predict(probs_fn, data[:, :, z, None], (16, 16), overlap=0.5)
    np.testing.assert_allclose(probs[:, :, z], alone, rtol=1e-6, atol=1e-6)
  changed = data.copy()
  changed[:, :, 3] = rng.random(SHAPE[:2])
  after = inference.segment_volume(probs_fn, changed, (16, 16), overlap=0.5)
  other = [z for z in range(SHAPE[2]) if z != 3]
  np.testing.assert_array_equal(after[:, :, other], probs[:, :, other])  # No context across z.
  assert np.abs(after[:, :, 3] - probs[:, :, 3]).max() > 0


def test_slicewise_mask_has_the_volumes_shape_and_affine(tmp_path):
  probs_fn = _slice_model()
  affine = np.array([[0.8, 0, 0, -40.0], [0, 0.7, 0, 12.5], [0, 0, 2.5, -100.0], [0, 0, 0, 1]])
  vol = Volume(np.random.default_rng(1).random(SHAPE).astype(np.float32), affine, "scan")
  probs = inference.segment_volume(probs_fn, vol.data, (16, 16), overlap=0.25)
  path = tmp_path / "scan_pred.nii.gz"
  written = inference.write_segmentation(path, probs, vol, vol, threshold=0.5)
  img = nib.load(path)
  assert img.shape == SHAPE and written.shape == SHAPE
  np.testing.assert_allclose(img.affine, affine)
  np.testing.assert_array_equal(np.asarray(img.dataobj), (probs[..., 0] >= 0.5).astype(np.uint8))
