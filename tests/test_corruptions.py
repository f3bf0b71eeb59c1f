"""Corruption ops: contracts (shape, dtype, range, determinism) and the original's statistics.

The statistical facts are the original's at 64x64x32 (docs/method.md#corruptions); tolerances are
several standard
errors of the number of draws used, so a wrong rate or size formula fails.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genesis_jax import corruptions as C

CUBE = (64, 64, 32)


def _rand(shape, seed=0, dtype=jnp.float32):
  return jax.random.uniform(jax.random.key(seed), shape).astype(dtype)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


OPS = {
    "flip": lambda k, x: C.flip(k, x, 1.0),
    "local_shuffle": lambda k, x: C.local_shuffle(k, x, 500),
    "nonlinear": C.nonlinear,
    "inpaint": C.inpaint,
    "outpaint": C.outpaint,
    "corrupt_input": lambda k, x: C.corrupt(k, x)[0],
}


@functools.lru_cache(maxsize=None)
def _jit(name):
  return jax.jit(OPS[name])


@pytest.mark.parametrize("name", list(OPS))
def test_op_contract_shape_dtype_range_determinism(name):
  x = _rand((20, 24, 12, 2))
  f = _jit(name)
  y = f(jax.random.key(3), x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  np.testing.assert_array_equal(np.asarray(y), np.asarray(f(jax.random.key(3), x)))
  outs = [np.asarray(f(jax.random.key(s), x)) for s in range(4, 10)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_flip_default_uses_all_spatial_axes_and_compat_reproduces_the_bug():
  x = _rand((6, 6, 6, 2))
  once = functools.partial(C.flip, rate=0.4)  # Single flips are common at this rate.
  seen, seen_compat = set(), set()
  for compat, out in ((False, seen), (True, seen_compat)):
    ys = np.asarray(jax.jit(jax.vmap(lambda k: once(k, x, compat=compat)))(_keys(100)))
    for y in ys:
      out.update(a for a in range(4) if np.array_equal(y, np.flip(np.asarray(x), a)))
  f = jax.jit(lambda k: C.flip(k, x, 0.0))
  np.testing.assert_array_equal(np.asarray(f(jax.random.key(0))), np.asarray(x))
  assert seen == {0, 1, 2}  # z flips too, channels never.
  assert seen_compat == {0, 1, 3}  # x, y and the channel axis; z never.


def test_flip_rate_matches_repeat_while_u_below_rate():
  # P(net identity) = P(0 flips) + P(2 flips on one axis) = 0.6 + 0.4*0.4*0.6/3 with 3 axes.
  x = _rand((4, 4, 4, 1))
  ys = jax.jit(jax.vmap(lambda k: C.flip(k, x, 0.4)))(_keys(2000))
  same = np.mean(np.all(np.asarray(ys) == np.asarray(x)[None], axis=(1, 2, 3, 4)))
  assert abs(same - (0.6 + 0.096 / 3)) < 0.035


def test_local_shuffle_changes_78_percent_and_keeps_values_local():
  x = _rand(CUBE + (1,))
  ys = jax.jit(jax.vmap(lambda k: C.local_shuffle(k, x)))(_keys(6))
  changed = np.mean(np.asarray(ys) != np.asarray(x)[None])
  assert 0.765 < changed < 0.805  # Original: ~78.5%.
  # A permutation of each block: the multiset of values is kept where no block overlaps; overall
  # the histogram barely moves, and values come from at most 5 voxels away in x.
  xs = np.sort(np.asarray(x).ravel())
  assert abs(np.mean(np.asarray(ys[0])) - np.mean(xs)) < 2e-3
  ramp = jnp.broadcast_to(jnp.arange(64.0)[:, None, None, None] / 64, CUBE + (1,))
  moved = np.asarray(C.local_shuffle(jax.random.key(1), ramp)) - np.asarray(ramp)
  assert np.abs(moved).max() <= 5 / 64 + 1e-6 and np.abs(moved).max() > 0


def test_local_shuffle_is_exactly_a_permutation_for_one_block():
  x = _rand((10, 10, 10, 1))  # s//10 = 1 per axis: every block is one voxel, nothing moves.
  np.testing.assert_array_equal(np.asarray(C.local_shuffle(jax.random.key(0), x)), np.asarray(x))
  x = _rand((20, 10, 10, 1))  # Blocks of 1-2 voxels along x only: pairs swap or stay.
  y = np.asarray(jax.jit(lambda k: C.local_shuffle(k, x, 1))(jax.random.key(5)))
  diff = np.argwhere(y != np.asarray(x))
  assert len(diff) in (0, 2)
  if len(diff) == 2:
    a, b = diff
    assert y[tuple(a)] == np.asarray(x)[tuple(b)] and y[tuple(b)] == np.asarray(x)[tuple(a)]


def test_bezier_monotone_fixes_or_swaps_endpoints_and_is_decreasing_half_the_time():
  v = jnp.linspace(0.0, 1.0, 257)[:, None, None, None]
  ys = np.asarray(jax.jit(jax.vmap(lambda k: C.nonlinear(k, v)))(_keys(400)))[..., 0, 0, 0]
  d = np.diff(ys, axis=1)
  inc = np.all(d >= -1e-6, axis=1)
  dec = np.all(d <= 1e-6, axis=1)
  assert np.all(inc | dec)
  assert 0.42 < inc.mean() < 0.58
  np.testing.assert_allclose(ys[inc][:, [0, -1]], np.tile([0.0, 1.0], (inc.sum(), 1)), atol=1e-6)
  np.testing.assert_allclose(ys[~inc][:, [0, -1]], np.tile([1.0, 0.0], ((~inc).sum(), 1)),
                             atol=1e-6)


def test_bezier_map_matches_the_original_interpolation():
  from scipy.special import comb
  controls = np.array([0.2, 0.9, 0.7, 0.1], np.float32)
  t = np.linspace(0, 1, 100_000)
  bern = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
  xs = np.dot([0, controls[0], controls[2], 1], bern)
  ys = np.dot([0, controls[1], controls[3], 1], bern)
  v = np.linspace(0, 1, 1001, dtype=np.float32)
  inc = np.interp(v, np.sort(xs), np.sort(ys))  # The original's two branches.
  dec = np.interp(v, np.sort(xs), ys)
  np.testing.assert_allclose(C.bezier_map(jnp.asarray(v), jnp.asarray(controls), True), inc,
                             atol=1e-4)
  np.testing.assert_allclose(C.bezier_map(jnp.asarray(v), jnp.asarray(controls), False), dec,
                             atol=1e-4)


def test_inpainting_replaces_5_6_percent_on_average_and_under_10_at_most():
  masks = jax.jit(jax.vmap(lambda k: jnp.mean(C.inpaint_mask(k, CUBE))))(_keys(1000))
  m = np.asarray(masks)
  assert abs(m.mean() - 0.056) < 0.004
  assert np.quantile(m, 0.99) < 0.10 and m.max() < 0.13  # 5 full-size holes would be 16.8%.
  assert abs(np.mean(m == 0) - 0.05) < 0.025  # 5% of cubes get no hole.


def test_outpainting_keeps_about_32_percent():
  kept = np.asarray(jax.jit(jax.vmap(lambda k: jnp.mean(C.outpaint_mask(k, CUBE))))(_keys(1000)))
  assert abs(kept.mean() - 0.32) < 0.015
  assert kept.min() > 0.08 and kept.max() < 0.46


def test_paint_sizes_are_the_originals():
  def box_sizes(mask):
    idx = np.argwhere(mask)
    return idx.max(0) - idx.min(0) + 1
  f = jax.jit(jax.vmap(lambda k: C.inpaint_mask(k, CUBE)))
  g = jax.jit(jax.vmap(lambda k: C.outpaint_mask(k, CUBE)))
  # With p = 0.05 per extra box the first box is often alone: check its bounding box.
  for masks, lo, hi in ((f(_keys(120)), (10, 10, 5), (21, 21, 10)),
                        (g(_keys(120)), (28, 28, 14), (37, 37, 19))):
    masks = np.asarray(masks)
    sizes = np.array([box_sizes(m) for m in masks if m.any()])
    singles = sizes[np.all(sizes <= np.array(hi), axis=1)]
    assert len(singles) > 3
    assert np.all(singles >= np.array(lo))
    origins = [np.argwhere(m).min(0) for m in masks if m.any()]
    assert np.min(origins) >= 3  # Boxes start 3 voxels in from every face.


@pytest.mark.parametrize("transform,rate", [("local", 0.5), ("nonlinear", 0.9)])
def test_pipeline_fires_each_branch_at_its_rate(transform, rate):
  p = C.CorruptionParams(flip_rate=0.0, local_blocks=200, transforms=frozenset({transform}))
  x = _rand((1, 24, 24, 10, 1))  # Shuffle blocks up to 2 x 2 x 1.
  n = 400
  f = jax.jit(lambda k: C.corrupt_batch(k, jnp.tile(x[:1], (n, 1, 1, 1, 1)), p))
  inp, tgt = f(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(tgt), np.tile(np.asarray(x[:1]), (n, 1, 1, 1, 1)))
  fired = np.mean(np.any(np.asarray(inp) != np.asarray(tgt), axis=(1, 2, 3, 4)))
  assert abs(fired - rate) < 0.06


def test_pipeline_paints_at_its_rate_and_splits_in_and_out():
  p = C.CorruptionParams(flip_rate=0.0, transforms=frozenset({"inpaint", "outpaint"}))
  x = _rand((1, 32, 32, 16, 1))
  n = 800
  inp, tgt = jax.jit(lambda k: C.corrupt_batch(k, jnp.tile(x, (n, 1, 1, 1, 1)), p))(
      jax.random.key(2))
  changed = np.mean(np.asarray(inp) != np.asarray(tgt), axis=(1, 2, 3, 4))
  out_painted = np.mean(changed > 0.3)
  assert abs(out_painted - 0.9 * 0.8) < 0.05
  assert abs(np.mean(changed == 0) - (0.1 + 0.9 * 0.2 * 0.05)) < 0.04


def test_from_config_presets_and_errors():
  cfg = ml_collections.ConfigDict(dict(transforms="I&II", flip_rate=0.4, local_rate=0.5,
                                       nonlinear_rate=0.9, paint_rate=0.9, outpaint_rate=0.8,
                                       local_blocks=10_000, flip_compat=True))
  p = C.CorruptionParams.from_config(cfg)
  assert p.transforms == {"nonlinear", "local"} and p.flip_compat
  assert p.effective_rates()["paint"] == 0.0
  assert C.parse_transforms("III&IV") == {"outpaint", "inpaint"}
  assert C.parse_transforms("V") == C.parse_transforms("all") == set(C.TRANSFORMS)
  assert C.parse_transforms("outpaint") == {"outpaint"}
  assert C.CorruptionParams(transforms=C.parse_transforms("outpaint")).effective_rates()[
      "outpaint"] == 1.0
  hash(p)  # Static argument for jit.
  with pytest.raises(ValueError, match="unknown"):
    C.parse_transforms("nonlinear+blur")
  with pytest.raises(ValueError, match="flip_rate"):
    C.CorruptionParams(flip_rate=1.5)
  with pytest.raises(ValueError, match="floating"):
    C.nonlinear(jax.random.key(0), jnp.zeros((4, 4, 4, 1), jnp.int32))


def test_ablation_excludes_transforms():
  x = _rand((12, 16, 16, 8, 1))
  p = C.CorruptionParams(flip_rate=0.0, transforms=frozenset())
  inp, tgt = jax.jit(C.corrupt_batch, static_argnames="params")(jax.random.key(0), x, params=p)
  np.testing.assert_array_equal(np.asarray(inp), np.asarray(x))


def test_corrupt_batch_is_vmap_of_corrupt_and_jits_with_static_params():
  x = _rand((3, 16, 16, 8, 2))
  p = C.CorruptionParams(local_rate=1.0, local_blocks=300)
  f = jax.jit(C.corrupt_batch, static_argnames="params")
  inp, tgt = f(jax.random.key(7), x, params=p)
  keys = jax.random.split(jax.random.key(7), 3)
  for i in range(3):
    a, b = jax.jit(C.corrupt, static_argnames="params")(keys[i], x[i], params=p)
    np.testing.assert_allclose(np.asarray(inp[i]), np.asarray(a), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tgt[i]), np.asarray(b))


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from genesis_jax import corruptions as C
assert jax.device_count() == 2
x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 8, 1))
p = C.CorruptionParams(local_rate=1.0, local_blocks=300)
f = jax.jit(C.corrupt_batch, static_argnames="params")
one = f(jax.random.key(3), jax.device_put(x, jax.devices()[0]), params=p)
mesh = jax.make_mesh((2,), ("data",))
two = f(jax.random.key(3), jax.device_put(x, NamedSharding(mesh, P("data"))), params=p)
for a, b in zip(one, two):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
"""


