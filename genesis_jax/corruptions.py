"""Models Genesis corruptions as pure JAX functions of (PRNG key, array).

One sample is channels-last `(*spatial, C)`: (x, y, z, C) for cubes, (x, y, C) for 2D slices;
`corrupt_batch` takes `(N, *spatial, C)`. Intensities are in [0, 1]. Every op keeps shape and
dtype, jits, vmaps, and never leaves the device. The recipe and its default rates are the
original's (docs/method.md, "Corruptions"; the defaults live in the config schema); sizes scale
per axis from the axis length s exactly as the original's integer formulas do, so the defaults
reproduce it at 64 x 64 x 32.

Randomness. Scalars (rates, box sizes, curve controls) come from `jax.random`. Bulk randomness
(noise fields, 10,000 shuffle blocks) comes from a counter-based integer hash seeded by two words
drawn from the key: on XLA:CPU threefry costs ~20 ns per number, the hash ~1 ns and it fuses into
its consumer. Both are functions of the key alone, so results are identical on every run and
every device count.

Local shuffling without a 10,000-step loop: the original reads each block from the un-shuffled
cube and later blocks overwrite earlier ones, so a voxel shows the block with the latest time that
covers it. Blocks are i.i.d., so their index order is a uniform time order: each block writes its
index into its window with a scatter-max, and each voxel reads its winner's origin and permutation
back with one row gather. Block sizes, origins, count and overwrite order are the original's.
One difference: each block is permuted by an independent uniform permutation per axis (rows,
columns and slices shuffled; packed Fisher-Yates), a bijection of the block, instead of a uniform
draw among all n! orders, which would need a sort per block. Each voxel's source is still uniform
over its block, so the fraction changed is the original's (~78.5% at 64 x 64 x 32). Axes of 90
voxels or more (blocks over 8 per axis, e.g. nnU-Net patch sizes) draw each block's permutation by
sorting uniform keys instead of packing it, at the cost of one more gather per voxel and axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from genesis_jax import errors
from genesis_jax.config import schema, validate

TRANSFORMS = schema.TRANSFORMS
PRESETS = schema.PRESETS  # The paper's ablation groups (docs/method.md, "Ablation groups").


class CorruptionConfigError(errors.ConfigError):
  """A corruption config field names an unknown transform or an impossible rate."""


def _default(name: str):
  """A field's default: the config schema's `corruption.<name>` (one place for the recipe)."""
  return schema.default(f"corruption.{name}")


@dataclasses.dataclass(frozen=True)
class CorruptionParams:
  """Static (hashable) corruption settings; defaults are the original's (the config schema's)."""
  flip_rate: float = _default("flip_rate")
  local_rate: float = _default("local_rate")
  nonlinear_rate: float = _default("nonlinear_rate")
  paint_rate: float = _default("paint_rate")
  outpaint_rate: float = _default("outpaint_rate")  # In-painting: 1 - outpaint_rate of painted.
  local_blocks: int = _default("local_blocks")
  flip_compat: bool = _default("flip_compat")  # True: the original's flip (channel, x, y; no z).
  transforms: frozenset[str] = schema.transform_set(_default("transforms"))

  def __post_init__(self):
    object.__setattr__(self, "transforms", parse_transforms(self.transforms))
    for f in dataclasses.fields(self):
      if f.name != "transforms":
        try:
          validate.check_value(f"corruption.{f.name}", getattr(self, f.name))
        except errors.ConfigError as e:
          raise CorruptionConfigError(str(e)) from None

  @classmethod
  def from_config(cls, cfg: Any) -> CorruptionParams:
    """From `config.corruption` (a pre-training config); missing fields keep defaults."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    kw = {}
    for f in dataclasses.fields(cls):
      v = get(f.name, None)
      if v is None:
        continue
      kw[f.name] = parse_transforms(v) if f.name == "transforms" else v
    for name in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "outpaint_rate"):
      if name in kw:
        kw[name] = float(kw[name])
    if "local_blocks" in kw:
      kw["local_blocks"] = int(kw["local_blocks"])
    if "flip_compat" in kw:
      kw["flip_compat"] = bool(kw["flip_compat"])
    return cls(**kw)

  def effective_rates(self) -> dict[str, float]:
    """Rates with the transforms left out of `transforms` switched off (the ablations)."""
    t = self.transforms
    paint = self.paint_rate
    outp = self.outpaint_rate
    if "inpaint" in t and "outpaint" not in t:
      outp = 0.0
    elif "outpaint" in t and "inpaint" not in t:
      outp = 1.0
    elif not {"inpaint", "outpaint"} & t:
      paint = 0.0
    return dict(flip=self.flip_rate,
                local=self.local_rate if "local" in t else 0.0,
                nonlinear=self.nonlinear_rate if "nonlinear" in t else 0.0,
                paint=paint, outpaint=outp)


