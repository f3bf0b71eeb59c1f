"""DRRs of the phantoms: line integrals, noise, projected masks, labels from the 3D nodules, and the
kill-safe radiograph data set on disk."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data.phantoms import drr, make_phantom, xray_dataset
from genesis_jax.data.phantoms.subject import Phantom
from genesis_jax.data.volume import Candidate, Volume

SHAPE = (48, 48, 32)


def test_line_integral_is_the_direct_sum_of_attenuation():
  rng = np.random.default_rng(0)
  hu = rng.uniform(-1100, 1500, (5, 4, 3)).astype(np.float32)
  spacing = (0.8, 0.6, 2.0)
  pa, lat = drr.line_integral(hu, spacing, "pa"), drr.line_integral(hu, spacing, "lateral")
  assert pa.shape == (5, 3) and lat.shape == (4, 3)
  for i in range(5):
    for k in range(3):
      total = sum(max(0.0, 0.0206 * (1 + float(hu[i, j, k]) / 1000)) for j in range(4)) * 0.6
      np.testing.assert_allclose(pa[i, k], total, rtol=1e-5)
  for j in range(4):
    for k in range(3):
      total = sum(max(0.0, 0.0206 * (1 + float(hu[i, j, k]) / 1000)) for i in range(5)) * 0.8
      np.testing.assert_allclose(lat[j, k], total, rtol=1e-5)
  # Air and anything below -1000 HU attenuate nothing.
  assert drr.line_integral(np.full((2, 2, 2), -1500.0), spacing, "pa").max() == 0.0


def test_detector_noise_is_unbiased_and_off_at_i0_zero():
  p = np.full((200, 200), 1.5)
  np.testing.assert_array_equal(drr.detector(p, np.random.default_rng(0), i0=0), p)
  noisy = drr.detector(p, np.random.default_rng(0), i0=2e4)
  assert abs(float(noisy.mean()) - 1.5) < 0.01
  # Poisson: var(p_hat) ~ 1 / (I0 exp(-p)) by the delta method.
  expected = np.sqrt(1 / (2e4 * np.exp(-1.5)))
  assert 0.8 * expected < float(noisy.std()) < 1.3 * expected
  a = drr.detector(p, np.random.default_rng(3), i0=2e4)
  np.testing.assert_array_equal(a, drr.detector(p, np.random.default_rng(3), i0=2e4))


def _nodule_components(ph):
  """(count, [(centre_x_vox, diameter_mm)]) of the 3D nodule mask's connected components."""
  lab, n = ndimage.label(ph.nodule_mask)
  out = []
  voxel_mm3 = float(np.prod(ph.volume.spacing))
  for k in range(1, n + 1):
    idx = np.argwhere(lab == k)
    out.append((float(idx[:, 0].mean()), (6 * len(idx) * voxel_mm3 / np.pi) ** (1 / 3)))
  return n, out


@pytest.mark.parametrize("seed", [1, 2, 5, 11])
def test_findings_agree_with_the_3d_nodule_mask(seed):
  ph = make_phantom(seed, SHAPE)
  found = set(drr.findings(ph.candidates, SHAPE))
  n, comps = _nodule_components(ph)
  assert n >= 1
  assert ("Nodule" in found) == (n >= 1)
  assert ("Multiple_Nodules" in found) == (n >= 2)
  centre = (SHAPE[0] - 1) / 2
  assert ("Right_Nodule" in found) == any(x > centre for x, _ in comps)
  assert ("Left_Nodule" in found) == any(x <= centre for x, _ in comps)
  assert ("Large_Nodule" in found) == any(d >= drr.LARGE_NODULE_MM for _, d in comps)
  assert ("Small_Nodule" in found) == any(d < drr.LARGE_NODULE_MM for _, d in comps)
  # A nodule-free subject of the same seed has no finding.
  free = make_phantom(seed, SHAPE, n_nodules=0)
  assert free.nodule_mask.sum() == 0 and drr.findings(free.candidates, SHAPE) == ()