def test_same_key_same_output_on_one_or_two_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  subprocess.run([sys.executable, "-c", _SHARDED], check=True, env=env, timeout=300, cwd=repo)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    shape=st.sampled_from([(24, 16, 3), (20, 12, 10, 2)]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    rates=st.tuples(*[st.sampled_from([0.0, 1.0])] * 5),
    seed=st.integers(0, 2 ** 31 - 1))
def test_property_any_rank_dtype_and_rates(shape, dtype, rates, seed):
  p = C.CorruptionParams(flip_rate=rates[0], local_rate=rates[1], nonlinear_rate=rates[2],
                         paint_rate=rates[3], outpaint_rate=rates[4], local_blocks=64)
  x = _rand((2,) + shape, seed % 1000, dtype)
  inp, tgt = _batch_fn(p)(jax.random.key(seed), x)
  for y in (inp, tgt):
    assert y.shape == x.shape and y.dtype == x.dtype
    y = np.asarray(y.astype(jnp.float32))
    assert np.all(np.isfinite(y)) and y.min() >= 0.0 and y.max() <= 1.0
  # The target is the flipped input: same values, same multiset per sample.
  np.testing.assert_array_equal(np.sort(np.asarray(tgt.astype(jnp.float32)).reshape(2, -1)),
                                np.sort(np.asarray(x.astype(jnp.float32)).reshape(2, -1)))
  if rates[1:4] == (0.0, 0.0, 0.0):
    np.testing.assert_array_equal(np.asarray(inp), np.asarray(tgt))


@functools.lru_cache(maxsize=None)
def _batch_fn(p):
  return jax.jit(lambda k, x: C.corrupt_batch(k, x, p))
