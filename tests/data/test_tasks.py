"""Target-task layouts: MSD / nnU-Net segmentation folders and LUNA16-style candidate CSVs."""
from __future__ import annotations

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from configs import pretrain_genesis
from genesis_jax.data import tasks
from genesis_jax.data.readers import VolumeReadError, load_volume
from genesis_jax.data.volume import Volume

# L-A-S voxel axes (x flipped), 0.8 x 0.9 x 2 mm: the loader must reorient image and label alike.
AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, 0.9, 0, -20.0], [0, 0, 2.0, -50.0], [0, 0, 0, 1]])
SHAPE = (20, 18, 10)


def _cfg(**overrides):
  cfg = pretrain_genesis.get_config().data
  cfg.update(overrides)
  return cfg


def _label_map(seed: int) -> np.ndarray:
  label = np.zeros(SHAPE, np.uint8)
  rng = np.random.default_rng(seed)
  x, y, z = rng.integers(3, 10, 3)
  label[x:x + 5, y:y + 4, z:z + 3] = 1
  label[x + 1:x + 3, y + 1:y + 3, z + 1] = 2
  return label


def _image_for(label: np.ndarray) -> np.ndarray:
  """HU that encode the class: -1000 (air) for 0, 0 for 1, 1000 for 2 -> 0, 0.5, 1 normalised."""
  return (label.astype(np.int16) * 1000 - 1000).astype(np.int16)


def _save(path: pathlib.Path, data: np.ndarray, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)


def _msd(root: pathlib.Path, n=2, json_labels=None, image_suffix="") -> pathlib.Path:
  for i in range(n):
    label = _label_map(i)
    _save(root / "imagesTr" / f"case_{i:03d}{image_suffix}.nii.gz", _image_for(label))
    _save(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
  if json_labels is not None:
    (root / "dataset.json").write_text(json.dumps({"labels": json_labels}))
  return root


# --- segmentation layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, json_labels", [
    ("", {"0": "background", "1": "tumour", "2": "core"}),  # MSD.
    ("_0000", {"background": 0, "tumour": 1, "core": 2}),  # nnU-Net v2.
    ("", None),  # No dataset.json.
])
def test_load_segmentation_pairs_aligned_and_canonical(tmp_path, suffix, json_labels):
  root = _msd(tmp_path, json_labels=json_labels, image_suffix=suffix)
  assert tasks.read_num_classes(root) == (None if json_labels is None else 3)
  pairs = tasks.load_segmentation_pairs(root)
  assert [pathlib.Path(v.source).name for v, _ in pairs] == [
      f"case_000{suffix}.nii.gz", f"case_001{suffix}.nii.gz"]
  for i, (vol, label) in enumerate(pairs):
    assert label.dtype == np.uint8 and label.shape == vol.shape == SHAPE
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(label, _label_map(i)[::-1])  # x flipped into R.
    np.testing.assert_array_equal(vol.data, _image_for(label))


def test_msd_case_names_ending_in_four_digits_are_not_channels(tmp_path):
  label = _label_map(0)
  _save(tmp_path / "imagesTr" / "lung_0001.nii.gz", _image_for(label))
  _save(tmp_path / "labelsTr" / "lung_0001.nii.gz", label)
  (case,) = tasks.segmentation_cases(tmp_path)
  assert case.case_id == "lung_0001" and case.channel is None


def test_nnunet_multichannel_picks_channel_files(tmp_path):
  label = _label_map(0)
  _save(tmp_path / "imagesTr" / "c_0000.nii.gz", _image_for(label))
  _save(tmp_path / "imagesTr" / "c_0001.nii.gz", _image_for(label) + 7)
  _save(tmp_path / "labelsTr" / "c.nii.gz", label)
  ((vol, _),) = tasks.load_segmentation_pairs(tmp_path, channel=1)
  assert vol.source.endswith("c_0001.nii.gz")
  assert vol.data.min() == -993


def test_msd_4d_multimodal_image_needs_a_channel(tmp_path):
  label = _label_map(0)
  image = np.stack([_image_for(label), _image_for(label) + 5], axis=-1)
  _save(tmp_path / "imagesTr" / "brats_001.nii.gz", image)
  _save(tmp_path / "labelsTr" / "brats_001.nii.gz", label)
  with pytest.raises(VolumeReadError, match=r"brats_001.nii.gz: .*4D.*channel="):
    tasks.load_segmentation_pairs(tmp_path)
  ((vol, _),) = tasks.load_segmentation_pairs(tmp_path, channel=1)
  assert vol.data.min() == -995


