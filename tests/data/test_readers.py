"""Readers: nibabel's bundled images, format round-trips with known geometry, bad input, fuzzing."""
from __future__ import annotations

import gzip
import os
import pathlib
import sys

import hypothesis
import hypothesis.strategies as st
import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIB_DATA

from genesis_jax.data import readers
from genesis_jax.data.readers import VolumeReadError, check_volume, find_scans, load_volume
from genesis_jax.data.volume import Volume

# A non-trivial geometry: axes permuted (i -> A-P, j -> R-L, k -> S), two flips, a small
# rotation and an offset origin; 0.7 x 0.8 x 2.5 mm voxels.
_ROT = np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT @ np.array([[0, -0.8, 0], [-0.7, 0, 0], [0, 0, 2.5]])
AFFINE[:3, 3] = [12.0, -30.5, 101.25]


def _ramp(shape=(6, 5, 4), dtype=np.int16):
  """Distinct values per voxel so any axis mix-up shows."""
  return (np.arange(np.prod(shape)).reshape(shape) * 7 - 60).astype(dtype)


def _assert_same_world(vol: Volume, raw: np.ndarray, raw_affine: np.ndarray):
  """Every voxel of `vol` holds the raw value found at the same world point in (raw, raw_affine)."""
  assert vol.data.dtype == np.float32 and vol.data.ndim == 3
  assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
  ijk = np.indices(vol.shape).reshape(3, -1)
  world = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3:4]
  raw_ijk = np.linalg.inv(raw_affine[:3, :3]) @ (world - raw_affine[:3, 3:4])
  raw_idx = np.round(raw_ijk).astype(int)
  np.testing.assert_allclose(raw_ijk, raw_idx, atol=1e-6)  # Same grid, only reindexed.
  np.testing.assert_array_equal(vol.data.reshape(-1), raw[tuple(raw_idx)])


# --- nibabel's bundled test images ----------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"])
def test_nibabel_bundled_images_load_canonical(name):
  path = os.path.join(NIB_DATA, name)
  vol = load_volume(path)
  ref = nib.as_closest_canonical(nib.load(path))
  assert vol.source == path
  assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
  np.testing.assert_allclose(vol.affine, ref.affine)
  np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32))


@pytest.mark.parametrize("name", ["functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"])
def test_nibabel_bundled_4d_images_are_rejected_unless_a_channel_is_chosen(name):
  path = os.path.join(NIB_DATA, name)
  with pytest.raises(VolumeReadError, match=rf"{name}.*4D"):
    load_volume(path)
  vol = load_volume(path, channel=1)
  ref = nib.as_closest_canonical(nib.load(path))
  np.testing.assert_array_equal(vol.data, ref.get_fdata(dtype=np.float32)[..., 1])


# --- NIfTI round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_int16_with_slope_and_oblique_affine_round_trip(tmp_path, suffix):
  raw = _ramp()
  img = nib.Nifti1Image(raw, AFFINE)
  img.header.set_slope_inter(2.5, -1024.0)
  path = tmp_path / f"scan{suffix}"
  nib.save(img, path)
  vol = load_volume(path)
  assert vol.shape == (5, 6, 4)  # i (A-P) and j (R-L) swapped into (R, A, S) order.
  _assert_same_world(vol, raw * 2.5 - 1024.0, AFFINE)
  np.testing.assert_allclose(vol.spacing, (0.8, 0.7, 2.5))


def test_nifti_singleton_fourth_dim_is_squeezed(tmp_path):
  raw = _ramp()[..., None].astype(np.float32)
  nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "s.nii.gz")
  vol = load_volume(tmp_path / "s.nii.gz")
  np.testing.assert_array_equal(vol.data, raw[..., 0])


def test_nifti_nan_voxels_load_and_check_volume_names_file(tmp_path):
  raw = _ramp().astype(np.float32)
  raw[1, 2, 3] = np.nan
  raw[0, 0, 0] = np.inf
  nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "nan.nii")
  vol = load_volume(tmp_path / "nan.nii")
  with pytest.raises(VolumeReadError, match=r"nan\.nii: 2 of 120 voxels are NaN or Inf"):
    check_volume(vol)


# --- MetaImage, NRRD, DICOM written by hand / by other libraries -----------------------------------

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _itk_geometry():
  """Direction (columns = index axes, LPS), spacing, origin; and the matching RAS affine."""
  direction = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])  # j runs towards anterior.
  spacing = np.array([0.7, 0.8, 2.5])
  origin = np.array([-150.0, 120.0, -300.0])
  lps = np.eye(4)
  lps[:3, :3] = direction * spacing
  lps[:3, 3] = origin
  return direction, spacing, origin, _LPS @ lps


