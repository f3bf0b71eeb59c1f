"""Tests of the procedural chest-CT phantoms and their on-disk data set."""
from __future__ import annotations

import csv
import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from genesis_jax.data import phantoms
from genesis_jax.data.phantoms import subject as phantom_subject

SMALL = (64, 64, 48)  # Keeps every test cheap; anatomy scales with the field of view.


@pytest.fixture(scope="module")
def subjects():
  """A few small subjects, shared by the read-only tests."""
  return [phantoms.make_phantom(phantoms.subject_seed(0, i), SMALL) for i in range(4)]


def test_same_seed_same_phantom_and_different_seeds_differ():
  a, b = phantoms.make_phantom(7, SMALL), phantoms.make_phantom(7, SMALL)
  np.testing.assert_array_equal(a.volume.data, b.volume.data)
  np.testing.assert_array_equal(a.volume.affine, b.volume.affine)
  np.testing.assert_array_equal(a.nodule_mask, b.nodule_mask)
  assert a.candidates == b.candidates
  c = phantoms.make_phantom(8, SMALL)
  assert not np.array_equal(a.volume.data, c.volume.data)
  assert a.volume.spacing != c.volume.spacing
  assert phantoms.subject_seed(0, 1) != phantoms.subject_seed(1, 0)


def test_volume_type_shape_and_spacing(subjects):
  for ph in subjects:
    v = ph.volume
    assert v.data.dtype == np.float32 and v.shape == SMALL
    assert ph.nodule_mask.dtype == np.uint8 and ph.nodule_mask.shape == SMALL
    assert v.source.startswith("phantom:")
    sx, sy, sz = v.spacing
    assert 0.7 <= sx <= 1.0 and sx == pytest.approx(sy) and 1.0 <= sz <= 2.5
    # RAS+: a positive diagonal affine, so voxel axes run towards R, A, S.
    np.testing.assert_allclose(v.affine[:3, :3], np.diag(v.spacing))
    assert np.all(np.isfinite(v.data))
    assert -1024 <= v.data.min() and v.data.max() <= 3071


def test_tissue_hounsfield_units_are_plausible(subjects):
  for ph in subjects:
    hu, t = ph.volume.data, ph.tissue
    median = {name: float(np.median(hu[t == code])) for name, code in phantoms.TISSUE.items()
              if (t == code).sum() > 50}
    assert median["air"] < -950
    assert -150 < median["fat"] < -50
    assert 0 < median["soft_tissue"] < 100
    assert median["bone"] > 300
    lung_mask = t == phantoms.TISSUE["lung"]
    lung = hu[lung_mask]
    assert -900 < np.median(lung) < -650
    assert np.mean(lung < -500) > 0.8  # Voxels at the pleura and vessels share their HU.
    assert np.mean(hu[ndimage.binary_erosion(lung_mask)] < -500) > 0.98
    assert (t == phantoms.TISSUE["lung"]).mean() > 0.03  # Lungs are a real part of the image.
    assert (t == phantoms.TISSUE["vessel"]).sum() > 0


def test_nodules_masks_and_candidates(subjects):
  kinds = set()
  for ph in subjects:
    assert ph.nodule_mask.any()
    assert set(np.unique(ph.nodule_mask)) <= {0, 1}
    nodules = [c for c in ph.candidates if c.label == 1]
    assert nodules and any(c.label == 0 for c in ph.candidates)
    for c in ph.candidates:
      assert c.label in (0, 1)
      assert c.kind in (phantoms.NODULE_KINDS if c.label else phantoms.LOOKALIKE_KINDS)
      assert all(0 <= v <= n - 1 for v, n in zip(c.center_vox, SMALL))
      kinds.add(c.kind)
    for c in nodules:
      assert 2.0 <= c.diameter_mm <= 26.0
      i, j, k = np.rint(c.center_vox).astype(int)
      # Juxta-pleural nodules are cut by the pleura, so look in a small neighbourhood.
      assert ph.nodule_mask[max(i - 2, 0):i + 3, max(j - 2, 0):j + 3, max(k - 1, 0):k + 2].any()
    # Look-alikes lie in the lung and never on a nodule.
    in_lung = [phantoms.TISSUE[k] for k in ("lung", "vessel", "lookalike")]
    for c in ph.candidates:
      if c.label == 0:
        idx = tuple(np.rint(c.center_vox).astype(int))
        assert not ph.nodule_mask[idx] and ph.tissue[idx] in in_lung
    # The mask's total volume matches the nodules' reported sizes.
    voxel_mm3 = float(np.prod(ph.volume.spacing))
    expected = sum(np.pi / 6 * c.diameter_mm ** 3 for c in nodules)
    assert ph.nodule_mask.sum() * voxel_mm3 == pytest.approx(expected, rel=1e-6)
  assert len(kinds) >= 4


def test_generation_time_default_shape():
  start = time.perf_counter()
  ph = phantoms.make_phantom(0)
  seconds = time.perf_counter() - start
  assert ph.volume.shape == (128, 128, 96)
  print(f"make_phantom(0), 128x128x96: {seconds:.2f} s")  # Reported, never asserted.


