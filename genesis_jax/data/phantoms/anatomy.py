"""Phantom anatomy: body, fat and muscle, spine, ribs and sternum, heart and mediastinum, lungs
with parenchymal texture, trachea and main bronchi, and the tapering pulmonary vessel trees."""
from __future__ import annotations

import heapq

import numpy as np

from genesis_jax.data.phantoms.geometry import (Grid, Segment, capsule, paint, perpendicular,
                                                rotate, smooth_field, unit)

# Codes of `Phantom.tissue`: which structure each voxel was drawn as (before blur and noise).
TISSUE = {"air": 0, "fat": 1, "soft_tissue": 2, "lung": 3, "bone": 4, "vessel": 5, "nodule": 6,
          "lookalike": 7, "airway": 8}


def _fill(hu, tissue, where, value, code):
  """hu[where] = value and tissue[where] = code; `where`/`value` broadcast against the volume."""
  np.copyto(hu, value, where=where)
  np.copyto(tissue, np.uint8(code), where=where)


def draw_anatomy(rng, grid: Grid):
  """Body, bones, mediastinum and lungs: (hu float32, tissue uint8, lung mask, lungs, info)."""
  g = grid
  half = np.asarray(g.shape) * g.spacing / 2  # Half field of view per axis, mm.
  hu = np.full(g.shape, -1000.0, np.float32)
  tissue = np.zeros(g.shape, np.uint8)

  # Body cross-section: an ellipse, constant along z. Thicknesses are in units of rb.
  ax_b, ay_b = rng.uniform(0.82, 0.94) * half[0], rng.uniform(0.62, 0.78) * half[1]
  cy_b = rng.uniform(-0.06, 0.02) * half[1]
  rb = np.sqrt((g.x / ax_b) ** 2 + ((g.y - cy_b) / ay_b) ** 2)  # (X, Y, 1)
  mean_ab = (ax_b + ay_b) / 2
  t_fat = rng.uniform(2.5, 8.0) / mean_ab
  t_muscle = rng.uniform(4.0, 8.0) / mean_ab
  squeeze = min(1.0, 0.3 / (t_fat + t_muscle))  # Small fields of view keep a roomy rib cage.
  t_fat, t_muscle = t_fat * squeeze, t_muscle * squeeze
  r_cavity = 1 - t_fat - t_muscle
  _fill(hu, tissue, rb < 1, np.float32(rng.uniform(-115, -85)), TISSUE["fat"])
  soft = smooth_field(rng, g.shape, (10, 10, 6))  # Organ/muscle heterogeneity and fat pockets.
  hu_soft = np.float32(rng.uniform(35, 50)) + 8 * soft
  _fill(hu, tissue, rb < 1 - t_fat, hu_soft, TISSUE["soft_tissue"])
  # Mediastinal and abdominal fat: the fatty end of the same field, inside the rib cage only.
  _fill(hu, tissue, (rb < r_cavity - 0.05) & (soft > 1.0), np.float32(-90) + 10 * soft,
        TISSUE["fat"])

  # Lungs fill the upper part of the field: their height follows the chest's width (a chest is
  # about as tall as wide) within 65-90% of the field, so below them lies some upper abdomen.
  height = float(np.clip(rng.uniform(0.9, 1.25) * 2 * ax_b, 1.3 * half[2], 1.8 * half[2]))
  z_apex = half[2] - rng.uniform(0.02, 0.10) * 2 * half[2]
  z_base = z_apex - height  # Lowest point of the diaphragm (posterior recess), mm.
  z_taper = z_apex - rng.uniform(0.30, 0.45) * height
  wobble = smooth_field(rng, g.shape, (14, 14, 10)) * np.float32(rng.uniform(0.05, 0.10))
  heart_c = np.array([rng.uniform(-0.25, -0.08) * ax_b, cy_b + rng.uniform(0.05, 0.25) * ay_b,
                      z_base + rng.uniform(0.25, 0.40) * height])
  heart_r = np.array([rng.uniform(0.26, 0.33) * ax_b, rng.uniform(0.36, 0.45) * ay_b,
                      rng.uniform(0.30, 0.40) * height])
  heart = (((g.x - heart_c[0]) / heart_r[0]) ** 2 + ((g.y - heart_c[1]) / heart_r[1]) ** 2
           + ((g.z - heart_c[2]) / heart_r[2]) ** 2) < 1
  med_half = rng.uniform(0.06, 0.10) * ax_b
  spine_c = np.array([0.0, cy_b - rng.uniform(0.50, 0.60) * ay_b])
  spine_r = rng.uniform(0.12, 0.16) * ax_b
  rs = np.sqrt((g.x - spine_c[0]) ** 2 + (g.y - spine_c[1]) ** 2) / spine_r  # (X, Y, 1)
  canal_y = spine_c[1] - 1.55 * spine_r  # Spinal canal, behind the vertebral body.
  rc = np.sqrt((g.x - spine_c[0]) ** 2 + (g.y - canal_y) ** 2) / spine_r
  apex = np.clip(1 - ((g.z - z_taper) / (z_apex - z_taper)) ** 2, 1e-4, None)
  apex = np.where(g.z > z_taper, apex, 1).astype(np.float32)  # Squared radius scale, (1, 1, Z).
  lung = np.zeros(g.shape, bool)
  lungs = []
  for side in (1, -1):  # +x = patient right (larger lung), -x = left (heart side).
    size = 1.0 if side > 0 else rng.uniform(0.88, 0.97)
    cx = side * rng.uniform(0.44, 0.50) * ax_b
    cy = cy_b + rng.uniform(-0.08, 0.02) * ay_b
    lax = size * rng.uniform(0.42, 0.48) * ax_b
    lay = size * rng.uniform(0.72, 0.82) * ay_b
    r2d = ((g.x - cx) / lax) ** 2 + ((g.y - cy) / lay) ** 2  # (X, Y, 1)
    dome = rng.uniform(0.15, 0.30) * height
    z_dia = z_base + dome * (1 - np.clip(r2d, 0, 1))  # Dome: highest at the lung's centre.
    # Clear of the mediastinum, the rib cage, the vertebral body and the neural arch.
    in_plane = ((side * g.x > med_half) & (r2d < 1.3) & (rb < r_cavity) & (rs > 1.25)
                & (rc > 1.1))
    lung |= (r2d / apex + wobble < 1) & (g.z > z_dia) & (g.z < z_apex) & in_plane
    lungs.append(dict(side=side, c=np.array([cx, cy]), r=np.array([lax, lay]),
                      z=(z_base + dome, z_apex)))
  lung &= ~heart
  _fill(hu, tissue, heart & (rb < r_cavity), hu_soft, TISSUE["soft_tissue"])

  # Lung parenchyma: base density, denser posteriorly (gravity-dependent), smooth texture.
  gradient = rng.uniform(30, 80) * (1 - (g.y - g.y.min()) / (g.y.max() - g.y.min()))
  parenchyma = (smooth_field(rng, g.shape, (2.5, 2.5, 2.0)) * np.float32(rng.uniform(12, 25))
                + smooth_field(rng, g.shape, (8, 8, 5)) * np.float32(rng.uniform(8, 20)))
  parenchyma += np.float32(rng.uniform(-870, -790)) + gradient
  _fill(hu, tissue, lung, parenchyma, TISSUE["lung"])

  # Spine: vertebral bodies (cortical rim, cancellous core) with discs every ~20 mm; behind
  # each body the neural arch around the spinal canal, and the spinous process.
  disc_period = rng.uniform(18, 26)
  disc = np.abs(((g.z - rng.uniform(0, disc_period)) / disc_period) % 1 - 0.5) > 0.42  # (1,1,Z)
  cortex, cancellous = np.float32(rng.uniform(700, 950)), np.float32(rng.uniform(320, 420))
  bone = TISSUE["bone"]
  _fill(hu, tissue, (rs < 1) & ~disc, np.where(rs > 0.8, cortex, cancellous), bone)
  _fill(hu, tissue, (rs < 1) & disc, np.float32(80), TISSUE["soft_tissue"])
  _fill(hu, tissue, (rc > 0.5) & (rc < 0.85), cortex, bone)
  _fill(hu, tissue, rc <= 0.5, np.float32(10), TISSUE["soft_tissue"])  # CSF in the canal.
  spinous = ((np.abs(g.x - spine_c[0]) < 0.25 * spine_r) & (g.y < canal_y - 0.8 * spine_r)
             & (g.y > canal_y - 2.0 * spine_r) & (rb < 1 - t_fat))
  _fill(hu, tissue, spinous, np.float32(rng.uniform(450, 700)), bone)
  # Ribs: oval cross-sections in the muscle shell, sloping down anteriorly, one every ~15 mm.
  rib_period = rng.uniform(13, 19)
  rib_h = rng.uniform(4.0, 6.5)  # Cranio-caudal height of a rib, mm.
  rib_slope = rng.uniform(0.5, 0.9)  # mm of z per mm of y (anterior ends lower).
  rib_t = t_muscle * rng.uniform(0.6, 0.85)
  rib_mid = r_cavity + rib_t / 2
  dr = (rb - rib_mid) / (rib_t / 2)  # (X, Y, 1)
  angle = np.arctan2(g.y - cy_b, g.x)  # +pi/2 = anterior midline (sternum).
  shell = (np.abs(dr) < 1) & (np.abs(angle - np.pi / 2) > 0.35)  # (X, Y, 1)
  dz = ((g.z + rib_slope * (g.y - cy_b) - rng.uniform(0, rib_period)) / rib_period) % 1 - 0.5
  rib_e = (dz * (2 * rib_period / rib_h)) ** 2 + dr ** 2
  rib = (rib_e < 1) & shell & (g.z < z_apex + 5) & (g.z > z_base - 15)
  _fill(hu, tissue, rib, np.where(rib_e > 0.55, np.float32(rng.uniform(650, 900)),
                                  np.float32(rng.uniform(330, 450))), bone)
  sternum = ((np.abs(g.x) < 0.10 * ax_b) & (np.abs(dr) < 1) & (g.y > cy_b)
             & (g.z > z_base + 0.3 * height) & (g.z < z_apex))
  _fill(hu, tissue, sternum, np.float32(rng.uniform(350, 550)), bone)
  # Chest width relative to an ~95 mm one (128 voxels at ~0.85 mm): smaller fields of view
  # get proportionally thinner vessel trunks, so vessels do not crowd out the lung.
  scale = min(1.0, 2 * ax_b / 95.0)
  return hu, tissue, lung, lungs, dict(z_apex=z_apex, spine_c=spine_c, spine_r=spine_r,
                                       scale=scale)