def _write_mhd(folder: pathlib.Path, raw: np.ndarray, name="scan", element="MET_SHORT"):
  direction, spacing, origin, _ = _itk_geometry()
  fmt = lambda a: " ".join(f"{v:g}" for v in np.ravel(a))
  # MetaImage TransformMatrix lists the direction matrix row by row of its transpose (column
  # vectors one after another), like ITK writes it.
  (folder / f"{name}.mhd").write_text(
      "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
      "CompressedData = False\n"
      f"TransformMatrix = {fmt(direction.T)}\nOffset = {fmt(origin)}\nCenterOfRotation = 0 0 0\n"
      f"AnatomicalOrientation = RAI\nElementSpacing = {fmt(spacing)}\n"
      f"DimSize = {fmt(raw.shape)}\nElementType = {element}\nElementDataFile = {name}.raw\n")
  (folder / f"{name}.raw").write_bytes(raw.tobytes(order="F"))  # x varies fastest.
  return folder / f"{name}.mhd"


def test_mhd_raw_pair_loads_same_voxels_and_orientation_as_nifti(tmp_path):
  raw = _ramp()
  *_, ras_affine = _itk_geometry()
  vol = load_volume(_write_mhd(tmp_path, raw))
  _assert_same_world(vol, raw.astype(np.float32), ras_affine)
  nib.save(nib.Nifti1Image(raw, ras_affine), tmp_path / "same.nii.gz")
  ref = load_volume(tmp_path / "same.nii.gz")
  np.testing.assert_array_equal(vol.data, ref.data)
  np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-9)


def test_nrrd_loads_same_voxels_and_orientation(tmp_path):
  nrrd = pytest.importorskip("nrrd")
  raw = _ramp()
  direction, spacing, origin, ras_affine = _itk_geometry()
  header = {"space": "left-posterior-superior", "space directions": (direction * spacing).T,
            "space origin": origin}
  nrrd.write(str(tmp_path / "scan.nrrd"), raw, header)  # pynrrd writes (x, y, z) Fortran order.
  vol = load_volume(tmp_path / "scan.nrrd")
  _assert_same_world(vol, raw.astype(np.float32), ras_affine)


def _write_dicom_series(folder: pathlib.Path, raw: np.ndarray, slope=2.0, intercept=-1024.0):
  """One CT slice per file, written with pydicom, file names deliberately out of slice order."""
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  direction, spacing, origin, _ = _itk_geometry()
  series, study, frame = generate_uid(), generate_uid(), generate_uid()
  folder.mkdir(exist_ok=True)
  for k in range(raw.shape[2]):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.ImagePositionPatient = [float(v) for v in origin + direction[:, 2] * spacing[2] * k]
    ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (row spacing, column spacing).
    ds.SliceThickness = float(spacing[2])
    ds.Rows, ds.Columns = raw.shape[1], raw.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).tobytes()  # (rows = y, columns = x).
    ds.save_as(folder / f"slice_{(7 * k) % raw.shape[2]:03d}.dcm", enforce_file_format=True)
  return folder


def test_dicom_series_loads_same_voxels_and_orientation(tmp_path):
  raw = _ramp()
  *_, ras_affine = _itk_geometry()
  vol = load_volume(_write_dicom_series(tmp_path / "series", raw))
  _assert_same_world(vol, raw * 2.0 - 1024.0, ras_affine)
  assert find_scans(tmp_path) == [tmp_path / "series"]


def test_dicom_without_suffix_is_found_and_appledouble_files_ignored(tmp_path):
  raw = _ramp()
  series = _write_dicom_series(tmp_path / "export", raw)
  for k, p in enumerate(sorted(series.iterdir())):
    p.rename(series / f"IM{k:04d}")
  (series / "._IM0000.dcm").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "README").write_text("not a scan")
  assert find_scans(tmp_path) == [series]
  _assert_same_world(load_volume(series), raw * 2.0 - 1024.0, _itk_geometry()[3])


# --- find_scans ------------------------------------------------------------------------------------


def test_find_scans_sorted_recursive_skips_hidden_and_raw(tmp_path):
  (tmp_path / "subset1").mkdir()
  (tmp_path / "subset0").mkdir()
  for p in ["subset1/b.mhd", "subset1/b.raw", "subset0/z.nii.gz", "a.nrrd", "._a.nii.gz",
            "notes.txt"]:
    (tmp_path / p).write_bytes(b"")
  assert find_scans(tmp_path) == [tmp_path / "a.nrrd", tmp_path / "subset0/z.nii.gz",
                                  tmp_path / "subset1/b.mhd"]
  assert readers.scan_id(tmp_path / "subset0/z.nii.gz") == "z"