def test_findings_side_size_and_csv_cell():
  def nodule(x, d):
    return Candidate("s", (0, 0, 0), 1, "nodule_solid", d, center_vox=(x, 5.0, 5.0))
  lookalike = Candidate("s", (0, 0, 0), 0, "vessel", 0.0, center_vox=(1.0, 5.0, 5.0))
  assert drr.findings([lookalike], (10, 10, 10)) == ()
  assert drr.findings([nodule(8.0, 12.0), lookalike], (10, 10, 10)) == (
      "Nodule", "Large_Nodule", "Right_Nodule")
  found = drr.findings([nodule(1.0, 4.0), nodule(8.0, 4.0)], (10, 10, 10))
  assert found == ("Nodule", "Multiple_Nodules", "Small_Nodule", "Right_Nodule", "Left_Nodule")
  assert drr.parse_finding_labels(drr.finding_labels(found)) == found
  assert drr.finding_labels(()) == "No Finding" and drr.parse_finding_labels("No Finding") == ()


def _toy_phantom():
  """A cube phantom with isotropic voxels (no resampling): soft tissue with two nodules."""
  hu = np.full((12, 10, 8), -1000.0, np.float32)
  hu[2:10, 2:8, 1:7] = 40.0
  mask = np.zeros(hu.shape, np.uint8)
  mask[3, 4, 2] = mask[3, 5, 2] = 1  # Two voxels on one PA ray (same x and z).
  mask[8, 3:5, 5] = 1
  hu[mask > 0] = 60.0
  vol = Volume(hu, np.diag([0.7, 0.7, 0.7, 1.0]), "toy")
  return Phantom(vol, mask, [])


def test_projected_mask_is_exactly_the_rays_through_nodule_voxels():
  ph = _toy_phantom()
  for view, axis in drr.VIEWS.items():
    proj = drr.project_mask(ph.nodule_mask, view)
    expected = np.zeros(proj.shape, np.uint8)
    for v in np.argwhere(ph.nodule_mask):
      expected[tuple(np.delete(v, axis))] = 1
    np.testing.assert_array_equal(proj, expected)
    image = drr.make_drr(ph, view, np.random.default_rng(0), i0=0)
    # Isotropic voxels: no resampling, so the DRR's mask is the projection, display-oriented.
    np.testing.assert_array_equal(image.mask, drr.display_orientation(expected))
    np.testing.assert_allclose(
        image.log_integral, drr.display_orientation(drr.line_integral(ph.volume.data, (0.7,) * 3,
                                                                      view)), rtol=1e-6)
    assert image.spacing == (0.7, 0.7) and 0.0 <= image.image.min() <= image.image.max() <= 1.0


def test_square_pixels_and_display_orientation_on_a_phantom():
  ph = make_phantom(4, SHAPE)
  sx, _, sz = ph.volume.spacing
  image = drr.make_drr(ph, "pa", np.random.default_rng(0))
  assert image.image.shape == (SHAPE[0], int(round(SHAPE[2] * sz / sx)))
  assert image.spacing == (sx, sx)
  # Head up: the last slice (most superior) is the top row; patient right (+x) on the left.
  proj = drr.project_mask(ph.nodule_mask, "pa")
  cols = np.flatnonzero(proj.any(axis=1))
  shown = np.flatnonzero(image.mask.any(axis=1))
  np.testing.assert_array_equal(shown, np.sort(SHAPE[0] - 1 - cols))
  assert image.findings == drr.findings(ph.candidates, SHAPE)