def draw_airways(rng, grid: Grid, hu, tissue, lungs, info, edge):
  """Trachea down the mediastinum, splitting at the carina into a main bronchus per lung."""
  z_carina = info["z_apex"] - rng.uniform(0.40, 0.55) * (info["z_apex"] - lungs[0]["z"][0])
  y_tr = info["spine_c"][1] + info["spine_r"] * rng.uniform(1.6, 2.2)
  r_tr = rng.uniform(4.0, 6.0) * info["scale"]
  carina = np.array([0.0, y_tr, z_carina])
  segs = [Segment(np.array([0.0, y_tr, grid.z.max() + 5]), carina, r_tr, r_tr)]
  hila = []
  for lg in lungs:
    hilum = np.array([lg["c"][0] - lg["side"] * lg["r"][0] * 0.55, lg["c"][1],
                      z_carina - rng.uniform(4, 10)])
    segs.append(Segment(carina, hilum, r_tr * 0.75, r_tr * 0.55))
    hila.append(hilum)
  wall = rng.uniform(1.0, 1.8) * info["scale"]
  for seg in segs:  # Wall first (soft tissue), then the air lumen inside it.
    for r_add, value, code in ((wall, 40.0, TISSUE["soft_tissue"]),
                               (0.0, -1000.0, TISSUE["airway"])):
      out = capsule(grid, Segment(seg.p0, seg.p1, seg.r0 + r_add, seg.r1 + r_add), edge)
      if out is not None:
        sl, a = out
        paint(hu, sl, a, np.float32(value))
        tissue[sl][a > 0.5] = code
  return hila