def test_find_scans_does_not_follow_a_link_loop_and_lists_each_real_file_once(tmp_path, caplog):
  loop = tmp_path / "d" / "loop"
  loop.mkdir(parents=True)
  (loop / "good.nii.gz").write_bytes(b"")
  os.symlink(".", loop / "self")  # d/loop/self -> . : an endless tree when followed
  assert find_scans(loop) == [loop / "good.nii.gz"]
  # Two paths to one real file (a link, and a linked folder) are one scan, the first in path order.
  os.symlink(loop / "good.nii.gz", loop / "same.nii.gz")
  os.symlink(loop, tmp_path / "d" / "alias")
  assert find_scans(tmp_path / "d") == [tmp_path / "d" / "alias" / "good.nii.gz"]
  assert "lead to a scan already listed, each listed once" in caplog.text


def test_a_dangling_link_is_listed_and_reading_it_names_the_link(tmp_path):
  (tmp_path / "good.nii.gz").write_bytes(b"")
  os.symlink(tmp_path / "moved_away.nii.gz", tmp_path / "gone.nii.gz")
  assert find_scans(tmp_path) == [tmp_path / "gone.nii.gz", tmp_path / "good.nii.gz"]
  with pytest.raises(VolumeReadError,
                     match=r"gone.nii.gz: broken symbolic link to .*moved_away.nii.gz.*fix or "
                           r"remove the link"):
    load_volume(tmp_path / "gone.nii.gz")


def test_2d_and_4d_images_say_3d_was_expected_and_what_to_do(tmp_path):
  (tmp_path / "slice.nii").write_bytes(_nifti_bytes(np.ones((6, 5), np.int16)))
  with pytest.raises(VolumeReadError) as e:
    load_volume(tmp_path / "slice.nii")
  msg = str(e.value)
  assert "slice.nii: expected a 3D volume (x, y, z), got a 2D image of shape (6, 5)" in msg
  assert "stack the slices into one 3D file" in msg and "\n" not in msg
  (tmp_path / "multi.nii").write_bytes(_nifti_bytes(np.ones((3, 3, 3, 2), np.int16)))
  with pytest.raises(VolumeReadError) as e:
    load_volume(tmp_path / "multi.nii")
  msg = str(e.value)
  assert "multi.nii: expected a 3D volume (x, y, z), got a 4D image of shape (3, 3, 3, 2)" in msg
  assert "save the channel you want as a 3D file" in msg and "\n" not in msg