def _break(root, what):
  label_path = root / "labelsTr" / "case_001.nii.gz"
  label = _label_map(1)
  if what == "missing label":
    label_path.unlink()
  elif what == "extra label":
    _save(root / "labelsTr" / "case_009.nii.gz", label)
  elif what == "shape":
    _save(label_path, label[:, :, :-1])
  elif what == "affine":
    shifted = AFFINE.copy()
    shifted[2, 3] += 2.0
    _save(label_path, label, shifted)
  elif what == "class range":
    label[0, 0, 0] = 3
    _save(label_path, label)
  elif what == "fractional":
    _save(label_path, label.astype(np.float32) * 0.5)
  elif what == "bad json":
    (root / "dataset.json").write_text("{labels: nope")
  elif what == "no imagesTr":
    for p in (root / "imagesTr").iterdir():
      p.unlink()
    (root / "imagesTr").rmdir()
  elif what == "empty imagesTr":
    for p in (root / "imagesTr").iterdir():
      p.unlink()


@pytest.mark.parametrize("what, pattern", [
    ("missing label", r"labelsTr: no label for image\(s\) .*case_001.nii.gz"),
    ("extra label", r"imagesTr: no image for label\(s\) .*case_009.nii.gz"),
    ("shape", r"case_001.nii.gz: label shape \(20, 18, 9\) does not match image .*\(20, 18, 10\)"),
    ("affine", r"case_001.nii.gz: label affine does not match image"),
    ("class range", r"case_001.nii.gz: label values span \[0, 3\], outside .*3 classes"),
    ("fractional", r"case_001.nii.gz: label values must be whole numbers"),
    ("bad json", r"dataset.json: cannot read"),
    ("no imagesTr", r"imagesTr: missing"),
    ("empty imagesTr", r"imagesTr: no scans found"),
])
def test_mismatched_labels_raise_naming_the_file(tmp_path, what, pattern):
  root = _msd(tmp_path, json_labels={"0": "bg", "1": "a", "2": "b"})
  _break(root, what)
  with pytest.raises(VolumeReadError, match=pattern):
    tasks.load_segmentation_pairs(root)


# --- segmentation cubes ----------------------------------------------------------------------------


def test_segmentation_cubes_shapes_alignment_fg_and_determinism(tmp_path):
  pairs = tasks.load_segmentation_pairs(_msd(tmp_path))
  kw = dict(per_case=5, fg_fraction=1.0, seed=3)
  images, masks = tasks.segmentation_cubes(pairs, (8, 8, 4), _cfg(), **kw)
  assert images.shape == (10, 8, 8, 4, 1) and images.dtype == np.float32
  assert masks.shape == (10, 8, 8, 4, 1) and masks.dtype == np.uint8
  assert (masks.reshape(10, -1) > 0).any(axis=1).all()  # fg_fraction=1: every cube has foreground.
  np.testing.assert_allclose(images, masks * 0.5, atol=1e-6)  # Image and mask from the same box.
  again = tasks.segmentation_cubes(pairs, (8, 8, 4), _cfg(), **kw)
  np.testing.assert_array_equal(again[0], images)
  other = tasks.segmentation_cubes(pairs, (8, 8, 4), _cfg(), per_case=5, fg_fraction=1.0, seed=4)
  assert not np.array_equal(other[0], images)


def test_segmentation_cubes_background_only_and_2d(tmp_path):
  pairs = tasks.load_segmentation_pairs(_msd(tmp_path))
  _, masks = tasks.segmentation_cubes(pairs, (8, 8, 4), _cfg(), per_case=40, fg_fraction=0.0,
                                      seed=0)
  frac = (masks.reshape(80, -1) > 0).any(axis=1).mean()
  assert frac < 0.9  # Uniform placement misses the small lesions often.
  images, masks = tasks.segmentation_cubes(pairs, (8, 6), _cfg(), per_case=3, fg_fraction=1.0,
                                           seed=0)
  assert images.shape == (6, 8, 6, 1) and masks.shape == (6, 8, 6, 1)
  np.testing.assert_allclose(images, masks * 0.5, atol=1e-6)


