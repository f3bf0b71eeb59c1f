"""The array functions behind the Genesis U-Net's layers, written so that XLA runs them fast.

All arrays are channels-last: (N, x, y, z, C) for 3D and (N, x, y, C) for 2D. Every formulation
here computes exactly the same function as the textbook op (up to float rounding); they differ
only in how XLA sees the computation. `layers.py` wraps them in Flax modules.

* Convs: `conv_native` (`lax.conv_general_dilated`: cuDNN's 3D convs on a GPU, the TPU's) or
  `conv_unfold_3d`: 2D 3x3 convs over (y, z) with x folded into the batch, which XLA:CPU runs
  through Eigen much faster than 3D ones (docs/method.md#cpu-formulations). The x taps are
  combined by Winograd's F(4, 3) or F(2, 3) along x (`conv_winograd_x`: m + 2 2D convs at 1/m of
  the x resolution, 1/2 or 2/3 of the multiply-adds) when x allows and the conv is large enough
  (`winograd_tile`), else by stacking x-shifted copies on channels. The Winograd transforms and
  the x shifts carry hand-written gradients (their transposes), and `_in_memory` is the
  `lax.cond` fusion barrier that keeps XLA:CPU from recomputing them inside each consumer.
* `conv_space_to_depth`: a strided conv as space-to-depth + a stride-1 conv (the mirror of the
  next item), for the same reason: XLA:CPU's gradient of a strided conv is very slow.
* `upconv_depth_to_space`: the 2x2x2 stride-2 transposed conv as one matmul followed by a
  depth-to-space reshape. XLA's gradient of a strided `conv_transpose` is very slow (CPU and
  CUDA); the matmul's is not. Kernels are in flax `nn.ConvTranspose` layout (spatially flipped,
  docs/method.md#layout-conversion).
* `max_pool` (reshape + max, whose gradient avoids `select_and_scatter`), `upsample_nearest`.
* `add_channel_bias` and `batch_norm_train`: float32 channel statistics (channel sums as
  matrix-vector products on CPU) and hand-written gradients (two channel sums, one fused pass).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from genesis_jax import errors
from genesis_jax.config import schema

# "unfold:N" is "unfold" with the Winograd tile along x fixed (0 = none, 2 = F(2, 3),
# 4 = F(4, 3)) instead of chosen by `winograd_tile` from the dtype and backend. The schema is the
# one list of them.
CONV_IMPLS = schema.CONV_IMPLS

# `model.winograd_min_macs`: convs with fewer multiply-adds than this (as a direct 3x3x3 conv over
# the whole batch) skip Winograd. Its extra ops cost XLA:CPU compile time and, on tiny layers, run
# time, while mid-sized layers already gain; 1e8 is about a millisecond of conv on a 2-core CPU.
# 0 uses Winograd wherever it applies, inf nowhere. The default is the schema's.
DEFAULT_WINOGRAD_MIN_MACS = schema.default("model.winograd_min_macs")


def check_winograd_min_macs(value: Any) -> float:
  """`model.winograd_min_macs` as a float; ConfigError unless it is a number >= 0 (inf allowed)."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not number >= 0:  # also rejects NaN
    raise errors.ConfigError(
        f"model.winograd_min_macs must be a number >= 0 (0 = Winograd wherever it applies, inf = "
        f"never), got {value!r}; the default is {DEFAULT_WINOGRAD_MIN_MACS:g}.")
  return number


def check_conv_impl(conv_impl: str) -> None:
  """Raises ConfigError unless `conv_impl` is one of CONV_IMPLS (`model.conv_impl`)."""
  if conv_impl not in CONV_IMPLS:
    raise errors.ConfigError(
        f"model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}; auto lets the "
        f"backend choose.")


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """"auto" -> "unfold" on CPU and GPU, "native" elsewhere (TPU: not measured).

  The unfold convs were measured faster than the backend's 3D convs for the full-width train
  step on both a CPU (Eigen's 2D convs against XLA:CPU's 3D ones) and an H200 (Winograd F(2, 3)
  along x against cuDNN's 3D convs), in float32/TF32 and bfloat16; figures in bench/RESULTS.md.
  """
  check_conv_impl(conv_impl)
  if conv_impl == "auto":
    backend = backend or jax.default_backend()
    return "unfold" if backend in ("cpu", "gpu", "cuda", "rocm") else "native"
  return conv_impl