def test_dataset_on_disk_matches_the_in_memory_drrs_and_resumes(tmp_path):
  root = tmp_path / "xr"
  xray_dataset.write_xray_dataset(root, 3, seed=1, shape=SHAPE)
  with open(root / "labels.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["Image Index"] for r in rows] == [
      f"phantom_00{i}_{v}_0000.png" for i in range(3) for v in ("pa", "lateral")]
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["labels"] == {"background": 0, "nodule": 1} and meta["numTraining"] == 6
  for i in range(3):
    images = xray_dataset.make_subject_drrs(i, 1, SHAPE, ("pa", "lateral"))
    for view, image in images.items():
      case = f"phantom_00{i}_{view}"
      row = next(r for r in rows if r["Image Index"] == f"{case}_0000.png")
      assert drr.parse_finding_labels(row["Finding Labels"]) == image.findings
      assert row["Patient ID"] == f"phantom_00{i}"
      png = images2d.read_image(root / "imagesTr" / f"{case}_0000.png")
      assert png.meta.get("bits", 16) == 16
      np.testing.assert_allclose(png.array / 65535, image.image, atol=1 / 65535)
      label = images2d.read_image(root / "labelsTr" / f"{case}.png")
      np.testing.assert_array_equal(label.array, image.mask)
      flt = images2d.read_image(root / "float" / f"{case}.nii.gz")
      np.testing.assert_allclose(flt.array, image.log_integral, rtol=1e-6)
      np.testing.assert_allclose(flt.spacing, image.spacing)
  # Kill-safety: a subject whose files are gone (as after a kill) is written again, alone.
  keep = root / "imagesTr" / "phantom_000_pa_0000.png"
  before = keep.stat().st_mtime_ns
  (root / "imagesTr" / "phantom_001_lateral_0000.png").unlink()
  xray_dataset.write_xray_dataset(root, 3, seed=1, shape=SHAPE)
  assert (root / "imagesTr" / "phantom_001_lateral_0000.png").is_file()
  assert keep.stat().st_mtime_ns == before
  # Other parameters replace the set; a foreign non-empty folder is refused.
  xray_dataset.write_xray_dataset(root, 2, seed=1, shape=SHAPE)
  assert not (root / "imagesTr" / "phantom_002_pa_0000.png").exists()
  other = tmp_path / "other"
  other.mkdir()
  (other / "mine.txt").write_text("x")
  with pytest.raises(errors.ConfigError, match="refusing"):
    xray_dataset.write_xray_dataset(other, 1, seed=1, shape=SHAPE)


def test_bad_views_and_counts_are_named_errors(tmp_path):
  with pytest.raises(errors.ConfigError, match="DRR view 'ap'"):
    xray_dataset.write_xray_dataset(tmp_path / "a", 1, shape=SHAPE, views=("ap",))
  with pytest.raises(errors.ConfigError, match="subjects must be >= 1"):
    xray_dataset.write_xray_dataset(tmp_path / "b", 0, shape=SHAPE)


def test_phantom_xray_pretraining_prepares_2d_crops_of_the_radiographs(tmp_path):
  from genesis_jax.config import schema
  from genesis_jax.data import manifest, pipeline, prepare
  c = schema.pretrain_config().data
  c.source, c.crop, c.phantom_subjects, c.phantom_shape = "phantom_xray", (16, 16), 2, SHAPE
  c.cubes_per_scan, c.val_fraction = 3, 0.25
  out = prepare.ensure_dataset(c, tmp_path, seed=0)
  m = manifest.validate_dataset(out)
  assert m["crop"] == [16, 16] and sum(s["count"] for s in m["shards"]) == 12  # 2 x 2 views x 3.
  assert m["settings"]["modality"] == "mri"  # Per-image percentiles, not a CT window.
  cube = pipeline.CubeSource(out, "train")[0]
  assert cube.shape == (16, 16, 1) and 0.0 <= cube.min() <= cube.max() <= 1.0
  assert (tmp_path / "xrays" / "float" / "phantom_001_lateral.nii.gz").is_file()
  c.lung_filter = True
  with pytest.raises(errors.ConfigError, match="lung_filter is for CT scans"):
    prepare.ensure_dataset(c, tmp_path / "b", seed=0)


def test_cli_writes_the_radiograph_set(tmp_path, capsys):
  from genesis_jax.data import phantoms
  phantoms.main(["--out", str(tmp_path / "xr"), "--subjects", "2", "--shape", "48", "48", "32",
                 "--xray"])
  assert "4 radiographs of 2 subjects" in capsys.readouterr().out
  assert (tmp_path / "xr" / "labelsTr" / "phantom_001_lateral.png").is_file()


# The 3D phantom of seed 3 at 48 x 48 x 32 (tissue codes and nodule mask), as generated before the
# radiograph findings existed: the x-ray path must leave the 3D NCC/NCS phantoms as they were.
PHANTOM_3_SHA256 = "22ae586cb659c6ceddddf1246a73cbb087bd1ccec8efded77c230a4386e7d7fa"
FULL = (128, 128, 96)