def test_find_scans_missing_or_empty_folder(tmp_path):
  with pytest.raises(VolumeReadError, match="nope: scan folder does not exist"):
    find_scans(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(VolumeReadError, match="empty: no scans found"):
    find_scans(tmp_path / "empty")


# --- bad input -------------------------------------------------------------------------------------


def _nifti_bytes(raw=None, compress=False) -> bytes:
  img = nib.Nifti1Image(_ramp() if raw is None else raw, AFFINE)
  img.header.set_slope_inter(2.5, -1024.0)
  data = img.to_bytes()
  return gzip.compress(data) if compress else data


@pytest.mark.parametrize("name, content, pattern", [
    ("trunc.nii.gz", lambda: _nifti_bytes(compress=True)[:-40], "trunc.nii.gz: cannot read or"),
    ("trunc.nii", lambda: _nifti_bytes()[:-10], "trunc.nii: header describes .* truncated"),
    ("text.nii", lambda: b"just some notes\n" * 40, "text.nii: not a valid NIfTI header"),
    ("tiny.nii", lambda: b"hello", "tiny.nii: 5 bytes, too short"),
    ("real4d.nii", lambda: _nifti_bytes(np.zeros((3, 3, 3, 2), np.int16)), "real4d.nii: .*4D"),
    ("flat.nii", lambda: _nifti_bytes(np.zeros((3, 3), np.int16)), "flat.nii: expected a 3D volume .* 2D image"),
    ("scan.mhd", lambda: b"DimSize = 3 3\x00\xff garbage", "scan.mhd: cannot read the image"),
    ("scan.nrrd", lambda: b"NRRD0004\ntype: foo\nsizes: 2 2 2\n\n", "scan.nrrd: cannot read"),
    ("scan.hdr", lambda: b"x", "scan.hdr: unsupported file type"),
])
def test_bad_files_raise_error_naming_the_file(tmp_path, name, content, pattern):
  (tmp_path / name).write_bytes(content())
  with pytest.raises(VolumeReadError, match=pattern):
    load_volume(tmp_path / name)


def test_missing_file(tmp_path):
  with pytest.raises(VolumeReadError, match="gone.nii: no such file"):
    load_volume(tmp_path / "gone.nii")


def test_mhd_with_missing_or_short_raw(tmp_path):
  path = _write_mhd(tmp_path, _ramp())
  (tmp_path / "scan.raw").write_bytes(_ramp().tobytes()[:-6])
  with pytest.raises(VolumeReadError, match="scan.mhd: cannot read the image"):
    load_volume(path)
  (tmp_path / "scan.raw").unlink()
  with pytest.raises(VolumeReadError, match="scan.mhd: cannot read the image"):
    load_volume(path)


def test_mhd_absurd_dimensions_rejected_before_allocating(tmp_path):
  path = _write_mhd(tmp_path, _ramp())
  path.write_text(path.read_text().replace("DimSize = 6 5 4", "DimSize = 60000 50000 40000"))
  with pytest.raises(VolumeReadError, match="scan.mhd: header claims"):
    load_volume(path)


def test_corrupt_dicom_folders(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(VolumeReadError, match="empty: empty folder"):
    load_volume(tmp_path / "empty")
  (tmp_path / "junk").mkdir()
  for k in range(3):
    (tmp_path / "junk" / f"{k}.dcm").write_bytes(os.urandom(300))
  with pytest.raises(VolumeReadError, match="junk: no readable DICOM series"):
    load_volume(tmp_path / "junk")
  series = _write_dicom_series(tmp_path / "trunc", _ramp())
  victim = sorted(series.iterdir())[1]
  victim.write_bytes(victim.read_bytes()[:-20])  # Pixel data cut short.
  with pytest.raises(VolumeReadError, match="trunc: unreadable DICOM file.*" + victim.name):
    load_volume(series)
  series = _write_dicom_series(tmp_path / "gap", _ramp())
  (series / "slice_002.dcm").unlink()  # Slice k=2 of 0..3: a hole in the middle.
  with pytest.raises(VolumeReadError, match="gap: DICOM slices are not evenly spaced"):
    load_volume(series)


def test_missing_simpleitk_is_a_clear_import_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "SimpleITK", None)
  (tmp_path / "scan.mhd").write_text("NDims = 3\n")
  with pytest.raises(ImportError, match=r"genesis_jax\[io\]"):
    load_volume(tmp_path / "scan.mhd")


@pytest.mark.parametrize("data, min_shape, pattern", [
    (np.full((4, 4, 4), 7.0), None, "constant volume"),
    (np.arange(64.0).reshape(4, 4, 4), (8, 4, 4), r"volume of shape \(4, 4, 4\).*smaller than .*\(8, 4, 4\)"),
    (np.arange(16.0).reshape(4, 4), None, "expected a 3D"),
])
def test_check_volume_rejects(data, min_shape, pattern):
  vol = Volume(data.astype(np.float32), np.eye(4), "case_7.nii.gz")
  with pytest.raises(VolumeReadError, match=f"case_7.nii.gz: {pattern}"):
    check_volume(vol, min_shape)


def test_check_volume_accepts_good_volume():
  check_volume(Volume(np.arange(64.0, dtype=np.float32).reshape(4, 4, 4), np.eye(4), "x"), (4, 4, 4))


# --- fuzzing ---------------------------------------------------------------------------------------

_GOOD = _nifti_bytes(_ramp((4, 3, 2)))


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(edits=st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), min_size=1,
                                 max_size=6),
                  compress=st.booleans())
def test_fuzz_nifti_header_corruption_is_clean(tmp_path, edits, compress):
  """Random header bytes: a VolumeReadError, or a sane volume of the same voxel count; never
  another exception, a crash, or a volume with NaN/Inf from garbage scaling."""
  blob = bytearray(_GOOD)
  for pos, value in edits:
    blob[pos] = value
  path = tmp_path / ("fuzz.nii.gz" if compress else "fuzz.nii")
  path.write_bytes(gzip.compress(bytes(blob)) if compress else bytes(blob))
  try:
    vol = load_volume(path)
  except VolumeReadError as e:
    assert str(path) in str(e)
    return
  assert vol.data.dtype == np.float32 and vol.data.ndim == 3
  assert vol.data.size == 24
  # Every 2-byte NIfTI type is an integer one, so NaN/Inf could only come from garbage scaling.
  assert np.isfinite(vol.data).all()
  assert np.isfinite(vol.affine).all() and abs(np.linalg.det(vol.affine[:3, :3])) > 0
  assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(pos=st.integers(0, 400), junk=st.binary(min_size=1, max_size=8))
def test_fuzz_mhd_header_corruption_is_clean(tmp_path, pos, junk):
  path = _write_mhd(tmp_path, _ramp())
  text = path.read_bytes()
  pos = min(pos, len(text))
  path.write_bytes(text[:pos] + junk + text[pos + len(junk):])
  try:
    vol = load_volume(path)
  except VolumeReadError as e:
    assert str(path) in str(e)
    return
  assert vol.data.dtype == np.float32 and vol.data.ndim == 3
  assert np.isfinite(vol.affine).all()
