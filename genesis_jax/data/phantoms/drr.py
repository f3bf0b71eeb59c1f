"""Digitally reconstructed radiographs (DRRs) of the phantoms: built-in chest X-rays, no download.

A DRR is the radiograph a parallel X-ray beam would make of a phantom CT:

1. Hounsfield units to linear attenuation, mu = mu_water * (1 + HU / 1000), clipped at 0 (air and
   anything below -1000 HU attenuate nothing). mu_water = 0.0206 / mm, water at about 60 keV,
   the effective energy of a chest radiograph's beam.
2. Line integrals p = sum(mu) * voxel size along the beam: along y (anterior-posterior) for a PA
   view, image (x, z); along x (left-right) for a lateral view, image (y, z).
3. Quantum noise: the detector counts N ~ Poisson(I0 exp(-p)) photons (I0 unattenuated photons
   per pixel) plus Gaussian electronic noise, and the radiograph shows the log estimate
   p_hat = -log(N / I0). Bone and soft tissue (large p) are bright, lung and air dark, as on film.
4. Pixels are made square (the projection is resampled along z to the in-plane voxel size), the
   image is turned to the display orientation (head up; PA: the patient's right on the viewer's
   left; lateral: anterior on the left) and mapped to [0, 1] by its 0.5 and 99.5 percentiles.

Arrays are canonical 2D images (x, y): x the column (left to right on screen), y the row (top to
bottom), as a PNG's width and height; `png_array` gives the (row, column) array an image file
holds. The nodule mask of a view is the projection of the 3D nodule mask: a pixel is 1 when any
nodule voxel lies on its ray.

Per-image findings come from the phantom, never from pixels: the nodule findings from its own
nodule list (`Phantom.candidates` with label 1, `findings()`), and the radiograph findings
(Cardiomegaly, Effusion, Mass, Consolidation) from the lesions radiograph_findings.py drew into a
copy of its CT for the radiograph only (`lesion_findings()`); FINDINGS lists both, in class order.
`write_xray_dataset` (xray_dataset.py) writes the images, masks and a ChestX-ray8-style CSV.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from genesis_jax import errors
from genesis_jax.data.phantoms.radiograph_findings import RADIOGRAPH_FINDINGS

MU_WATER_PER_MM = 0.0206  # Linear attenuation of water at about 60 keV, 1/mm.
# View -> the volume axis the beam runs along (x = 0 left-right, y = 1 anterior-posterior).
VIEWS = {"pa": 1, "lateral": 0}
# ChestX-ray8's "View Position" column for each view.
VIEW_POSITION = {"pa": "PA", "lateral": "LL"}
# Findings of the multi-label task, in class order. Large/Small: nodule diameter >= or <
# LARGE_NODULE_MM; Right/Left: the lung (patient side) a nodule's centre lies in. Then the
# radiograph findings drawn for the DRRs only (radiograph_findings.py).
NODULE_FINDINGS = ("Nodule", "Multiple_Nodules", "Large_Nodule", "Small_Nodule", "Right_Nodule",
                   "Left_Nodule")
FINDINGS = NODULE_FINDINGS + RADIOGRAPH_FINDINGS
NO_FINDING = "No Finding"
LARGE_NODULE_MM = 10.0
DISPLAY_PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass
class DRR:
  """One radiograph of a phantom: display-oriented canonical 2D arrays (x, y)."""
  image: np.ndarray  # float32 [0, 1], the displayed radiograph.
  log_integral: np.ndarray  # float32, p_hat = -log(N / I0): the noisy line integral.
  mask: np.ndarray  # uint8 {0, 1}: pixels whose ray crosses a nodule voxel.
  spacing: tuple[float, float]  # Pixel size (x, y) in mm.
  view: str
  findings: tuple[str, ...]  # Subset of FINDINGS in their order; empty = "No Finding".


def check_view(view: str) -> str:
  if view not in VIEWS:
    raise errors.ConfigError(f"DRR view {view!r}: expected one of {tuple(VIEWS)}.")
  return view


def attenuation(hu: np.ndarray) -> np.ndarray:
  """Linear attenuation per mm from Hounsfield units, clipped at 0 (float32)."""
  mu = MU_WATER_PER_MM * (1.0 + np.asarray(hu, np.float32) / 1000.0)
  return np.maximum(mu, 0.0).astype(np.float32)


def line_integral(hu: np.ndarray, spacing: Sequence[float], view: str) -> np.ndarray:
  """sum(mu) * voxel size along the view's beam axis: (x, z) for "pa", (y, z) for "lateral"
  (volume index order, before any display flip); float64."""
  axis = VIEWS[check_view(view)]
  if np.ndim(hu) != 3:
    raise errors.DataError(f"line_integral: expected an (x, y, z) volume, got shape "
                           f"{np.shape(hu)}.")
  return attenuation(hu).sum(axis=axis, dtype=np.float64) * float(spacing[axis])


def project_mask(mask: np.ndarray, view: str) -> np.ndarray:
  """uint8 (x, z) or (y, z): 1 where any voxel on the ray is in the mask."""
  return np.asarray(mask).astype(bool).any(axis=VIEWS[check_view(view)]).astype(np.uint8)


def detector(integral: np.ndarray, rng: np.random.Generator, i0: float = 2e4,
             electronic_sigma: float = 5.0) -> np.ndarray:
  """Noisy log estimate p_hat = -log(N / I0) of a line-integral image (float32).

  N ~ Poisson(I0 exp(-p)) + Normal(0, electronic_sigma), floored at half a photon so the log is
  finite. i0 <= 0 turns the noise off (p_hat = p)."""
  p = np.asarray(integral, np.float64)
  if i0 <= 0:
    return p.astype(np.float32)
  counts = rng.poisson(i0 * np.exp(-p)).astype(np.float64)
  if electronic_sigma > 0:
    counts += rng.normal(0.0, electronic_sigma, p.shape)
  return (-np.log(np.maximum(counts, 0.5) / i0)).astype(np.float32)


def square_pixels(image: np.ndarray, spacing: Sequence[float], order: int = 1
                  ) -> tuple[np.ndarray, tuple[float, float]]:
  """Resamples axis 1 (z) of a projection to the pixel size of axis 0; (image, spacing).

  order 1 (linear) for images; for masks order 0 on the 0/1 values keeps them binary."""
  sx, sz = float(spacing[0]), float(spacing[1])
  n = max(1, int(round(image.shape[1] * sz / sx)))
  if n == image.shape[1]:
    return image, (sx, sx)
  zoom = (1.0, n / image.shape[1])
  out = ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
  return out, (sx, sx)


def display_orientation(image: np.ndarray) -> np.ndarray:
  """A projection in volume order (x or y, z) -> the canonical display image (x, y): head up;
  PA with the patient's right (+x) on the viewer's left, lateral with anterior (+y) on the left.
  """
  return np.ascontiguousarray(image[::-1, ::-1])


def png_array(image: np.ndarray) -> np.ndarray:
  """A canonical 2D image (x, y) -> the (row, column) array an image file stores."""
  return np.ascontiguousarray(np.asarray(image).T)


def to_unit(image: np.ndarray, percentiles=DISPLAY_PERCENTILES) -> np.ndarray:
  """Clip to the image's (lo, hi) percentiles and map linearly to [0, 1] (float32)."""
  lo, hi = np.percentile(image, percentiles)
  if hi <= lo:
    return np.zeros(image.shape, np.float32)
  return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def findings(candidates, shape: Sequence[int], large_mm: float = LARGE_NODULE_MM
             ) -> tuple[str, ...]:
  """The findings of a phantom from its true nodules (candidates with label 1), FINDINGS order.

  Side: a nodule whose centre lies at x above the volume's centre is in the patient's right
  lung (RAS+: +x is the patient's right; the phantom's mediastinum is at the centre)."""
  nodules = [c for c in candidates if int(c.label) == 1]
  centre_x = (float(shape[0]) - 1) / 2
  found = set()
  if nodules:
    found.add("Nodule")
  if len(nodules) >= 2:
    found.add("Multiple_Nodules")
  for c in nodules:
    found.add("Large_Nodule" if c.diameter_mm >= large_mm else "Small_Nodule")
    found.add("Right_Nodule" if c.center_vox[0] > centre_x else "Left_Nodule")
  return tuple(f for f in FINDINGS if f in found)