def parse_transforms(spec: str | frozenset[str] | set[str] | tuple[str, ...]) -> frozenset[str]:
  """"all"/"V", "I&II", "III&IV", "none" or a "+"-joined subset ("nonlinear+local")."""
  try:
    return schema.transform_set(spec)
  except errors.ConfigError as e:
    raise CorruptionConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Randomness: key -> seed words -> counter hash.

def _seed(key: jax.Array) -> jax.Array:
  return jax.random.bits(key, (2,), jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons): a full-avalanche 32-bit integer hash."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _hash_bits(seed: jax.Array, shape: tuple[int, ...], stream: int) -> jax.Array:
  """uint32 bits, one per element of `shape`, a function of (seed, stream, element index)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
    stride *= shape[d]
  h = _mix(idx * jnp.uint32(0x9E3779B1) + seed[0] + jnp.uint32((stream * 0x85EBCA77) & 0xFFFFFFFF))
  return _mix(h ^ seed[1])


def _hash_uniform(seed: jax.Array, shape: tuple[int, ...], stream: int) -> jax.Array:
  """float32 in [0, 1), 24 random bits each."""
  return (_hash_bits(seed, shape, stream) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _check(x: jax.Array, name: str) -> tuple[int, ...]:
  if x.ndim not in (3, 4):
    raise ValueError(f"{name}: expected one sample (x, y, C) or (x, y, z, C), got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype with intensities in [0, 1], got {x.dtype}.")
  return tuple(x.shape[:-1])


def _randint(key, lo, hi, shape=()):
  """Uniform integers in the closed range [lo, hi] (Python `random.randint`)."""
  return jax.random.randint(key, shape, lo, hi + 1)


# ----------------------------------------------------------------------------------------------
# 1. Flip.

def flip(key: jax.Array, x: jax.Array, rate: float = 0.4, compat: bool = False) -> jax.Array:
  """Up to 3 flips, each while u < rate, along a random axis; apply to input and target alike.

  Default: the axis is uniform over the spatial axes. `compat=True` is the original: uniform over
  (channel, x, y), so a third of the draws reverse the channel axis and z is never flipped.
  """
  spatial = _check(x, "flip")
  axes = (x.ndim - 1, 0, 1) if compat else tuple(range(len(spatial)))
  ku, ka = jax.random.split(key)
  go = jnp.cumprod(jax.random.uniform(ku, (3,)) < rate)  # Repeat while u < rate, at most 3.
  pick = jax.random.randint(ka, (3,), 0, len(axes))
  for i, axis in enumerate(axes):
    odd = (jnp.sum(go * (pick == i)) % 2) == 1  # Two flips along one axis cancel.
    x = jnp.where(odd, jnp.flip(x, axis), x)
  return x


# ----------------------------------------------------------------------------------------------
# 2. Local pixel shuffling.

def _block_max(s: int) -> int:
  return max(1, s // 10)  # Original: randint(1, s // 10); guard axes shorter than 10.


def _perm_codes(seed, stream: int, sizes: jax.Array, m: int) -> tuple[jax.Array, int]:
  """Per block a uniform permutation of positions [0, size) packed in one uint32, 3-4 bits each.

  Fisher-Yates on the packed fields (m - 1 swaps, all blocks at once); positions past the size stay
  fixed. Field i holds the source position of destination i.
  """
  bits = max(1, (m - 1).bit_length())
  if m * bits > 32:
    raise ValueError(f"local_shuffle: blocks up to {m} voxels along an axis (axes of 90 voxels or"
                     " more) do not pack into 32 bits; use crops under 90 voxels per axis.")
  mask = jnp.uint32((1 << bits) - 1)
  code = jnp.full(sizes.shape, sum(i << (bits * i) for i in range(m)), jnp.uint32)
  if m == 1:
    return code, bits
  u = _hash_uniform(seed, sizes.shape + (m,), stream)
  for k in range(m - 1, 0, -1):
    j = jnp.floor(u[:, k] * (k + 1)).astype(jnp.uint32)  # Uniform in 0..k.
    j = jnp.where(k < sizes, j, jnp.uint32(k))  # Past the size: no swap.
    fk = (code >> jnp.uint32(bits * k)) & mask
    fj = (code >> (j * bits)) & mask
    d = fk ^ fj
    code = code ^ (d << jnp.uint32(bits * k)) ^ (d << (j * bits))
  return code, bits


def _perm_table(seed, stream: int, sizes: jax.Array, m: int) -> jax.Array:
  """(blocks, m) int32: per block a uniform permutation of positions [0, size), positions past the
  size fixed; for blocks too long to pack (`_perm_codes`). Sorting uniform keys gives a uniform
  order; keys past the size are above every uniform, in position order, so those stay put."""
  u = _hash_uniform(seed, sizes.shape + (m,), stream)
  k = jnp.arange(m, dtype=jnp.int32)
  keys = jnp.where(k < sizes[:, None], u, 2.0 + k.astype(jnp.float32))
  return jnp.argsort(keys, axis=1).astype(jnp.int32)


def local_shuffle(key: jax.Array, x: jax.Array, num_blocks: int = 10_000) -> jax.Array:
  """Shuffle voxels inside `num_blocks` random small blocks (size per axis uniform in 1..s//10).

  Equivalent in law per voxel to the original's sequential loop (see module docstring).
  """
  spatial = _check(x, "local_shuffle")
  if num_blocks == 0:
    return x
  rank = len(spatial)
  bmax = tuple(_block_max(s) for s in spatial)
  seed = _seed(key)
  # Block b, in index order = time order (blocks are i.i.d., so index order is a uniform order).
  u = _hash_uniform(seed, (num_blocks, 2 * rank), 0)
  sizes = [1 + jnp.floor(u[:, a] * bmax[a]).astype(jnp.int32) for a in range(rank)]
  origins = [jnp.floor(u[:, rank + a] * (spatial[a] - sizes[a] + 1).astype(jnp.float32))
             .astype(jnp.int32) for a in range(rank)]
  # Owner map: the latest block covering each voxel (scatter-max of the block index into a static
  # window of the largest block; positions past a block's size hold -1). Padding keeps windows in.
  itype = jnp.int16 if num_blocks < 2 ** 15 else jnp.int32
  window = jnp.arange(num_blocks, dtype=itype).reshape((num_blocks,) + (1,) * rank)
  inside = jnp.ones((num_blocks,) + bmax, bool)
  for a in range(rank):
    shape = [1] * (rank + 1)
    shape[1 + a] = bmax[a]
    pos = jnp.arange(bmax[a], dtype=jnp.int32).reshape(shape)
    inside = inside & (pos < sizes[a].reshape((num_blocks,) + (1,) * rank))
  window = jnp.where(inside, window, jnp.array(-1, itype))
  grid = jnp.full(tuple(s + m for s, m in zip(spatial, bmax)), -1, itype)
  dnums = lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, rank + 1)),
                                      inserted_window_dims=(),
                                      scatter_dims_to_operand_dims=tuple(range(rank)))
  grid = lax.scatter_max(grid, jnp.stack(origins, axis=-1), window, dnums,
                         indices_are_sorted=False, unique_indices=False,
                         mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  owner = grid[tuple(slice(0, s) for s in spatial)].astype(jnp.int32)
  # Per block and axis an independent uniform permutation, packed with the origin into a small
  # table: one row gather per voxel.
  obits = [max(1, (n - 1).bit_length()) for n in spatial]
  if sum(obits) > 31:
    raise ValueError(f"local_shuffle: spatial shape {spatial} is too large to pack.")
  origin_word = jnp.zeros((num_blocks,), jnp.int32)
  shift = 0
  for a in range(rank):
    origin_word = origin_word | (origins[a] << shift)
    shift += obits[a]
  packed = [bmax[a] * max(1, (bmax[a] - 1).bit_length()) <= 32 for a in range(rank)]
  codes = [_perm_codes(seed, 1 + a, sizes[a], bmax[a]) if packed[a]
           else (_perm_table(seed, 1 + a, sizes[a], bmax[a]), 0) for a in range(rank)]
  table = jnp.stack([origin_word] + [lax.bitcast_convert_type(c, jnp.int32)
                                     for a, (c, _) in enumerate(codes) if packed[a]], 1)
  owner0 = jnp.maximum(owner, 0)
  rows = table.at[owner0].get(mode="promise_in_bounds")  # (*spatial, 1 + packed axes)
  column = {a: 1 + sum(packed[:a]) for a in range(rank) if packed[a]}
  src = jnp.zeros(spatial, jnp.int32)
  stride, shift = 1, sum(obits)
  for a in reversed(range(rank)):
    shift -= obits[a]
    i = lax.broadcasted_iota(jnp.int32, spatial, a)
    o = (rows[..., 0] >> shift) & ((1 << obits[a]) - 1)
    code, bits = codes[a]
    local = jnp.clip(i - o, 0, bmax[a] - 1)
    if packed[a]:
      moved = o + ((lax.bitcast_convert_type(rows[..., column[a]], jnp.uint32)
                    >> (local * bits).astype(jnp.uint32)) & ((1 << bits) - 1)).astype(jnp.int32)
    else:  # Long axis: the block's permutation from its own table, one more gather.
      moved = o + code.reshape(-1).at[owner0 * bmax[a] + local].get(mode="promise_in_bounds")
    src = src + jnp.where(owner >= 0, moved, i) * stride
    stride *= spatial[a]
  flat = x.reshape(-1, x.shape[-1])
  return flat.at[src.reshape(-1)].get(mode="promise_in_bounds").reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# 3. Non-linear intensity transform.

def _bezier(p0, p1, p2, p3, t):
  s = 1.0 - t
  return s * s * s * p0 + 3.0 * s * s * t * p1 + 3.0 * s * t * t * p2 + t * t * t * p3


def bezier_map(v: jax.Array, controls: jax.Array, increasing: jax.Array,
               iterations: int = 14) -> jax.Array:
  """The curve's y where its x equals v; controls = (x1, y1, x2, y2) in [0, 1).

  x(t) = Bezier(0, x1, x2, 1) is non-decreasing for controls in [0, 1], so t(v) is bracketed by
  bisection (14 halvings) and then interpolated linearly inside the bracket: monotone in v, within
  2e-4 of the exact map in the worst case measured (x1 = 0, x2 = 1); the original
  interpolates 100,000 samples.
  Decreasing maps use y controls (1, y2, y1, 0), the original's inversion. Values outside [0, 1]
  clamp to the ends, as `np.interp` does.
  """
  x1, y1, x2, y2 = controls[0], controls[1], controls[2], controls[3]
  v = jnp.clip(v, 0.0, 1.0)
  # x(t) = ((a t + b) t + c) t in power form for the inner loop.
  a = 1.0 + 3.0 * x1 - 3.0 * x2
  b = 3.0 * x2 - 6.0 * x1
  c = 3.0 * x1
  lo, hi = jnp.zeros_like(v), jnp.ones_like(v)
  xlo, xhi = jnp.zeros_like(v), jnp.ones_like(v)
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    xm = ((a * mid + b) * mid + c) * mid
    right = xm < v
    lo, xlo = jnp.where(right, mid, lo), jnp.where(right, xm, xlo)
    hi, xhi = jnp.where(right, hi, mid), jnp.where(right, xhi, xm)
  frac = jnp.clip((v - xlo) / jnp.maximum(xhi - xlo, 1e-30), 0.0, 1.0)
  t = lo + (hi - lo) * frac
  q0, q1, q2, q3 = (jnp.where(increasing, p, r) for p, r in
                    ((0.0, 1.0), (y1, y2), (y2, y1), (1.0, 0.0)))
  return _bezier(q0, q1, q2, q3, t)


def nonlinear(key: jax.Array, x: jax.Array) -> jax.Array:
  """Monotone cubic Bezier intensity map: increasing or (p = 0.5) decreasing, the original's."""
  _check(x, "nonlinear")
  kc, kd = jax.random.split(key)
  controls = jax.random.uniform(kc, (4,))
  increasing = jax.random.uniform(kd) >= 0.5  # Original: u < 0.5 gives the inverted map.
  y = bezier_map(x.astype(jnp.float32), controls, increasing)
  return jnp.clip(y, 0.0, 1.0).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# 4. In-painting and out-painting.

def _margin_origin(key, s: int, b: jax.Array) -> jax.Array:
  """Origin uniform in {3 .. s - b - 3}; the margin shrinks on axes too short for 3."""
  m = jnp.minimum(3, (s - b) // 2)
  return jnp.floor(jax.random.uniform(key) * (s - b - 2 * m + 1)).astype(jnp.int32) + m


def _box_mask(spatial, origin, size) -> jax.Array:
  mask = jnp.ones(spatial, bool)
  for a, s in enumerate(spatial):
    i = lax.broadcasted_iota(jnp.int32, spatial, a)
    mask = mask & (i >= origin[a]) & (i < origin[a] + size[a])
  return mask


def _boxes(key, spatial, first_always: bool, extra: int, draw_size):
  """Union mask of 1 + `extra` boxes (first optional); each extra continues with p = 0.95."""
  keys = jax.random.split(key, 2 + extra)
  more = jax.random.uniform(keys[0], (1 + extra,)) < 0.95
  if first_always:
    more = more.at[0].set(True)
  go = jnp.cumprod(more.astype(jnp.int32))
  mask = jnp.zeros(spatial, bool)
  for i in range(1 + extra):
    ks = jax.random.split(keys[1 + i], 2 * len(spatial))
    size = [draw_size(ks[a], s) for a, s in enumerate(spatial)]
    origin = [_margin_origin(ks[len(spatial) + a], s, size[a]) for a, s in enumerate(spatial)]
    mask = mask | (_box_mask(spatial, origin, size) & (go[i] > 0))
  return mask


def _inpaint_size(key, s):
  return _randint(key, max(1, s // 6), max(1, s // 3))


def _outpaint_size(key, s):
  return jnp.clip(s - _randint(key, 3 * s // 7, 4 * s // 7), 1, s)


def inpaint_mask(key: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  """Up to 5 holes (continue before each with p = 0.95), size per axis uniform s//6..s//3."""
  return _boxes(key, spatial, first_always=False, extra=4, draw_size=_inpaint_size)


def outpaint_mask(key: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  """Kept region: one box of s - U{3s//7..4s//7} per axis, plus up to 4 more (p = 0.95 each)."""
  return _boxes(key, spatial, first_always=True, extra=4, draw_size=_outpaint_size)


def _noise(key, x):
  return _hash_uniform(_seed(key), x.shape, 0).astype(x.dtype)


def inpaint(key: jax.Array, x: jax.Array) -> jax.Array:
  """Fill up to 5 random boxes with U[0, 1) noise (~5.6% of voxels at the defaults)."""
  spatial = _check(x, "inpaint")
  km, kn = jax.random.split(key)
  return jnp.where(inpaint_mask(km, spatial)[..., None], _noise(kn, x), x)


def outpaint(key: jax.Array, x: jax.Array) -> jax.Array:
  """Replace all but up to 5 random boxes with U[0, 1) noise (~32% kept at the defaults)."""
  spatial = _check(x, "outpaint")
  km, kn = jax.random.split(key)
  return jnp.where(outpaint_mask(km, spatial)[..., None], x, _noise(kn, x))


# ----------------------------------------------------------------------------------------------
# The pipeline.

def corrupt(key: jax.Array, x: jax.Array, params: CorruptionParams = CorruptionParams()
            ) -> tuple[jax.Array, jax.Array]:
  """One sample (*spatial, C) -> (input, target): flip both, then shuffle, Bezier, paint the input.

  Under vmap each `lax.cond` becomes a select: both branches run for every sample.
  """
  spatial = _check(x, "corrupt")
  r = params.effective_rates()
  k_flip, k_local, k_nl, k_paint, k_u = jax.random.split(key, 5)
  u = jax.random.uniform(k_u, (4,))
  target = flip(k_flip, x, r["flip"], params.flip_compat)
  y = target
  if r["local"] > 0 and params.local_blocks > 0:
    y = lax.cond(u[0] < r["local"], lambda v: local_shuffle(k_local, v, params.local_blocks),
                 lambda v: v, y)
  if r["nonlinear"] > 0:
    y = lax.cond(u[1] < r["nonlinear"], lambda v: nonlinear(k_nl, v), lambda v: v, y)
  if r["paint"] > 0:
    km, kn = jax.random.split(k_paint)
    outp = u[3] >= 1.0 - r["outpaint"]  # Original: in-painting if u < inpaint_rate.
    keep = jnp.where(outp, outpaint_mask(km, spatial), ~inpaint_mask(km, spatial))
    keep = keep | (u[2] >= r["paint"])
    y = jnp.where(keep[..., None], y, _noise(kn, y))
  return y, target


def corrupt_batch(key: jax.Array, x: jax.Array, params: CorruptionParams = CorruptionParams()
                  ) -> tuple[jax.Array, jax.Array]:
  """(N, *spatial, C) -> (inputs, targets): `corrupt` over `jax.random.split(key, N)`.

  The value is `vmap(corrupt)`. On an unsharded CPU batch it runs as `lax.map` instead: there
  each `lax.cond` really skips (vmap turns it into a select that runs both branches) and the
  shuffle's scatter is unbatched, together ~3x faster on XLA:CPU.
  """
  if x.ndim not in (4, 5):
    raise ValueError(f"corrupt_batch: expected (N, x, y, C) or (N, x, y, z, C), got {x.shape}.")
  keys = jax.random.split(key, x.shape[0])
  one = lambda k, v: corrupt(k, v, params)
  # Under explicit sharding (jax.make_mesh's default) vmap needs keys split like the batch.
  typeof = getattr(jax, "typeof", None)  # jax >= 0.6; older versions have no explicit sharding.
  sharding = getattr(typeof(x), "sharding", None) if typeof else None
  spec = getattr(sharding, "spec", None)
  if spec and spec[0] is not None:
    keys = jax.sharding.reshard(
        keys, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0])))
  elif jax.default_backend() == "cpu":
    return lax.map(lambda kv: one(*kv), (keys, x))
  return jax.vmap(one)(keys, x)
