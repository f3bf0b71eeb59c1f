"""PNG grids: layout, value mapping, errors, and the corruption-grid CLI on a .npy cube."""
from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from genesis_jax.eval import visualize


def test_mid_slice_takes_the_middle_z_of_any_layout():
  v = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  np.testing.assert_array_equal(visualize.mid_slice(v), v[:, :, 3])
  np.testing.assert_array_equal(visualize.mid_slice(v[..., None]), v[:, :, 3])
  np.testing.assert_array_equal(visualize.mid_slice(v[:, :, 0]), v[:, :, 0])
  np.testing.assert_array_equal(visualize.mid_slice(np.stack([v[:, :, 0]] * 2, -1), 1), v[:, :, 0])
  with pytest.raises(ValueError, match="mid_slice"):
    visualize.mid_slice(np.zeros((2, 3, 4, 5, 6)))


def test_save_image_grid_places_tiles_and_maps_0_1_to_grey(tmp_path):
  black, white = np.zeros((8, 6)), np.ones((8, 6))
  path = visualize.save_image_grid(tmp_path / "g.png", [[black, white], [white, black]],
                                   scale=1)
  img = np.asarray(Image.open(path))
  pad = 4
  assert img.shape == (2 * 8 + 3 * pad, 2 * 6 + 3 * pad)
  assert img[pad, pad] == 0 and img[pad, 2 * pad + 6] == 255
  assert img[2 * pad + 8, pad] == 255 and img[2 * pad + 8, 2 * pad + 6] == 0
  labelled = visualize.save_image_grid(tmp_path / "l.png", [[black, white]], row_labels=["a"],
                                       col_labels=["x", "y"])
  assert Image.open(labelled).size[0] > img.shape[1]


def test_save_image_grid_rejects_bad_input(tmp_path):
  im = np.zeros((4, 4))
  with pytest.raises(ValueError, match="rectangle"):
    visualize.save_image_grid(tmp_path / "a.png", [[im, im], [im]])
  with pytest.raises(ValueError, match="column labels"):
    visualize.save_image_grid(tmp_path / "a.png", [[im]], col_labels=["a", "b"])
  with pytest.raises(ValueError, match="2D"):
    visualize.save_image_grid(tmp_path / "a.png", [[np.zeros((2, 2, 2))]])


def test_cli_writes_the_corruption_grid_for_a_npy_cube(tmp_path):
  cubes = np.random.default_rng(0).random((2, 20, 20, 10), dtype=np.float32)
  np.save(tmp_path / "cubes.npy", cubes)
  out = tmp_path / "grid.png"
  visualize.main(["--input", str(tmp_path / "cubes.npy"), "--index", "1", "--rows", "1",
                  "--out", str(out)])
  img = np.asarray(Image.open(out))
  # One row of 7 columns (original, flip, shuffle, non-linear, in-, out-painting, combined).
  assert img.shape[1] > 7 * 20 * 2
  np.save(tmp_path / "bad.npy", cubes * 3)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    visualize.main(["--input", str(tmp_path / "bad.npy"), "--out", str(out)])


def test_save_image_grid_upscales_small_slices_to_readable_panels(tmp_path):
  # A 32x32 mid slice becomes a panel of at least MIN_PANEL_PX pixels (nearest neighbour).
  im = np.zeros((32, 32))
  im[:16] = 1.0
  path = visualize.save_image_grid(tmp_path / "big.png", [[im, im, im]], row_labels=["cube 0"],
                                   col_labels=["original", "corrupted", "restored"])
  img = np.asarray(Image.open(path))
  assert img.shape[0] >= visualize.MIN_PANEL_PX and img.shape[1] >= 3 * visualize.MIN_PANEL_PX
  scale = visualize.auto_scale(32, 32)
  assert 32 * scale >= visualize.MIN_PANEL_PX > 32 * (scale - 1)
  column = img[:, -5]  # The last panel's right edge: clear of the centred title.
  assert (column == 255).sum() == 16 * scale and (column == 0).sum() == 16 * scale