def grow_vessels(rng, grid: Grid, lung, root, direction, radius, budget):
  """A tapering vessel tree grown from `root` (mm) inside the lung mask.

  Monopodial, like pulmonary arteries: each segment continues into a slightly thinner main branch
  and often gives off a thinner side branch. Segments are grown thickest first, so when the
  `budget` of segments runs out it is the finest vessels that are missing.
  """

  def inside(p):
    idx = grid.index(p)
    return idx is not None and lung[idx]

  segs, branch_points = [], []
  heap = [(-radius, 0, np.asarray(root, np.float64), unit(direction))]
  order = 1  # Tie-breaker, so the heap never compares arrays.
  while heap and len(segs) < budget:
    neg_r, _, p, d = heapq.heappop(heap)
    r = -neg_r
    for attempt in range(6):  # Tries at a direction whose end stays in the lung, wider each time.
      nd = unit(d + (0.15 + 0.3 * attempt) * rng.standard_normal(3))
      length = float(np.clip(r * rng.uniform(3, 6), 1.5, 10))
      q = p + nd * length
      if inside(q) and inside((p + q) / 2):
        break
    else:
      continue
    r_end = r * rng.uniform(0.93, 0.99)
    segs.append(Segment(p, q, r, r_end))
    if r_end < 0.35:
      continue
    axis = perpendicular(rng, nd)
    heapq.heappush(heap, (-r_end * rng.uniform(0.90, 0.98), order,
                          q, rotate(nd, axis, rng.uniform(0.05, 0.25))))
    if rng.uniform() < 0.85:
      branch_points.append((q, r_end, nd))
      heapq.heappush(heap, (-r_end * rng.uniform(0.5, 0.8), order + 1,
                            q, rotate(nd, axis, -rng.uniform(0.5, 1.2))))
    order += 2
  return segs, branch_points