def lesion_findings(lesions) -> tuple[str, ...]:
  """The radiograph findings of the lesions drawn into a phantom's CT (radiograph_findings.py)."""
  names = {les.name for les in lesions}
  return tuple(f for f in RADIOGRAPH_FINDINGS if f in names)


def finding_labels(found: Sequence[str]) -> str:
  """ChestX-ray8's "Finding Labels" cell: findings joined by "|", or "No Finding"."""
  return "|".join(found) if found else NO_FINDING


def parse_finding_labels(cell: str) -> tuple[str, ...]:
  """Inverse of `finding_labels`: "Nodule|Left_Nodule" -> ("Nodule", "Left_Nodule")."""
  parts = tuple(p.strip() for p in str(cell).split("|") if p.strip())
  return () if parts == (NO_FINDING,) else parts


def make_drr(phantom, view: str, rng: np.random.Generator, *, i0: float = 2e4,
             electronic_sigma: float = 5.0, large_mm: float = LARGE_NODULE_MM,
             lesions=()) -> DRR:
  """The `view` radiograph of a phantom with square pixels, its projected nodule mask and its
  findings (see the module docstring for each step); `lesions` are the radiograph findings
  already drawn into `phantom`'s CT (radiograph_findings.add_findings), for the labels."""
  vol = phantom.volume
  spacing = np.asarray(vol.spacing, np.float64)
  axis = VIEWS[check_view(view)]
  plane = tuple(float(s) for k, s in enumerate(spacing) if k != axis)
  integral, pixel = square_pixels(line_integral(vol.data, spacing, view), plane, order=1)
  mask, _ = square_pixels(project_mask(phantom.nodule_mask, view), plane, order=0)
  p_hat = display_orientation(detector(integral, rng, i0, electronic_sigma))
  return DRR(image=to_unit(p_hat), log_integral=p_hat, mask=display_orientation(mask),
             spacing=pixel, view=view,
             findings=findings(phantom.candidates, vol.data.shape, large_mm)
             + lesion_findings(lesions))