def test_lookalikes_not_separable_by_intensity_alone():
  """Cube mean/std must not give the classification away (a CNN has to look at shape)."""
  features, labels, groups = [], [], []
  for i in range(12):
    ph = phantoms.make_phantom(phantoms.subject_seed(1, i), SMALL)
    hu = np.clip(ph.volume.data, -1000, 1000)
    for c in ph.candidates:
      lo = [max(int(round(v)) - h, 0) for v, h in zip(c.center_vox, (8, 8, 4))]
      cube = hu[lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 8]
      features.append([cube.mean(), cube.std()])
      labels.append(c.label)
      groups.append(i)
  labels = np.array(labels)
  assert 0 < labels.sum() < len(labels)
  model = make_pipeline(StandardScaler(), LogisticRegression())
  p = cross_val_predict(model, np.array(features), labels, groups=groups, cv=GroupKFold(4),
                        method="predict_proba")[:, 1]
  auc = roc_auc_score(labels, p)
  print(f"mean/std logistic regression AUC: {auc:.3f} on {len(labels)} candidates")
  assert auc < 0.85


def _world_to_vox(affine, xyz):
  return (np.linalg.inv(affine) @ np.array([*xyz, 1.0]))[:3]


def test_write_dataset_round_trip(tmp_path):
  root = tmp_path / "phantoms"
  out = phantoms.write_phantom_dataset(root, n_subjects=2, seed=3, shape=SMALL)
  assert out == root
  ds = json.loads((root / "dataset.json").read_text())
  assert ds["channel_names"] == {"0": "CT"} and ds["labels"] == {"background": 0, "nodule": 1}
  assert ds["numTraining"] == 2 and ds["file_ending"] == ".nii.gz"
  with open(root / "candidates.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
  for i in range(2):
    name = f"phantom_{i:03d}"
    ph = phantoms.make_phantom(phantoms.subject_seed(3, i), SMALL)
    img = nib.load(root / "imagesTr" / f"{name}_0000.nii.gz")
    lab = nib.load(root / "labelsTr" / f"{name}.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.affine, ph.volume.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(ph.volume.data))
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), ph.nodule_mask)
    mine = [r for r in rows if r["seriesuid"] == name]
    assert len(mine) == len(ph.candidates)
    for r, c in zip(mine, ph.candidates):
      # candidates.csv is LUNA16-style LPS; the NIfTI affine is RAS.
      world = [-float(r["coordX"]), -float(r["coordY"]), float(r["coordZ"])]
      np.testing.assert_allclose(_world_to_vox(img.affine, world), c.center_vox, atol=0.01)
      assert int(r["class"]) == c.label
    # A true nodule's world coordinate lands inside (or right next to) its mask.
    mask = np.asanyarray(lab.dataobj)
    for r in mine:
      if r["class"] == "1":
        lps = [float(r[k]) for k in ("coordX", "coordY", "coordZ")]
        i_, j_, k_ = np.rint(_world_to_vox(lab.affine, [-lps[0], -lps[1], lps[2]])).astype(int)
        assert mask[max(i_ - 2, 0):i_ + 3, max(j_ - 2, 0):j_ + 3, max(k_ - 1, 0):k_ + 2].any()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # No temp leftovers.


def test_write_dataset_reuses_replaces_and_refuses(tmp_path):
  root = tmp_path / "ds"
  phantoms.write_phantom_dataset(root, 1, seed=0, shape=(32, 32, 32))
  image = root / "imagesTr" / "phantom_000_0000.nii.gz"
  stamp = image.stat().st_mtime_ns
  phantoms.write_phantom_dataset(root, 1, seed=0, shape=(32, 32, 32))
  assert image.stat().st_mtime_ns == stamp  # Reused, not rewritten.
  phantoms.write_phantom_dataset(root, 2, seed=0, shape=(32, 32, 32))
  manifest = json.loads((root / phantoms.MANIFEST).read_text())
  assert manifest["n_subjects"] == 2 and manifest["shape"] == [32, 32, 32]
  assert (root / "imagesTr" / "phantom_001_0000.nii.gz").is_file()
  other = tmp_path / "mine"
  other.mkdir()
  (other / "scan.nii.gz").write_bytes(b"not a phantom")
  with pytest.raises(ValueError, match="refusing"):
    phantoms.write_phantom_dataset(other, 1, shape=(32, 32, 32))
  assert (other / "scan.nii.gz").read_bytes() == b"not a phantom"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  real = phantoms.make_phantom

  def failing(seed, shape):
    calls.append(seed)
    if len(calls) == 2:
      raise KeyboardInterrupt  # As if the user pressed Ctrl-C mid-write.
    return real(seed, shape)

  monkeypatch.setattr(phantom_subject, "make_phantom", failing)
  root = tmp_path / "ds"
  with pytest.raises(KeyboardInterrupt):
    phantoms.write_phantom_dataset(root, 3, shape=(32, 32, 32))
  assert not root.exists()
  assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
  phantoms.main(["--out", str(tmp_path / "cli"), "--subjects", "1", "--seed", "5",
                 "--shape", "32", "32", "32"])
  assert "1 subjects" in capsys.readouterr().out
  manifest = json.loads((tmp_path / "cli" / phantoms.MANIFEST).read_text())
  assert manifest["seed"] == 5 and manifest["shape"] == [32, 32, 32]


def test_bad_arguments_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="shape"):
    phantoms.make_phantom(0, (16, 64, 64))
  with pytest.raises(ValueError, match="n_subjects"):
    phantoms.write_phantom_dataset(tmp_path / "x", 0)
