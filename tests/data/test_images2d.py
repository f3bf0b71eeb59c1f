"""2D image readers on generated files: PNG (8/16 bit, RGB, palettes), TIFF, JPEG, DICOM written
with pydicom (MONOCHROME1, rescale, VOI LUT, window, spacing) and single-slice NIfTI."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from genesis_jax import errors
from genesis_jax.data import images2d
from genesis_jax.data import readers

# Row-major file content: 5 rows (y) x 6 columns (x), every value distinct.
ROWS = (np.arange(30).reshape(5, 6) * 131 + 7).astype(np.uint16)


def test_png_8_and_16_bit_are_read_transposed(tmp_path):
  a8 = (ROWS % 256).astype(np.uint8)
  Image.fromarray(a8).save(tmp_path / "a.png")
  Image.fromarray(ROWS).save(tmp_path / "b.png")
  im8, im16 = images2d.read_image(tmp_path / "a.png"), images2d.read_image(tmp_path / "b.png")
  assert im8.array.dtype == np.float32 and im8.shape == (6, 5)  # (x, y) = (columns, rows).
  np.testing.assert_array_equal(im8.array, a8.T)
  np.testing.assert_array_equal(im16.array, ROWS.T)
  assert (im8.meta["bits"], im16.meta["bits"]) == (8, 16)
  assert im16.spacing == (1.0, 1.0) and im16.path.endswith("b.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_becomes_luma(tmp_path, mode):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(5, 6, len(mode)), dtype=np.uint8)
  Image.fromarray(rgb, mode).save(tmp_path / "c.png")
  im = images2d.read_image(tmp_path / "c.png")
  expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
  np.testing.assert_allclose(im.array, expected.T, atol=1e-3)
  assert im.meta["photometric"] == "rgb-luma"


def test_palette_png_grey_palette_is_read_colour_palette_is_an_error(tmp_path):
  a8 = (ROWS % 256).astype(np.uint8)
  Image.fromarray(a8).convert("P").save(tmp_path / "grey_p.png")
  np.testing.assert_array_equal(images2d.read_image(tmp_path / "grey_p.png").array, a8.T)
  rgb = np.stack([a8, 255 - a8, a8 // 2], -1)
  Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "col.png")
  with pytest.raises(images2d.ImageReadError, match=r"col\.png.*colour palette.*greyscale"):
    images2d.read_image(tmp_path / "col.png")


def test_truncated_png_names_the_file(tmp_path):
  Image.fromarray(np.tile(ROWS, (20, 20))).save(tmp_path / "full.png")
  raw = (tmp_path / "full.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(readers.VolumeReadError, match=r"cut\.png.*truncated"):
    images2d.read_image(tmp_path / "cut.png")
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  with pytest.raises(errors.DataError, match=r"junk\.png"):
    images2d.read_image(tmp_path / "junk.png")


def test_io_errors_are_not_taken_for_bad_content(tmp_path, monkeypatch):
  Image.fromarray((ROWS % 256).astype(np.uint8)).save(tmp_path / "a.png")

  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))
  monkeypatch.setattr(Image, "open", denied)
  with pytest.raises(PermissionError, match=r"a\.png"):  # Not an ImageReadError: retried later.
    images2d.read_image(tmp_path / "a.png")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_tiff(tmp_path, mode):
  if mode == "I":
    img = Image.fromarray(ROWS.astype(np.int32))
  else:
    dtype = "<u2" if mode == "I;16" else ">u2"
    img = Image.frombytes(mode, (6, 5), ROWS.astype(dtype).tobytes())
  img.save(tmp_path / "t.tif")
  im = images2d.read_image(tmp_path / "t.tif")
  np.testing.assert_array_equal(im.array, ROWS.T)
  assert im.meta["format"] == "TIFF"


def test_multipage_tiff_is_an_error(tmp_path):
  page = Image.fromarray((ROWS % 256).astype(np.uint8))
  page.save(tmp_path / "m.tif", save_all=True, append_images=[page])
  with pytest.raises(images2d.ImageReadError, match=r"m\.tif: 2 pages"):
    images2d.read_image(tmp_path / "m.tif")


def test_jpeg_is_read_with_its_exif_orientation(tmp_path):
  a8 = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (8, 1))
  Image.fromarray(a8).save(tmp_path / "j.jpg", quality=100)
  im = images2d.read_image(tmp_path / "j.jpg")
  assert im.shape == (16, 8)
  np.testing.assert_allclose(im.array, a8.T, atol=4)
  exif = Image.Exif()
  exif[0x0112] = 6  # Stored rotated: display = rotate 90 degrees clockwise.
  Image.fromarray(a8).save(tmp_path / "r.jpg", quality=100, exif=exif)
  im = images2d.read_image(tmp_path / "r.jpg")
  np.testing.assert_allclose(im.array, np.rot90(a8, -1).T, atol=4)
  assert im.meta["exif_orientation"] == 6
  Image.fromarray(a8).save(tmp_path / "r.tif", exif=exif)
  with pytest.raises(images2d.ImageReadError, match=r"r\.tif: TIFF Orientation tag 6"):
    images2d.read_image(tmp_path / "r.tif")


# --- DICOM -------------------------------------------------------------------------------------


def write_dicom(path, rows, *, photometric="MONOCHROME2", bits=12, pixels=True, **extra):
  """A DX radiograph written with pydicom: 16-bit allocated, `bits` stored, unsigned."""
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom import uid  # pylint: disable=g-import-not-at-top
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage.
  meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PhotometricInterpretation = "DX", photometric
  ds.Rows, ds.Columns = rows.shape
  ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, bits, bits - 1
  ds.PixelRepresentation = 0
  for key, value in extra.items():
    setattr(ds, key, value)
  if pixels:
    ds.PixelData = rows.astype("<u2").tobytes()
  ds.save_as(path, enforce_file_format=True)
  return path


def test_dicom_plain_and_spacing(tmp_path):
  im = images2d.read_image(write_dicom(tmp_path / "a.dcm", ROWS, PixelSpacing=[0.2, 0.15]))
  np.testing.assert_array_equal(im.array, ROWS.T)
  # PixelSpacing is (row spacing, column spacing) = (sy, sx).
  assert im.spacing == pytest.approx((0.15, 0.2))
  assert im.meta["modality"] == "DX" and im.meta["spacing_source"] == "PixelSpacing"
  im = images2d.read_image(write_dicom(tmp_path / "b.dcm", ROWS, ImagerPixelSpacing=[0.3, 0.3]))
  assert im.spacing == pytest.approx((0.3, 0.3))
  assert im.meta["spacing_source"] == "ImagerPixelSpacing"


def test_dicom_without_suffix_is_found_and_read(tmp_path):
  write_dicom(tmp_path / "IM0001", ROWS)
  assert images2d.is_image_file(tmp_path / "IM0001")
  np.testing.assert_array_equal(images2d.read_image(tmp_path / "IM0001").array, ROWS.T)


def test_dicom_monochrome1_is_inverted(tmp_path):
  inverted = (2**12 - 1) - ROWS.T.astype(np.float32)
  im = images2d.read_image(write_dicom(tmp_path / "m1.dcm", ROWS, photometric="MONOCHROME1"))
  np.testing.assert_array_equal(im.array, inverted)
  # DX pairs MONOCHROME1 with Presentation LUT Shape INVERSE: one inversion, not two.
  path = write_dicom(tmp_path / "m1i.dcm", ROWS, photometric="MONOCHROME1",
                     PresentationLUTShape="INVERSE")
  np.testing.assert_array_equal(images2d.read_image(path).array, inverted)
  path = write_dicom(tmp_path / "m2i.dcm", ROWS, PresentationLUTShape="INVERSE")
  np.testing.assert_array_equal(images2d.read_image(path).array, inverted)
  path = write_dicom(tmp_path / "m2.dcm", ROWS, PresentationLUTShape="IDENTITY")
  np.testing.assert_array_equal(images2d.read_image(path).array, ROWS.T)


def test_dicom_rescale_slope_intercept(tmp_path):
  path = write_dicom(tmp_path / "r.dcm", ROWS, RescaleSlope=2, RescaleIntercept=-1000)
  np.testing.assert_array_equal(images2d.read_image(path).array, 2.0 * ROWS.T - 1000.0)


def test_dicom_voi_lut_sequence(tmp_path):
  pydicom = pytest.importorskip("pydicom")
  item = pydicom.Dataset()
  item.LUTDescriptor = [4096, 0, 16]  # 4096 entries, first mapped value 0, 16-bit output.
  table = (np.arange(4096) ** 2 // 256).astype("<u2")  # A non-linear LUT.
  item.LUTData = table.tobytes()
  path = write_dicom(tmp_path / "v.dcm", ROWS, VOILUTSequence=pydicom.Sequence([item]),
                     WindowCenter=100, WindowWidth=10)  # The LUT wins over the window.
  im = images2d.read_image(path)
  np.testing.assert_array_equal(im.array, table[ROWS.T].astype(np.float32))
  assert im.meta["voi"] == "lut"
  # MONOCHROME1 after the LUT: inverted within the LUT's 16-bit output range.
  path = write_dicom(tmp_path / "v1.dcm", ROWS, photometric="MONOCHROME1",
                     VOILUTSequence=pydicom.Sequence([item]))
  np.testing.assert_array_equal(images2d.read_image(path).array,
                                65535.0 - table[ROWS.T].astype(np.float32))
  # voi=False keeps the modality values.
  np.testing.assert_array_equal(images2d.read_image(tmp_path / "v.dcm", voi=False).array, ROWS.T)


def test_dicom_window_linear(tmp_path):
  center, width = 2000.0, 1001.0
  path = write_dicom(tmp_path / "w.dcm", ROWS, WindowCenter=center, WindowWidth=width)
  im = images2d.read_image(path)
  # PS3.3 C.11.2.1.2.1 (LINEAR), output range [0, 4095] of the 12-bit stored values.
  x = ROWS.T.astype(np.float64)
  c, w = center - 0.5, width - 1.0
  expected = np.clip(((x - c) / w + 0.5) * 4095.0, 0.0, 4095.0)
  expected[x <= c - w / 2] = 0.0
  expected[x > c + w / 2] = 4095.0
  np.testing.assert_allclose(im.array, expected, rtol=1e-5)
  assert 0 < np.count_nonzero((im.array > 0) & (im.array < 4095))  # Some pixels inside.


@pytest.mark.parametrize("slope,intercept", [(1, 0), (2, -1000), (0.5, 0.25)])
def test_dicom_window_equals_pydicom_applied_directly(tmp_path, slope, intercept):
  pydicom = pytest.importorskip("pydicom")
  pixels = pytest.importorskip("pydicom.pixels")  # pydicom >= 3.
  path = write_dicom(tmp_path / "w.dcm", ROWS, RescaleSlope=slope, RescaleIntercept=intercept,
                     WindowCenter=[1500.0, 40.0], WindowWidth=[2000.0, 400.0],
                     VOILUTFunction="SIGMOID")
  ds = pydicom.dcmread(path)
  direct = pixels.apply_voi_lut(pixels.apply_modality_lut(ds.pixel_array, ds), ds,
                                prefer_lut=False)
  np.testing.assert_allclose(images2d.read_image(path).array, direct.T, rtol=1e-6, atol=1e-3)


def test_dicom_without_pixel_data_names_the_file(tmp_path):
  path = write_dicom(tmp_path / "nopix.dcm", ROWS, pixels=False)
  with pytest.raises(images2d.ImageReadError, match=r"nopix\.dcm: DICOM file without pixel data"):
    images2d.read_image(path)


def test_truncated_dicom_names_the_file(tmp_path):
  raw = write_dicom(tmp_path / "full.dcm", np.tile(ROWS, (8, 8))).read_bytes()
  (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 500])
  with pytest.raises(images2d.ImageReadError, match=r"cut\.dcm"):
    images2d.read_image(tmp_path / "cut.dcm")


# --- NIfTI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1)])
def test_single_slice_nifti(tmp_path, shape):
  data = ROWS.T.astype(np.int16).reshape(shape)  # NIfTI data is already (x, y).
  img = nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.0, 1.0]))
  nib.save(img, tmp_path / "s.nii.gz")
  im = images2d.read_image(tmp_path / "s.nii.gz")
  np.testing.assert_array_equal(im.array, ROWS.T)
  assert im.spacing == pytest.approx((0.7, 0.8))


def test_3d_nifti_and_truncated_nifti_are_errors(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
  with pytest.raises(images2d.ImageReadError, match=r"v\.nii: expected a single-slice"):
    images2d.read_image(tmp_path / "v.nii")
  nib.save(nib.Nifti1Image(np.zeros((60, 50), np.float32), np.eye(4)), tmp_path / "t.nii")
  raw = (tmp_path / "t.nii").read_bytes()
  (tmp_path / "t.nii").write_bytes(raw[:-100])
  with pytest.raises(images2d.ImageReadError, match=r"t\.nii.*truncated"):
    images2d.read_image(tmp_path / "t.nii")


def test_is_image_file_and_unsupported(tmp_path):
  assert images2d.is_image_file("x/a.PNG") and images2d.is_image_file("b.nii.gz")
  assert not images2d.is_image_file("x/.a.png") and not images2d.is_image_file("a.txt")
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(images2d.ImageReadError, match=r"a\.txt: unsupported"):
    images2d.read_image(tmp_path / "a.txt")
  with pytest.raises(images2d.ImageReadError, match="no such file"):
    images2d.read_image(tmp_path / "missing.png")
