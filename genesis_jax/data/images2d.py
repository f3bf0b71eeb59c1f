"""2D image readers: PNG, JPEG, TIFF, 2D DICOM radiographs (CR/DX) and single-slice NIfTI ->
`Image2D`.

Every reader returns one grey image as float32 with axes (x, y): x = columns left -> right, y =
rows top -> bottom. That is the transpose of the row-major array a file (or PIL/pydicom) holds,
and the 2D counterpart of the (x, y, z) volumes of `readers`; `image.array.T` is the picture as
it is displayed. Spacing is (sx, sy) in mm: DICOM PixelSpacing (else ImagerPixelSpacing), NIfTI
pixdim; 1.0 where the file does not say (PNG, JPEG, TIFF; their dpi, if any, is kept in `meta`).

Pixel values:
  - PNG/JPEG/TIFF, 8 or 16 bit grey ('L', 'I;16', 'I;16B', 'I', 'F', '1'): the stored values.
  - RGB/RGBA/LA: grey by the ITU-R BT.601 luma weights 0.299 R + 0.587 G + 0.114 B (the weights
    of Pillow's convert("L")), computed in float so nothing is rounded; alpha is ignored.
  - Palette ('P') images: read through the palette when the palette is grey (R = G = B, an index
    -> intensity table); a colour palette is an error (false colour has no single intensity).
  - Multi-page TIFFs and animated PNGs are an error unless they hold one frame.
  - EXIF orientation (JPEG) is applied, so the array is the image as meant to be viewed; a TIFF
    with an Orientation tag other than 1 is an error (Pillow decodes those inconsistently).
  - DICOM, as PS3.3 C.11 orders it: stored values -> Modality LUT (Modality LUT Sequence, else
    RescaleSlope/RescaleIntercept) -> VOI LUT (VOI LUT Sequence, else WindowCenter/WindowWidth
    with VOILUTFunction; the first of several) -> MONOCHROME1 inverted within the output range,
    so that a higher value is always brighter (MONOCHROME2 sense). pydicom's apply_modality_lut
    and apply_voi_lut do the first two steps. `read_image(path, voi=False)` keeps the
    modality values (e.g. for a CT slice in HU); MONOCHROME1 is inverted in both cases. A
    Presentation LUT Shape of INVERSE on a MONOCHROME1 image is the same inversion (DX requires
    that pair, PS3.3 C.8.11.6.1.2) and is not applied twice; on a MONOCHROME2 image it inverts.
  - NIfTI: shape (x, y) or (x, y, 1), the voxel order of the file (no reorientation: a radiograph
    has no RAS frame), scl_slope/scl_inter applied; the affine is kept in `meta`.

Anything wrong with a file raises `ImageReadError`, a `readers.VolumeReadError` (so a
`genesis_jax.errors.DataError` and a ValueError, caught like the 3D readers' errors), whose
message names the file, the problem and the way out. pydicom is part of the `io` extra: reading
DICOM without it is `readers.MissingExtraError`.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import zlib
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageOps

from genesis_jax.data import readers

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES + readers.NIFTI_SUFFIXES
# ITU-R BT.601 luma weights (Pillow's convert("L")).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "1")
_MAX_PIXELS = 2**31


class ImageReadError(readers.VolumeReadError):
  """A 2D image could not be read or is not a single grey image; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Image2D:
  """One 2D image.

  Attributes:
    array: float32 (x, y): x = columns left -> right, y = rows top -> bottom (the transpose of
      the file's row-major array; `array.T` is the displayed picture).
    spacing: (sx, sy) pixel size in mm; 1.0 where the file does not say.
    path: the file it came from.
    meta: what the reader knew: format, modality, photometric, bits, mode, spacing_source, ...
  """
  array: np.ndarray
  spacing: tuple[float, float]
  path: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.array.shape)


def is_image_file(path: str | pathlib.Path) -> bool:
  """Whether `path` names a 2D image this module reads: a suffix in IMAGE_SUFFIXES, or a
  suffix-less DICOM Part 10 file (preamble + "DICM"). Hidden files never are."""
  path = pathlib.Path(path)
  if path.name.startswith("."):
    return False
  name = path.name.lower()
  if any(name.endswith(s) for s in IMAGE_SUFFIXES):
    return True
  return not path.suffix and path.is_file() and _is_dicom_part10(path)