def test_segmentation_cubes_follow_resampling(tmp_path):
  pairs = tasks.load_segmentation_pairs(_msd(tmp_path))
  images, masks = tasks.segmentation_cubes(pairs, (8, 8, 4), _cfg(spacing=(1.6, 1.8, 2.0)),
                                           per_case=4, fg_fraction=1.0, seed=0)
  np.testing.assert_allclose(images[masks == 0], 0.0, atol=0.26)  # Linear vs nearest at edges.
  assert (masks > 0).any()


def test_volume_smaller_than_crop_is_an_error_naming_the_file(tmp_path):
  pairs = tasks.load_segmentation_pairs(_msd(tmp_path))
  with pytest.raises(VolumeReadError, match=r"case_000.nii.gz: .*smaller than .*\(32, 8, 4\)"):
    tasks.segmentation_cubes(pairs, (32, 8, 4), _cfg(), per_case=1, fg_fraction=0.5, seed=0)


# --- candidates CSV --------------------------------------------------------------------------------


def test_read_candidates_csv_lps_to_ras_and_formats(tmp_path):
  path = tmp_path / "candidates.csv"
  path.write_text("seriesuid,coordX,coordY,coordZ,class\n"
                  "1.3.6.1,-56.08,-67.85,-311.92,0\n\n"
                  "1.3.6.2,53.21,-244.4,-245.17,1\n")
  cands = tasks.read_candidates_csv(path)
  assert cands == [tasks.Candidate("1.3.6.1", (56.08, 67.85, -311.92), 0),
                   tasks.Candidate("1.3.6.2", (-53.21, 244.4, -245.17), 1)]
  ras = tasks.read_candidates_csv(path, frame="ras")
  assert ras[0].world_xyz_mm == (-56.08, -67.85, -311.92)
  # Any column order, "label" for "class", and the byte-order mark Excel puts in front.
  path.write_text("\ufeffSeriesUID,coordZ,coordY,coordX,label\nab,3,2,1,1\n", encoding="utf-8")
  assert tasks.read_candidates_csv(path, frame="ras")[0].world_xyz_mm == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("text, pattern", [
    ("seriesuid,coordX,coordY,diameter_mm\n", r"candidates.csv: header .* lacks a coordz"),
    ("seriesuid,coordX,coordY,coordZ,class\na,1,2,x,0\n", r"candidates.csv, line 2: cannot parse"),
    ("seriesuid,coordX,coordY,coordZ,class\na,1,2,3,0\nb,1,nan,3,1\n",
     r"candidates.csv, line 3: need .* finite"),
    ("seriesuid,coordX,coordY,coordZ,class\na,1,2,3,0.5\n", r"line 2: .*integer class"),
    ("seriesuid,coordX,coordY,coordZ,class\na,1,2\n", r"line 2: cannot parse"),
])
def test_bad_candidates_csv(tmp_path, text, pattern):
  (tmp_path / "candidates.csv").write_text(text)
  with pytest.raises(VolumeReadError, match=pattern):
    tasks.read_candidates_csv(tmp_path / "candidates.csv")


# --- classification cubes --------------------------------------------------------------------------


def _coded_volume(source="scan.nii.gz") -> Volume:
  """HU that encode the voxel index, so a cube's centre value says where it was cut."""
  i, j, k = np.indices(SHAPE)
  hu = (i * 100 + j * 5 + k - 1000).astype(np.float32)
  affine = np.diag([0.8, 0.9, 2.0, 1.0])
  affine[:3, 3] = [-8.0, 4.0, 30.0]
  return Volume(hu, affine, source)