def test_radiograph_findings_leave_the_3d_phantom_byte_identical():
  import hashlib
  from genesis_jax.data.phantoms import subject
  ph = make_phantom(3, SHAPE)
  assert hashlib.sha256(ph.tissue.tobytes() + ph.nodule_mask.tobytes()).hexdigest() == (
      PHANTOM_3_SHA256)
  base, xr, lesions = xray_dataset.subject_phantom(0, 1, FULL, findings_prevalence=1.0)
  fresh = make_phantom(subject.subject_seed(1, 0), FULL)
  assert lesions and xr.volume is not base.volume
  for a, b in ((base.volume.data, fresh.volume.data), (base.tissue, fresh.tissue),
               (base.nodule_mask, fresh.nodule_mask)):
    assert a.tobytes() == b.tobytes()  # The 3D phantom is not drawn into.
  assert base.candidates == fresh.candidates
  # Prevalence 0: the radiographs are those of the plain 3D phantom, with its nodule findings.
  plain = xray_dataset.make_subject_drrs(0, 1, SHAPE, ("pa",), findings_prevalence=0.0)["pa"]
  ph0 = xray_dataset.subject_phantom(0, 1, SHAPE, findings_prevalence=0.0)[1]
  direct = drr.make_drr(ph0, "pa", np.random.default_rng([1, 0, 23, 0]))
  np.testing.assert_array_equal(plain.log_integral, direct.log_integral)
  assert plain.findings == drr.findings(ph0.candidates, SHAPE)


@pytest.mark.parametrize("index", [1, 5])
def test_radiograph_findings_agree_with_what_was_drawn_into_the_ct(index):
  base, xr, lesions = xray_dataset.subject_phantom(index, 1, FULL, findings_prevalence=1.0)
  names = [les.name for les in lesions]
  assert {"Cardiomegaly", "Effusion", "Consolidation"} <= set(names)
  from genesis_jax.data.phantoms import radiograph_findings as rf
  lung = np.isin(base.tissue, rf.PAINTABLE)
  changed = xr.volume.data != base.volume.data
  assert not (changed & ~lung).any()  # Only lung is replaced: nodules, bone, heart stay.
  assert (xr.nodule_mask == base.nodule_mask).all() and xr.candidates == base.candidates
  spacing = np.asarray(base.volume.spacing)
  centre = (np.asarray(FULL) - 1) / 2
  taken = np.zeros(FULL, bool)
  lung_x = np.flatnonzero(lung.any(axis=(1, 2)))
  lung_z = np.flatnonzero(lung.any(axis=(0, 1)))
  for les in lesions:
    assert les.mask.any() and not (les.mask & taken).any() and (les.mask <= lung).all()
    taken |= les.mask
    idx = np.argwhere(les.mask)
    mean_hu = float(xr.volume.data[les.mask].mean())
    assert mean_hu > float(base.volume.data[les.mask].mean()) + 300  # Denser than the lung was.
    if les.side:  # One lung: the patient's right is +x.
      assert np.all(np.sign(idx[:, 0] - centre[0]) == les.side)
    if les.name == "Mass":
      diameter = (6 * len(idx) * float(np.prod(spacing)) / np.pi) ** (1 / 3)
      assert diameter >= rf.MASS_MM and mean_hu > 0
    if les.name == "Cardiomegaly":  # Heart wider than half the chest (the lungs' outer width).
      assert np.ptp(idx[:, 0]) >= 0.5 * np.ptp(lung_x)
      assert idx[:, 2].mean() < lung_z.mean()  # The lower chest.
    if les.name == "Effusion":  # Fluid at the base, below half the lung's height.
      assert idx[:, 2].max() <= lung_z[0] + 0.5 * 1.5 * np.ptp(lung_z) + 1
      assert abs(mean_hu - 10) < 40
  image = xray_dataset.make_subject_drrs(index, 1, FULL, ("pa",), findings_prevalence=1.0)["pa"]
  assert image.findings == drr.findings(base.candidates, FULL) + tuple(
      f for f in rf.RADIOGRAPH_FINDINGS if f in names)
  assert set(image.findings) <= set(drr.FINDINGS)