def _is_dicom_part10(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError:
    return False


def _is_io_error(e: Exception) -> bool:
  """An operating-system error (permissions, I/O, a vanished file: errno set), as opposed to bad
  content (Pillow's "truncated" and "cannot identify" OSErrors have no errno). I/O errors are
  re-raised as they are, so a bulk prepare retries the file next time instead of marking it bad."""
  return isinstance(e, OSError) and e.errno is not None


def read_image(path: str | pathlib.Path, *, voi: bool = True) -> Image2D:
  """Reads one 2D image file as a grey float32 (x, y) `Image2D`.

  Args:
    path: a PNG, JPEG, TIFF, DICOM (.dcm, or any Part 10 file) or single-slice NIfTI file.
    voi: DICOM only: apply the VOI LUT or window (the standard's display transform). False keeps
      the modality values (rescaled stored values).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ImageReadError(readers.broken_link_message(path) or f"{path}: no such file.")
  if path.is_dir():
    raise ImageReadError(f"{path}: a folder, not an image file (a folder of DICOM slices is a 3D "
                         "series: read it with readers.load_volume).")
  name = path.name.lower()
  if any(name.endswith(s) for s in readers.NIFTI_SUFFIXES):
    array, spacing, meta = _read_nifti2d(path)
  elif name.endswith(DICOM_SUFFIXES) or (not name.endswith(PIL_SUFFIXES)
                                         and _is_dicom_part10(path)):
    array, spacing, meta = _read_dicom2d(path, voi)
  elif name.endswith(PIL_SUFFIXES):
    array, spacing, meta = _read_pil(path)
  else:
    raise ImageReadError(f"{path}: unsupported image type; expected one of "
                         f"{', '.join(IMAGE_SUFFIXES)} or a DICOM file.")
  if array.ndim != 2 or array.size == 0:
    raise ImageReadError(f"{path}: expected one 2D image, got shape {array.shape}.")
  array = np.asarray(array, np.float32).T  # rows (y), columns (x) -> (x, y).
  if not np.isfinite(array).all():
    raise ImageReadError(f"{path}: {int(np.size(array) - np.isfinite(array).sum())} pixels are "
                         "NaN or Inf.")
  return Image2D(array=array, spacing=(float(spacing[0]), float(spacing[1])), path=str(path),
                 meta=meta)


# --- PNG, JPEG, TIFF (Pillow) -------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.float32)
  r, g, b = LUMA_WEIGHTS
  return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def _read_pil(path: pathlib.Path) -> tuple[np.ndarray, tuple[float, float], dict]:
  try:
    with Image.open(path) as img:
      fmt = img.format
      frames = int(getattr(img, "n_frames", 1))
      if frames > 1:
        raise ImageReadError(
            f"{path}: {frames} pages/frames in one {fmt} file; expected a single 2D image. Save "
            "each page as its own file (e.g. PIL: img.seek(k); img.save(...)).")
      # Read before load(): Pillow's TIFF loader acts on (and drops) the tag while loading.
      orientation = img.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "MPO") else 1
      img.load()
      meta = {"format": fmt, "mode": img.mode, "modality": "", "photometric": ""}
      if "dpi" in img.info:
        meta["dpi"] = [float(d) for d in img.info["dpi"]]
      if fmt == "TIFF" and orientation not in (None, 1):
        raise ImageReadError(
            f"{path}: TIFF Orientation tag {orientation} (rotated/flipped storage) is not "
            "supported: Pillow decodes such files inconsistently. Save the image in its display "
            "orientation (Orientation 1), e.g. as PNG.")
      if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        meta["exif_orientation"] = int(orientation)
      array = _pil_to_grey(img, path, meta)
  except ImageReadError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageReadError(f"{path}: {e}") from e
  except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
    if _is_io_error(e):
      raise
    raise ImageReadError(f"{path}: cannot read the image, truncated or corrupt file? "
                         f"({type(e).__name__}: {e}).") from e
  return array, (1.0, 1.0), meta


def _pil_to_grey(img: Image.Image, path: pathlib.Path, meta: dict) -> np.ndarray:
  mode = img.mode
  if mode in ("P", "PA"):
    palette = np.asarray(img.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    if palette.size and (palette == palette[:, :1]).all():
      meta.update(photometric="palette-grey", bits=8)
      index = np.asarray(img)[..., 0] if mode == "PA" else np.asarray(img)
      return palette[index, 0].astype(np.float32)
    raise ImageReadError(
        f"{path}: a colour palette ('{mode}') image; its pixels are colour-table indices, not "
        "intensities. Export it as a greyscale image (8 or 16 bit), or convert it first, e.g. "
        "PIL.Image.open(p).convert('L').save(q).")
  if mode in _GREY_MODES:
    array = np.asarray(img)
    if mode == "1":
      array = array.astype(np.uint8)
    meta.update(photometric="grey", bits=_bits(array, mode))
    return array.astype(np.float32)
  if mode in ("LA", "La"):
    array = np.asarray(img)[..., 0]
    meta.update(photometric="grey", bits=8)
    return array.astype(np.float32)
  if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
    array = np.asarray(img)[..., :3]
  elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
    array = np.asarray(img.convert("RGB"))
  else:
    raise ImageReadError(f"{path}: unsupported image mode {mode!r}; save it as 8/16-bit grey "
                         "or RGB.")
  meta.update(photometric="rgb-luma", bits=8)
  return _luma(array)


def _bits(array: np.ndarray, mode: str) -> int:
  if mode == "1":
    return 1
  if mode == "F":
    return 32
  return 8 * array.dtype.itemsize if mode != "I" else 32


# --- DICOM (pydicom) ----------------------------------------------------------------------------


def _pydicom():
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise readers.MissingExtraError(
        "Reading 2D DICOM images needs pydicom: pip install 'genesis_jax[io]'") from e
  try:
    # pylint: disable-next=import-outside-toplevel
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
  except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import (  # pylint: disable=import-outside-toplevel
        apply_modality_lut, apply_voi_lut)
  return pydicom, apply_modality_lut, apply_voi_lut


def _stored_range(ds) -> tuple[float, float]:
  bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
  if int(ds.get("PixelRepresentation", 0)) == 0:
    return 0.0, float(2**bits - 1)
  return float(-(2**(bits - 1))), float(2**(bits - 1) - 1)


def _modality_range(ds) -> tuple[float, float]:
  """The range of the Modality LUT's output (the input range of a window), PS3.3 C.11.1."""
  seq = ds.get("ModalityLUTSequence")
  if seq:
    return 0.0, float(2**int(seq[0].LUTDescriptor[2]) - 1)
  lo, hi = _stored_range(ds)
  slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
  if slope is not None and intercept is not None:
    lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
  return lo, hi


def _read_dicom2d(path: pathlib.Path, voi: bool) -> tuple[np.ndarray, tuple[float, float], dict]:
  pydicom, apply_modality_lut, apply_voi_lut = _pydicom()
  try:
    ds = pydicom.dcmread(str(path), force=path.suffix.lower() in DICOM_SUFFIXES)
  except Exception as e:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error).
    if _is_io_error(e):
      raise
    raise ImageReadError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).") from e
  if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
    raise ImageReadError(
        f"{path}: DICOM file without pixel data (a structured report, presentation state or "
        "header-only export?); give the image file itself.")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise ImageReadError(f"{path}: a multi-frame DICOM ({frames} frames); expected a single 2D "
                         "radiograph. Read a 3D series with readers.load_volume.")
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  try:
    stored = ds.pixel_array
  except Exception as e:  # Missing decoder plugins, truncated data, inconsistent header.
    hint = ""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
      hint = (f" It is compressed ({tsyntax.name}): install a decoder, e.g. pip install "
              "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm).")
    raise ImageReadError(f"{path}: cannot decode the DICOM pixel data ({type(e).__name__}: "
                         f"{e}).{hint}") from e
  meta = {"format": "DICOM", "modality": str(ds.get("Modality", "")), "photometric": photometric,
          "bits": int(ds.get("BitsStored", 0) or 0), "voi": "none"}
  if photometric.startswith(("RGB", "YBR")) or stored.ndim == 3:
    if stored.ndim != 3 or stored.shape[-1] != 3:
      raise ImageReadError(f"{path}: pixel array of shape {stored.shape} with photometric "
                           f"{photometric}; expected one 2D image.")
    meta["photometric"] = f"{photometric}->rgb-luma"
    return _luma(stored), _dicom_spacing(ds, meta), meta
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise ImageReadError(f"{path}: photometric interpretation {photometric} is not supported "
                         "(expected MONOCHROME1/2 or RGB).")
  values = apply_modality_lut(stored, ds)
  lo, hi = _modality_range(ds)
  if voi and ds.get("VOILUTSequence"):
    values = _tabulated(apply_voi_lut, values, ds, prefer_lut=True)
    lo, hi = 0.0, float(2**int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    meta["voi"] = "lut"
  elif voi and "WindowCenter" in ds and "WindowWidth" in ds:
    try:
      values = _tabulated(apply_voi_lut, values, ds, prefer_lut=False)
    except ValueError as e:
      raise ImageReadError(f"{path}: unusable window ({e}); read it with voi=False.") from e
    meta["voi"] = f"window ({ds.get('VOILUTFunction', 'LINEAR')})"
  values = np.asarray(values, np.float64)
  shape = str(ds.get("PresentationLUTShape", "") or "").upper()
  meta["presentation_lut_shape"] = shape or "none"
  if photometric == "MONOCHROME1" or shape == "INVERSE":
    values = (lo + hi) - values  # Inverted within the output range: higher = brighter.
  meta["range"] = [lo, hi]
  return values, _dicom_spacing(ds, meta), meta


def _tabulated(apply_voi_lut, values: np.ndarray, ds, prefer_lut: bool) -> np.ndarray:
  """pydicom's apply_voi_lut, evaluated once per distinct input value when the values are
  integers in a range of at most 2**20 (stored values, integer rescales): the same result, and a
  window on a 2048 x 2500 radiograph costs a table lookup instead of seconds of masked float64
  passes. Other inputs go through pydicom directly (its VOI LUT wants integer inputs)."""
  if values.dtype.kind == "f":
    if not np.array_equal(values, np.floor(values)):
      return apply_voi_lut(values, ds, prefer_lut=prefer_lut)
  lo, hi = int(values.min()), int(values.max())
  if hi - lo >= 2**20:
    return apply_voi_lut(values.astype(np.int64), ds, prefer_lut=prefer_lut)
  table = np.asarray(apply_voi_lut(np.arange(lo, hi + 1, dtype=np.int64), ds,
                                   prefer_lut=prefer_lut))
  return table[(values - lo).astype(np.intp)]


def _dicom_spacing(ds, meta: dict) -> tuple[float, float]:
  """(sx, sy) from PixelSpacing, whose two values are (row spacing, column spacing) = (sy, sx);
  else from ImagerPixelSpacing (same order, at the detector); else (1.0, 1.0)."""
  for key in ("PixelSpacing", "ImagerPixelSpacing"):
    value = ds.get(key)
    if value is not None and len(value) == 2:
      sy, sx = float(value[0]), float(value[1])
      if sx > 0 and sy > 0 and np.isfinite([sx, sy]).all():
        meta["spacing_source"] = key
        return sx, sy
  meta["spacing_source"] = "none"
  return 1.0, 1.0


# --- NIfTI (nibabel) ----------------------------------------------------------------------------


def _read_nifti2d(path: pathlib.Path) -> tuple[np.ndarray, tuple[float, float], dict]:
  try:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    if _is_io_error(e):
      raise
    raise ImageReadError(f"{path}: cannot read or decompress the file ({e}).") from e
  if len(raw) < 348:
    raise ImageReadError(f"{path}: {len(raw)} bytes, too short to be a NIfTI file.")
  sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
  klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
  try:
    header = klass.header_class.from_fileobj(io.BytesIO(raw))
    shape, dtype = header.get_data_shape(), header.get_data_dtype()
    offset = int(header.get_data_offset())
    img = klass.from_bytes(raw)
  except Exception as e:  # nibabel raises many types for bad headers.
    raise ImageReadError(f"{path}: not a valid NIfTI header ({type(e).__name__}: {e}).") from e
  if dtype.kind not in "iuf" or dtype.fields is not None:
    raise ImageReadError(f"{path}: unsupported voxel type {dtype} (need integers or floats).")
  count = int(np.prod(shape, dtype=np.float64))
  if any(s <= 0 for s in shape) or count > _MAX_PIXELS:
    raise ImageReadError(f"{path}: bad image dimensions {shape} in the header.")
  if len(raw) != offset + count * dtype.itemsize:
    raise ImageReadError(
        f"{path}: header describes {shape} {dtype} pixels at offset {offset} "
        f"({offset + count * dtype.itemsize} bytes) but the file holds {len(raw)} bytes; "
        "truncated file or corrupt header.")
  squeezed = tuple(shape[:2]) + tuple(s for s in shape[2:] if s != 1)
  if len(shape) < 2 or len(squeezed) != 2:
    raise ImageReadError(
        f"{path}: expected a single-slice image (x, y) or (x, y, 1), got shape {shape}; a 3D "
        "scan is read with readers.load_volume (2D models cut slices from it).")
  try:
    with np.errstate(all="ignore"):
      data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(squeezed)
  except Exception as e:
    raise ImageReadError(f"{path}: cannot decode the pixel data ({type(e).__name__}: {e}).") from e
  zooms = header.get_zooms()
  spacing = tuple(float(z) if z > 0 and np.isfinite(z) else 1.0 for z in zooms[:2])
  meta = {"format": "NIfTI", "modality": "", "photometric": "grey", "bits": 8 * dtype.itemsize,
          "affine": np.asarray(img.affine, np.float64).round(6).tolist()}
  # read_image transposes (rows, columns) -> (x, y); NIfTI data is already (x, y).
  return data.T, spacing, meta