def test_classification_cubes_centre_on_world_point_and_pad_edges():
  vol = _coded_volume()
  world = lambda ijk: tuple((vol.affine @ np.array([*ijk, 1.0]))[:3])
  cands = [tasks.Candidate("s", world((10, 9, 5)), 1),
           tasks.Candidate("s", world((0.3, 17, 9)), 0)]  # At a corner: padded.
  images, labels = tasks.classification_cubes({"s": vol}, cands, (6, 6, 4), _cfg(hu_window=(-1000, 2000)))
  assert images.shape == (2, 6, 6, 4, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(labels, [1, 0])
  hu_at = lambda ijk: (ijk[0] * 100 + ijk[1] * 5 + ijk[2]) / 3000.0
  np.testing.assert_allclose(images[0, 3, 3, 2, 0], hu_at((10, 9, 5)), atol=1e-6)
  np.testing.assert_allclose(images[0, 0, 0, 0, 0], hu_at((7, 6, 3)), atol=1e-6)
  np.testing.assert_allclose(images[1, 3, 3, 2, 0], hu_at((0, 17, 9)), atol=1e-6)
  np.testing.assert_array_equal(images[1, :3], 0.0)  # x < 0: off the volume, the window minimum.
  np.testing.assert_array_equal(images[1, :, 5:], 0.0)  # y > 17.
  np.testing.assert_array_equal(images[1, :, :, 3:], 0.0)  # z > 9.
  xy, _ = tasks.classification_cubes({"s": vol}, cands, (6, 6), _cfg(hu_window=(-1000, 2000)))
  np.testing.assert_array_equal(xy[:, :, :, 0], images[:, :, :, 2, 0])  # 2D: the centre slice.


def test_luna16_mhd_and_lps_csv_end_to_end(tmp_path):
  """LUNA16 path: an .mhd written by SimpleITK, a CSV of its ITK (LPS) physical points."""
  sitk = pytest.importorskip("SimpleITK")
  i, j, k = np.indices(SHAPE)
  hu = (i * 100 + j * 5 + k - 1000).astype(np.int16)
  image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))  # SimpleITK arrays are (z, y, x).
  image.SetSpacing((0.8, 0.9, 2.0))
  image.SetOrigin((-180.0, -160.0, -300.0))
  sitk.WriteImage(image, str(tmp_path / "1.2.840.1.mhd"))
  targets = [(3, 4, 5), (15, 2, 7)]
  rows = ["seriesuid,coordX,coordY,coordZ,class"] + [
      "1.2.840.1,{:.4f},{:.4f},{:.4f},{}".format(*image.TransformIndexToPhysicalPoint(t), n % 2)
      for n, t in enumerate(targets)]
  (tmp_path / "candidates.csv").write_text("\n".join(rows) + "\n")
  cands = tasks.read_candidates_csv(tmp_path / "candidates.csv")
  scans = {"1.2.840.1": load_volume(tmp_path / "1.2.840.1.mhd")}
  images, labels = tasks.classification_cubes(scans, cands, (4, 4, 2), _cfg(hu_window=(-1000, 2000)))
  np.testing.assert_array_equal(labels, [0, 1])
  # LPS x, y negated into RAS and the volume flipped to match: the centre is the written voxel.
  for n, (a, b, c) in enumerate(targets):
    np.testing.assert_allclose(images[n, 2, 2, 1, 0], (a * 100 + b * 5 + c) / 3000.0, atol=1e-6)


def test_classification_missing_scan_and_outside_candidate():
  vol = _coded_volume()
  cands = [tasks.Candidate("s", (0.0, 10.0, 40.0), 1), tasks.Candidate("other", (0, 0, 0), 0)]
  with pytest.raises(VolumeReadError, match="'other' has no scan"):
    tasks.classification_cubes({"s": vol}, cands, (4, 4, 2), _cfg())
  images, labels = tasks.classification_cubes({"s": vol}, cands, (4, 4, 2), _cfg(), missing="skip")
  assert images.shape[0] == 1 and labels.tolist() == [1]
  nan = _coded_volume("nan.nii.gz")
  nan.data[1, 1, 1] = np.nan
  with pytest.raises(VolumeReadError, match="nan.nii.gz: 1 of .* NaN"):
    tasks.classification_cubes({"s": nan}, cands[:1], (4, 4, 2), _cfg())
  far = [tasks.Candidate("s", (500.0, 10.0, 40.0), 1)]
  with pytest.raises(VolumeReadError, match=r"scan.nii.gz: candidate 0 .* outside the volume .*LPS"):
    tasks.classification_cubes({"s": vol}, far, (4, 4, 2), _cfg())


def test_case_split_and_train_subset():
  from genesis_jax.config import schema as defaults
  d = defaults.finetune_config().data
  d.train_cases, d.val_cases, d.test_cases = 4, 2, 2
  ids = [f"c{i}" for i in range(9)]
  full = tasks.split_ids(ids, d, "cases")
  assert full == {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"], "test": ["c6", "c7"]}
  # A smaller labelled budget: fewer training cases, the same validation and test cases.
  d.train_subset = 2
  assert tasks.split_ids(ids, d, "cases") == {**full, "train": ["c0", "c1"]}
  d.train_subset = 5
  with pytest.raises(ValueError, match="train_subset=5"):
    tasks.split_ids(ids, d, "cases")
  d.train_subset, d.test_cases = 0, 4
  with pytest.raises(ValueError, match="9 cases, but train_cases"):
    tasks.split_ids(ids, d, "cases")