def conv_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' stride-1 conv; kernel (*k, C_in, C_out), x (N, *spatial, C_in)."""
  nd = x.ndim - 2
  spatial = "DHW"[-nd:] if nd <= 3 else None
  dn = lax.conv_dimension_numbers(
      x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return lax.conv_general_dilated(x, kernel, (1,) * nd, "SAME", dimension_numbers=dn)


def conv_unfold_3d(x: jax.Array, kernel: jax.Array, tile: int | None = None,
                   min_macs: float = DEFAULT_WINOGRAD_MIN_MACS) -> jax.Array:
  """Exact 3x3x3 'SAME' conv as 2D 3x3 convs over (y, z), x folded into the batch.

  Even x: `conv_winograd_x` with the tile of `winograd_tile` (`tile` fixes it: 0 = none, 2, 4;
  rounded down to what x allows; none below `min_macs`). Otherwise one 2D conv with the
  kernel's x taps on whichever channel side is narrower, so the 2D conv's matmul is as wide as
  possible and the replicated tensor as small as possible:
  * C_in <= C_out, input side: the three x-shifted copies of x (N, X, Y, Z, C), zero at the
    border, are stacked on channels (index kx*C + c); (N*X, Y, Z, 3C) is convolved with the
    kernel regrouped to (ky, kz, kx*C + c, O).
  * C_in > C_out, output side: (N*X, Y, Z, C) is convolved with the kernel regrouped to
    (ky, kz, C, kx*O), giving every x tap's contribution separately; output x sums tap i of input
    x + i - 1 (shift and add). For the decoder's 192->64 conv this ran faster on XLA:CPU than
    stacking the wider input.
  Folding x into the batch is a free reshape (x is the leading spatial axis).
  """
  n, sx, sy, sz, c = x.shape
  kx, ky, kz, _, o = kernel.shape
  macs = n * sx * sy * sz * c * o * kx * ky * kz
  tile = winograd_tile(sx, x.dtype, macs, tile=tile, min_macs=min_macs) if kx == 3 else 0
  if tile:
    return conv_winograd_x(x, kernel, tile)
  pred = _runtime_true(kernel)
  if c > o:
    k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(ky, kz, c, kx * o)
    taps = conv_native(x.reshape(n * sx, sy, sz, c), k2).reshape(n, sx, sy, sz, kx, o)
    return sum_x_shifts(taps, pred, 1)
  stacked = stack_x_shifts(x, pred, kx, 1)  # [..., i, c] = x[:, x + i - kx // 2]
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(ky, kz, kx * c, o)
  y = conv_native(stacked.reshape(n * sx, sy, sz, kx * c), k2)
  return y.reshape(n, sx, sy, sz, o)


# Winograd minimal filtering F(m, 3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
# Networks"): m outputs of a 3-tap filter g from a = m + 2 inputs d with a products,
# y = AT @ ((G @ g) * (BT @ d)). Rows are exact in binary floating point except G's 1/6, 1/12, 1/24.
WINOGRAD = {
    2: dict(BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            G=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
            AT=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: dict(BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
                (0, 1, -1, 8, -8, 1))),
}


def winograd_tile(sx: int, dtype: Any, macs: float = math.inf, backend: str | None = None,
                  tile: int | None = None,
                  min_macs: float = DEFAULT_WINOGRAD_MIN_MACS) -> int:
  """The Winograd tile along x the unfold conv uses: 4 for full float32 when 4 | x, 2 when 2 | x.

  F(4, 3) has 1.5 products per output against F(2, 3)'s 2 and a direct conv's 3, at the price of
  larger transform coefficients and so a larger rounding error; with fewer mantissa bits
  (bfloat16, float16) only F(2, 3), whose transforms are additions and halvings. The same holds
  for float32 convs that run as TF32 (10 mantissa bits), XLA's default on recent GPUs, where
  F(4, 3)'s error grows well past the direct conv's and F(2, 3)'s stays close to it (emulated in
  bench/winograd_error.py). So F(4, 3) needs float32 on the CPU, or
  `jax_default_matmul_precision` "highest" (or "float32") elsewhere.

  0 (no Winograd) for odd x, and for convs of fewer than `min_macs` multiply-adds (`macs`, as a
  direct conv over the whole batch; `model.winograd_min_macs`, see DEFAULT_WINOGRAD_MIN_MACS).
  `tile` (conv_impl "unfold:N") fixes the choice, e.g. to trade TF32 accuracy for speed; it is
  rounded down to what x allows.
  """
  if macs < min_macs or sx % 2:
    return 0
  if tile not in (None, 0, 2, 4):
    raise ValueError(f"Winograd tile must be 0, 2 or 4, got {tile!r}.")
  if tile is not None:
    return 4 if tile == 4 and sx % 4 == 0 else min(tile, 2)
  backend = backend or jax.default_backend()
  full_f32 = jnp.dtype(dtype) == jnp.float32 and (
      backend == "cpu" or jax.config.jax_default_matmul_precision in ("highest", "float32"))
  return 4 if full_f32 and sx % 4 == 0 else 2


def _combine(coeffs, arrays):
  """sum_i coeffs[i] * arrays[i], skipping zeros, +-1 as additions."""
  out = None
  for c, a in zip(coeffs, arrays):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else a * jnp.asarray(c, a.dtype)
    out = term if out is None else out + term
  return out


def conv_winograd_x(x: jax.Array, kernel: jax.Array, m: int) -> jax.Array:
  """Exact 3x3x3 'SAME' conv with Winograd's F(m, 3) along x, m = 2 or 4.

  Output x tile (mp .. mp + m - 1) reads d_j = x[mp - 1 + j], j = 0..m+1, through the kernel's x
  taps g_0..g_2 (each a 3x3 kernel over (y, z)): with * a 2D 'SAME' conv over (y, z), x folded
  into the batch at 1/m resolution, t_i = (BT d)_i, u_i = (G g)_i, y[mp + r] = (AT (t * u))_r.
  m + 2 2D convs at 1/m of the x resolution instead of 3 at full resolution (2/3 of the
  multiply-adds for m = 2, 1/2 for m = 4); the same function as the textbook conv, rounded
  differently (see `winograd_tile`).
  """
  n, sx, sy, sz, c = x.shape
  o = kernel.shape[-1]
  k = kernel.astype(jnp.float32)  # transformed in float32, rounded once to the compute dtype
  us = [_combine(row, (k[0], k[1], k[2])).astype(kernel.dtype) for row in WINOGRAD[m]["G"]]
  pred = _runtime_true(kernel)
  ts = winograd_in(x, pred, m)
  ms = [conv_native(t.reshape(n * sx // m, sy, sz, c), u).reshape(n, sx // m, sy, sz, o)
        for t, u in zip(ts, us)]
  return winograd_out(pred, m, *ms)


def _runtime_true(kernel: jax.Array) -> jax.Array:
  """A boolean computed at run time (never constant-folded), for `_in_memory`'s conditional.

  Read from the kernel, which is replicated, so no device has to ask another for it. False when
  that element is NaN, which does not matter: both branches of `_in_memory` are the same.
  """
  first = kernel.reshape(-1)[0]
  return first == first


def _in_memory(fn, pred: jax.Array, *args):
  """fn(*args), computed into memory once however many ops read it (XLA:CPU).

  XLA:CPU fuses a cheap elementwise producer into each of its consumers and recomputes it there
  (it drops `optimization_barrier`); fused into the layout transposes of the kernel-gradient
  convs, the strided Winograd transforms ran several times slower than a plain transpose. It does
  not fuse across a conditional. Both branches are fn, so the value is fn(*args) whichever way the
  runtime `pred` goes; a runtime predicate keeps the conditional from being folded away.
  """
  if jax.default_backend() != "cpu":
    return fn(*args)
  return lax.cond(pred, fn, fn, *args)


def _tiles(a: jax.Array, m: int) -> list[jax.Array]:
  """[a[:, r::m] for r < m] along axis 1, by reshape."""
  t = a.reshape(a.shape[0], a.shape[1] // m, m, *a.shape[2:])
  return [t[:, :, r] for r in range(m)]


def _untiles(parts: list[jax.Array]) -> jax.Array:
  """Inverse of `_tiles`: interleave the parts along axis 1."""
  t = jnp.stack(parts, axis=2)
  return t.reshape(t.shape[0], -1, *t.shape[3:])


# The Winograd input and output transforms with hand-written gradients (their transposes), for
# the same reason as the x-shift pair below: autodiff's pads and slices were fused into the
# kernel-gradient transposes and re-evaluated there.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_in(x: jax.Array, pred: jax.Array, m: int) -> tuple[jax.Array, ...]:
  """t_i = sum_j BT[i, j] d_j at every tile p, d_j = x[mp - 1 + j] (zero outside)."""
  def transform(x):
    q = _tiles(x, m)  # d_0 = q_{m-1}[p - 1], d_{1+r} = q_r[p], d_{m+1} = q_0[p + 1]
    d = [_shift_x(q[m - 1], -1), *q, _shift_x(q[0], 1)]
    return tuple(_combine(row, d) for row in WINOGRAD[m]["BT"])
  return _in_memory(transform, pred, x)


def _winograd_in_fwd(x, pred, m):
  return winograd_in(x, pred, m), pred


def _winograd_in_bwd(m, pred, g):
  bt = WINOGRAD[m]["BT"]
  dd = [_combine([row[j] for row in bt], g) for j in range(m + 2)]
  q = dd[1:m + 1]
  q[m - 1] = q[m - 1] + _shift_x(dd[0], 1)
  q[0] = q[0] + _shift_x(dd[m + 1], -1)
  return _untiles(q), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def winograd_out(pred: jax.Array, m: int, *ms: jax.Array) -> jax.Array:
  """y[mp + r] = sum_i AT[r, i] ms_i[p]."""
  del pred
  return _untiles([_combine(row, ms) for row in WINOGRAD[m]["AT"]])


def _winograd_out_fwd(pred, m, *ms):
  return winograd_out(pred, m, *ms), pred


def _winograd_out_bwd(m, pred, g):
  at = WINOGRAD[m]["AT"]
  def transform(g):
    q = _tiles(g, m)
    return tuple(_combine([row[i] for row in at], q) for i in range(m + 2))
  return (None, *_in_memory(transform, pred, g))


winograd_in.defvjp(_winograd_in_fwd, _winograd_in_bwd)
winograd_out.defvjp(_winograd_out_fwd, _winograd_out_bwd)


def _shift_x(a: jax.Array, s: int) -> jax.Array:
  """b[:, x] = a[:, x + s] along axis 1, zero where x + s falls outside."""
  if s == 0:
    return a
  sx = a.shape[1]
  zeros = jnp.zeros(a.shape[:1] + (abs(s),) + a.shape[2:], a.dtype)
  if s > 0:
    return jnp.concatenate([a[:, s:], zeros], axis=1)
  return jnp.concatenate([zeros, a[:, :sx + s]], axis=1)


# The x-shift steps of the unfold convs, as an adjoint pair with hand-written gradients. Autodiff
# of pad-slice-concatenate (or slice-add) gives one full-size padded tensor per tap plus their
# sum, and XLA:CPU re-evaluated the upstream BN/ReLU gradient chain inside each of them (a large
# share of the U-Net step); these gradients are one op that reads the cotangent kx times. The
# stack runs inside `_in_memory`, so its input is computed once into memory, not once per shift.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def stack_x_shifts(a: jax.Array, pred: jax.Array, kx: int, sign: int) -> jax.Array:
  """t[..., i, :] = shift(a, sign * (i - kx // 2)): (n, X, ..., C) -> (n, X, ..., kx, C)."""
  def stack(a):
    t = jnp.concatenate([_shift_x(a, sign * (i - kx // 2)) for i in range(kx)], axis=-1)
    return t.reshape(*a.shape[:-1], kx, a.shape[-1])
  return _in_memory(stack, pred, a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def sum_x_shifts(t: jax.Array, pred: jax.Array, sign: int) -> jax.Array:
  """sum_i shift(t[..., i, :], sign * (i - kx // 2)): (n, X, ..., kx, C) -> (n, X, ..., C)."""
  del pred
  kx = t.shape[-2]
  return sum(_shift_x(t[..., i, :], sign * (i - kx // 2)) for i in range(kx))


def _stack_fwd(a, pred, kx, sign):
  return stack_x_shifts(a, pred, kx, sign), pred


def _stack_bwd(kx, sign, pred, g):
  return sum_x_shifts(g, pred, -sign), None


def _sum_fwd(t, pred, sign):
  return sum_x_shifts(t, pred, sign), (pred, t.shape[-2])


def _sum_bwd(sign, res, g):
  pred, kx = res
  return stack_x_shifts(g, pred, kx, -sign), None


stack_x_shifts.defvjp(_stack_fwd, _stack_bwd)
sum_x_shifts.defvjp(_sum_fwd, _sum_bwd)


def upconv_depth_to_space(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed conv with kernel 2 and stride 2, no padding, as matmul + depth-to-space.

  kernel is in flax `nn.ConvTranspose` layout (2, .., 2, C_in, C_out) with transpose_kernel=False,
  i.e. spatially flipped relative to PyTorch: out[2p + i] = x[p] @ kernel[1 - i] per axis.
  """
  nd = x.ndim - 2
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  o = kernel.shape[-1]
  w = kernel[(slice(None, None, -1),) * nd]  # un-flip: w[i] multiplies into out[2p + i]
  w = jnp.moveaxis(w, -2, 0).reshape(c, (2 ** nd) * o)
  y = (x.reshape(-1, c) @ w).reshape(n, *spatial, *(2,) * nd, o)
  # (n, p1.., pd, i1.., id, o) -> (n, p1, i1, .., pd, id, o)
  perm = [0] + [a for d in range(nd) for a in (1 + d, 1 + nd + d)] + [1 + 2 * nd]
  return jnp.transpose(y, perm).reshape(n, *(2 * s for s in spatial), o)


def conv_space_to_depth(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """Strided conv (zero padding (lo, hi) per axis) as space-to-depth + a stride-1 conv.

  Per axis (stride s, k taps): output o reads input s*o + t - lo = s*(o + q) + r, 0 <= r < s. Each
  run of s input voxels moves onto channels (index (r.., c)); the kernel (*k, C_in, C_out), zero-
  padded along each axis and split as (q, r), becomes a stride-1 kernel over q. Same values as
  `lax.conv_general_dilated` with strides; XLA's gradient of a strided conv (an lhs-dilated conv)
  is very slow on CPU, the stride-1 conv's is not. 2D or 3D.
  """
  nd = x.ndim - 2
  xs, kpad, cpad, outer, inner = [x.shape[0]], [], [], [], []
  for size, k, s, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:nd], strides, padding):
    q_min, q_max = -lo // s, (k - 1 - lo) // s
    taps, shift, m = q_max - q_min + 1, s * q_min + lo, -(-size // s)
    kpad.append((-shift, s * taps - k + shift))  # kernel index s*q' + r = t - shift
    cpad.append((-q_min, (size + lo + hi - k) // s + taps - m + q_min))
    xs += [m, s]
    outer.append(taps)
    inner.append(s)
  x = jnp.pad(x, [(0, 0)] + [(0, m * s - n) for m, s, n in zip(xs[1::2], xs[2::2], x.shape[1:-1])]
              + [(0, 0)])
  c, o = x.shape[-1], kernel.shape[-1]
  x = x.reshape(*xs, c).transpose(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
  x = x.reshape(*x.shape[:nd + 1], -1)
  k = jnp.pad(kernel, kpad + [(0, 0), (0, 0)])
  k = k.reshape(*[a for t, s in zip(outer, inner) for a in (t, s)], c, o)
  k = k.transpose(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2), 2 * nd, 2 * nd + 1)
  k = k.reshape(*outer, -1, o)
  if nd != 3:
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_general_dilated(x, k, (1,) * nd, cpad, dimension_numbers=dn)
  # 3D: x folded into the batch, 2D convs over (y, z) give every x tap's output (as
  # `conv_unfold_3d`'s output side); output x sums tap i of q-row x + i - lo.
  n, mx, (lo, hi), kx = x.shape[0], x.shape[1], cpad[0], outer[0]
  k2 = k.transpose(1, 2, 3, 0, 4).reshape(*outer[1:], k.shape[3], kx * o)
  dn = lax.conv_dimension_numbers((1, 1, 1, 1), k2.shape, ("NHWC", "HWIO", "NHWC"))
  t = lax.conv_general_dilated(x.reshape(n * mx, *x.shape[2:]), k2, (1, 1), cpad[1:],
                               dimension_numbers=dn)
  t = jnp.pad(t.reshape(n, mx, *t.shape[1:3], kx, o), [(0, 0), (lo, max(hi, 0))] + [(0, 0)] * 4)
  return sum(t[:, i:i + mx + lo + hi - kx + 1, :, :, i] for i in range(kx))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling of every spatial axis (Keras UpSampling3D)."""
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  y = x.reshape(n, *[a for s in spatial for a in (s, 1)], c)
  y = jnp.broadcast_to(y, (n, *[a for s in spatial for a in (s, 2)], c))
  return y.reshape(n, *(2 * s for s in spatial), c)


def max_pool(x: jax.Array) -> jax.Array:
  """2x max pooling (window 2, stride 2) over every spatial axis, via reshape."""
  nd = x.ndim - 2
  n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
  y = x.reshape(n, *[a for s in spatial for a in (s // 2, 2)], c)
  return y.max(axis=tuple(2 + 2 * d for d in range(nd)))


def _channel_sums(a: jax.Array) -> jax.Array:
  """Column sums of an (M, C) float32 array.

  On CPU as a matrix-vector product: XLA:CPU splits a large reduction into reduce-window passes
  that ran slower than the BLAS-style dot (a noticeable share of the U-Net train step).
  """
  if jax.default_backend() == "cpu":
    return jnp.ones((a.shape[0],), a.dtype) @ a
  return a.sum(0)


@jax.custom_vjp
def add_channel_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x + bias over the last axis; the bias gradient is a `_channel_sums` (a dot on CPU)."""
  return x + bias.astype(x.dtype)


def _bias_forward(x, bias):
  return add_channel_bias(x, bias), bias


def _bias_backward(bias, g):
  c = g.shape[-1]
  return g, _channel_sums(g.reshape(-1, c).astype(jnp.float32)).astype(bias.dtype)


add_channel_bias.defvjp(_bias_forward, _bias_backward)


@jax.custom_vjp
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch-statistics normalisation over all axes but the last; returns (y, mean, biased var).

  The statistics are float32 whatever x's dtype. The custom gradient is the textbook one, written
  as two channel sums and one fused elementwise pass instead of what autodiff derives.
  """
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
  c = x.shape[-1]
  m = x.size // c
  xf = x.reshape(m, c).astype(jnp.float32)
  mean = _channel_sums(xf) / m
  var = jnp.maximum(_channel_sums(xf * xf) / m - mean * mean, 0.0)
  rstd = lax.rsqrt(var + epsilon)
  mul = scale * rstd
  add = bias - mean * mul
  y = x * mul.astype(x.dtype) + add.astype(x.dtype)
  return (y, mean, var), (x, scale, mean, rstd, epsilon)


def _bn_backward(res, cotangents):
  x, scale, mean, rstd, epsilon = res
  gy, gmean, gvar = cotangents
  c = x.shape[-1]
  m = x.size // c
  g = gy.reshape(m, c).astype(jnp.float32)
  xf = x.reshape(m, c).astype(jnp.float32)
  sum_g = _channel_sums(g)
  sum_gxhat = (_channel_sums(g * xf) - mean * sum_g) * rstd
  # dx = scale*rstd*(g - sum_g/m - xhat*sum_gxhat/m) + gmean/m + 2*gvar*(x - mean)/m, as
  # g*a + x*b + c0 with per-channel a, b, c0.
  a = scale * rstd
  b = -a * rstd * sum_gxhat / m + 2.0 * gvar / m
  c0 = -a * sum_g / m - b * mean + gmean / m
  dx = g * a + xf * b + c0
  return dx.reshape(x.shape).astype(x.dtype), sum_gxhat, sum_g, None


batch_norm_train.defvjp(_bn_forward, _bn_backward)
