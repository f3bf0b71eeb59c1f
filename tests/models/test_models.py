"""Tests of the Genesis U-Net, its layers, kernels and heads (genesis_jax/models/)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.models import heads, kernels, layers, unet


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, x_shape, **kw):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, **kw), x)


# ---- parameter counts (docs/method.md#parameter-counts) ------------------------------------

def test_pytorch_variant_parameter_counts():
  v = _shapes(unet.UNet(), (1, 64, 64, 32, 1))
  p = v["params"]
  assert _count(p) == 19_073_665
  assert _count(p["encoder"]) == 7_027_776
  assert _count(p["decoder"]) == 12_045_824
  up = sum(_count(p["decoder"][f"up_{l}"]["up_conv"]) for l in range(3))
  assert up == 2_753_408
  assert _count(p["out"]) == 65
  assert _count(v["batch_stats"]) == 4_672


def test_keras_variant_parameter_count():
  v = _shapes(unet.UNet(variant="keras"), (1, 64, 64, 32, 1))
  assert "up_conv" not in v["params"]["decoder"]["up_0"]
  assert _count(v["params"]) + _count(v["batch_stats"]) == 16_324_929


def test_classifier_parameter_tree_shares_encoder():
  u = _shapes(unet.UNet(width=4), (1, 16, 16, 8, 1))
  c = _shapes(heads.Classifier(n_class=3, width=4), (1, 16, 16, 8, 1))
  same = jax.tree.map(lambda a, b: a.shape == b.shape, u["params"]["encoder"],
                      c["params"]["encoder"])
  assert jax.tree.all(same)
  cls = c["params"]["classifier"]
  assert cls["dense_0"]["kernel"].shape == (4 * 16, 1024)
  assert cls["dense_1"]["kernel"].shape == (1024, 3)


def test_classifier_feature_level_reads_that_encoder_level():
  x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 8, 1)), jnp.float32)
  model = heads.Classifier(n_class=1, width=2, feature_level=0)
  v = model.init(jax.random.key(0), x, train=False)
  # Level 0's features have 2 * width channels; the whole encoder still exists (transfer).
  assert v["params"]["classifier"]["dense_0"]["kernel"].shape == (4, 1024)
  assert set(v["params"]["encoder"]) == {"down_0", "down_1", "down_2", "down_3"}
  y = model.apply(v, x, train=False)
  # Deeper levels do not reach the output; level 0 does.
  for level, changes in (("down_2", False), ("down_0", True)):
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 1.0 if level in jax.tree_util.keystr(path) else a, v["params"])
    y2 = model.apply({**v, "params": p}, x, train=False)
    assert bool(jnp.any(y2 != y)) == changes, level
  deepest = heads.build_model(ml_collections.ConfigDict({"width": 2}), task="classify")
  assert deepest.feature_level == -1
  with pytest.raises(ValueError, match=r"feature_level=4 must be in \[-1, model.depth=3\]"):
    heads.build_model(ml_collections.ConfigDict({"width": 2}), task="classify", feature_level=4)


# ---- shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["pytorch", "keras"])
def test_output_shapes_3d_and_2d(variant):
  # Shapes through the real module code, without compiling (jax.eval_shape).
  m3 = unet.UNet(out_channels=3, width=2, variant=variant)
  v3 = _shapes(m3, (2, 16, 16, 8, 1))
  y3 = jax.eval_shape(lambda v, x: m3.apply(v, x, train=False), v3,
                      jax.ShapeDtypeStruct((2, 16, 16, 8, 1), jnp.float32))
  assert y3.shape == (2, 16, 16, 8, 3)
  m2 = unet.UNet(out_channels=1, width=2, depth=2, spatial_dims=2, variant=variant)
  v2 = _shapes(m2, (2, 16, 8, 2))
  y2 = jax.eval_shape(lambda v, x: m2.apply(v, x, train=True, mutable=["batch_stats"])[0], v2,
                      jax.ShapeDtypeStruct((2, 16, 8, 2), jnp.float32))
  assert y2.shape == (2, 16, 8, 1) and y2.dtype == jnp.float32
  assert v2["params"]["encoder"]["down_0"]["conv_0"]["conv"]["kernel"].shape == (3, 3, 2, 2)
  assert v2["params"]["decoder"]["up_1"]["conv_0"]["conv"]["kernel"].shape == (3, 3, 16 + 8, 8)


def test_2d_unet_runs():
  m = unet.UNet(out_channels=2, width=2, depth=2, spatial_dims=2)
  x = jnp.asarray(np.random.default_rng(7).uniform(size=(2, 8, 12, 1)), jnp.float32)
  v = jax.jit(lambda k, x: m.init(k, x, train=False))(jax.random.key(0), x)
  y = jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)
  assert y.shape == (2, 8, 12, 2) and bool(jnp.isfinite(y).all())


def test_encoder_feature_shapes():
  enc = unet.Encoder(width=4, depth=3)
  x = jax.ShapeDtypeStruct((1, 16, 16, 8, 1), jnp.float32)
  bottom, skips = jax.eval_shape(
      lambda x: enc.init_with_output(jax.random.key(0), x, train=False)[0], x)
  assert bottom.shape == (1, 2, 2, 1, 64)
  assert [s.shape for s in skips] == [(1, 16, 16, 8, 8), (1, 8, 8, 4, 16), (1, 4, 4, 2, 32)]
  dec = unet.Decoder(width=4, depth=3)
  y = jax.eval_shape(lambda b, s: dec.init_with_output(jax.random.key(1), b, s, train=False)[0],
                     bottom, skips)
  assert y.shape == (1, 16, 16, 8, 8)


def test_spatial_size_rule():
  with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 8"):
    unet.check_spatial_shape((64, 64, 20), 3)
  unet.check_spatial_shape((64, 64, 32), 3)
  m = unet.UNet(width=2)
  with pytest.raises(ValueError, match="divisible by 2"):
    _shapes(m, (1, 16, 16, 12, 1))


def test_bad_fields_rejected():
  with pytest.raises(ValueError, match="variant"):
    heads.build_model(ml_collections.ConfigDict(dict(variant="caffe")))
  with pytest.raises(ValueError, match="conv_impl"):
    kernels.resolve_conv_impl("im2col")


# ---- layer formulations agree with the textbook ops -----------------------------------------

@pytest.mark.parametrize("nd,features,sx", [(2, 5, 6), (3, 5, 8), (3, 5, 6), (3, 5, 5),
                                             (3, 2, 5)])
def test_conv_impls_agree_with_lax(nd, features, sx):
  # 3D "unfold": x = 8 takes Winograd F(4, 3) along x, x = 6 F(2, 3); odd x the x-shift stack,
  # 3 -> 5 on the input side, 3 -> 2 on the output side (kernels.conv_unfold_3d). These convs
  # are far below the default winograd_min_macs, so it is 0 here.
  assert kernels.winograd_tile(sx, jnp.float32, min_macs=0) == {8: 4, 6: 2, 5: 0}[sx]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2,) + (sx, 4, 4)[:nd] + (3,)), jnp.float32)
  outs, grads = {}, {}
  for impl in ("native", "unfold"):
    conv = layers.Conv(features, 3, conv_impl=impl, winograd_min_macs=0)
    v = conv.init(jax.random.key(0), x)
    outs[impl] = conv.apply(v, x)
    grads[impl] = jax.grad(lambda v, x: (conv.apply(v, x) ** 2).sum(), argnums=(0, 1))(v, x)
  k = v["params"]["kernel"]
  spatial = "DHW"[-nd:]
  ref = lax.conv_general_dilated(x, k, (1,) * nd, "SAME",
                                 dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  ref = ref + v["params"]["bias"]
  np.testing.assert_allclose(outs["native"], ref, atol=1e-5)
  np.testing.assert_allclose(outs["unfold"], ref, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads["native"]), jax.tree.leaves(grads["unfold"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_winograd_tile_needs_float32_for_f43():
  assert kernels.winograd_tile(64, jnp.float32) == 4
  assert kernels.winograd_tile(64, jnp.bfloat16) == 2
  assert kernels.winograd_tile(6, jnp.float32) == 2
  assert kernels.winograd_tile(7, jnp.float32) == 0
  assert kernels.winograd_tile(64, jnp.float32, kernels.DEFAULT_WINOGRAD_MIN_MACS - 1) == 0
  # Float32 convs on a GPU run as TF32 unless asked for full precision: F(2, 3) only.
  assert kernels.winograd_tile(64, jnp.float32, backend="gpu") == 2
  with jax.default_matmul_precision("highest"):
    assert kernels.winograd_tile(64, jnp.float32, backend="gpu") == 4
    assert kernels.winograd_tile(64, jnp.bfloat16, backend="gpu") == 2


def test_winograd_tile_argument_and_min_macs():
  # The tile (conv_impl "unfold:N") and the threshold (model.winograd_min_macs) are arguments.
  for tile, want in ((4, {64: 4, 6: 2, 5: 0}), (2, {64: 2, 6: 2, 5: 0}),
                     (0, {64: 0, 6: 0, 5: 0}), (None, {64: 4, 6: 2, 5: 0})):
    assert {sx: kernels.winograd_tile(sx, jnp.float32, backend="cpu", tile=tile)
            for sx in want} == want
  assert kernels.winograd_tile(64, jnp.bfloat16, backend="gpu", tile=4) == 4
  assert kernels.winograd_tile(64, jnp.float32, kernels.DEFAULT_WINOGRAD_MIN_MACS - 1,
                               tile=4) == 0
  assert kernels.winograd_tile(64, jnp.float32, 10.0, min_macs=10.0) == 4
  assert kernels.winograd_tile(64, jnp.float32, 9.0, min_macs=10.0) == 0
  assert kernels.winograd_tile(64, jnp.float32, 1e30, min_macs=float("inf")) == 0
  assert kernels.winograd_tile(64, jnp.float32, 0.0, min_macs=0.0) == 4


def test_winograd_settings_ignore_the_old_environment_variables(monkeypatch):
  # GENESIS_WINOGRAD_TILE / GENESIS_WINOGRAD_MIN_MACS are no config channel any more (numerics
  # come from config keys recorded in config.json).
  monkeypatch.setenv("GENESIS_WINOGRAD_TILE", "4")
  monkeypatch.setenv("GENESIS_WINOGRAD_MIN_MACS", "0")
  assert kernels.winograd_tile(64, jnp.bfloat16, backend="gpu") == 2
  assert kernels.winograd_tile(64, jnp.float32, 1.0) == 0


def test_winograd_min_macs_config_key():
  # Declared in the schema with the kernels' default, checked and threaded by build_model.
  default = schema.pretrain_config().model.get("winograd_min_macs")
  if default is None:
    pytest.skip("model.winograd_min_macs is not in the config schema yet")
  assert default == kernels.DEFAULT_WINOGRAD_MIN_MACS
  cfg = ml_collections.ConfigDict(dict(width=2, depth=1))
  assert heads.build_model(cfg).winograd_min_macs == kernels.DEFAULT_WINOGRAD_MIN_MACS
  for value in (0, 0.0, float("inf"), "inf", 1e9):
    cfg = ml_collections.ConfigDict(dict(width=2, depth=1, winograd_min_macs=value))
    assert heads.build_model(cfg).winograd_min_macs == float(value)
    assert heads.build_model(cfg, task="classify").winograd_min_macs == float(value)
  for bad in (-1.0, float("nan"), "many", None):
    cfg = ml_collections.ConfigDict(dict(width=2, winograd_min_macs=bad))
    with pytest.raises(errors.ConfigError, match="model.winograd_min_macs"):
      heads.build_model(cfg)


def test_winograd_min_macs_reaches_every_conv():
  # 0: every 3x3x3 conv takes Winograd; inf: none does. Same function, different rounding.
  x = jnp.asarray(np.random.default_rng(9).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  outs = {}
  for value in (0.0, float("inf")):
    m = heads.build_model(ml_collections.ConfigDict(
        dict(width=2, depth=1, conv_impl="unfold", winograd_min_macs=value)))
    v = m.init(jax.random.key(0), x, train=False)
    outs[value] = m.apply(v, x, train=True, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(outs[0.0], outs[float("inf")], atol=1e-5)
  assert not np.array_equal(outs[0.0], outs[float("inf")])


def test_conv_impl_choices_match_the_schema():
  key = schema.lookup("model.conv_impl")
  choices = getattr(key, "choices", None)
  if not choices:
    pytest.skip("the schema declares no choices for model.conv_impl")
  assert tuple(choices) == kernels.CONV_IMPLS
  with pytest.raises(errors.ConfigError, match="model.conv_impl"):
    heads.build_model(ml_collections.ConfigDict(dict(conv_impl="im2col")))


def test_conv_impl_auto_and_fixed_tiles():
  # "auto" takes the unfold convs where they were measured faster (CPU, H200), cuDNN-free TPU
  # stays native; "unfold:N" fixes the Winograd tile whatever the dtype or backend.
  assert {b: kernels.resolve_conv_impl("auto", backend=b) for b in ("cpu", "gpu", "tpu")} == {
      "cpu": "unfold", "gpu": "unfold", "tpu": "native"}
  assert kernels.resolve_conv_impl("unfold:4", backend="tpu") == "unfold:4"
  assert kernels.winograd_tile(64, jnp.bfloat16, backend="gpu", tile=4) == 4
  assert kernels.winograd_tile(6, jnp.float32, tile=4) == 2  # 4 does not divide x = 6
  assert kernels.winograd_tile(64, jnp.float32, tile=0) == 0
  with pytest.raises(ValueError, match="Winograd tile must be"):
    kernels.winograd_tile(64, jnp.float32, tile=3)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 4, 4, 3)), jnp.float32)
  outs = {}
  for impl in ("native", "unfold:0", "unfold:2", "unfold:4"):
    conv = layers.Conv(5, 3, conv_impl=impl, winograd_min_macs=0)
    v = conv.init(jax.random.key(0), x)
    outs[impl] = conv.apply(v, x)
  for impl in ("unfold:0", "unfold:2", "unfold:4"):
    np.testing.assert_allclose(outs[impl], outs["native"], atol=1e-5)
  # The tile really changes the computation (different rounding, same function).
  assert not np.array_equal(outs["unfold:2"], outs["unfold:4"])


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_transforms_and_their_hand_written_gradients(m):
  # Forward: t_i[p] = sum_j BT[i, j] x[mp - 1 + j] (zero outside), y[mp + r] = sum_i AT[r, i] ms_i;
  # backward: the custom VJPs must be the transposes, <T(x), g> == <x, T^T(g)>.
  rng = np.random.default_rng(5)
  bt, at = np.array(kernels.WINOGRAD[m]["BT"]), np.array(kernels.WINOGRAD[m]["AT"])
  x = rng.normal(size=(2, 3 * m, 3, 2)).astype(np.float32)
  pred = jnp.asarray(True)
  ts, vjp_in = jax.vjp(lambda x: kernels.winograd_in(x, pred, m), jnp.asarray(x))
  xp = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
  for p in range(3):
    d = xp[:, m * p:m * p + m + 2]
    np.testing.assert_allclose(np.stack([t[:, p] for t in ts], 1),
                               np.einsum("ij,njyc->niyc", bt, d), rtol=1e-5, atol=1e-5)
  g = tuple(rng.normal(size=t.shape).astype(np.float32) for t in ts)
  lhs = sum(np.vdot(np.asarray(t), gi) for t, gi in zip(ts, g))
  np.testing.assert_allclose(lhs, np.vdot(x, np.asarray(vjp_in(g)[0])), rtol=1e-4)

  ms = tuple(jnp.asarray(rng.normal(size=(2, 3, 3, 2)).astype(np.float32)) for _ in range(m + 2))
  y, vjp_out = jax.vjp(lambda *ms: kernels.winograd_out(pred, m, *ms), *ms)
  ref = np.einsum("ri,inpyc->npryc", at, np.stack(ms)).reshape(2, 3 * m, 3, 2)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  gy = rng.normal(size=y.shape).astype(np.float32)
  dms = vjp_out(jnp.asarray(gy))
  np.testing.assert_allclose(np.vdot(np.asarray(y), gy),
                             sum(np.vdot(np.asarray(a), np.asarray(b)) for a, b in zip(ms, dms)),
                             rtol=1e-4)


def test_x_shift_pair_is_adjoint():
  # stack_x_shifts / sum_x_shifts carry hand-written gradients (each other): they must be
  # transposes, <stack(a, s), t> == <a, sum(t, -s)>; the conv tests check them end to end.
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 5, 3, 3, 4)), jnp.float32)
  pred = jnp.asarray(True)
  for sign in (1, -1):
    s = kernels.stack_x_shifts(a, pred, 3, sign)
    # <stack(a), t> == <a, sum(t, -sign)>, and the gradients are those transposes.
    np.testing.assert_allclose(jnp.vdot(s, t), jnp.vdot(a, kernels.sum_x_shifts(t, pred, -sign)),
                               rtol=1e-5)
    ga = jax.grad(lambda a: jnp.vdot(kernels.stack_x_shifts(a, pred, 3, sign), t))(a)
    np.testing.assert_allclose(ga, kernels.sum_x_shifts(t, pred, -sign), rtol=1e-6)
    gt = jax.grad(lambda t: jnp.vdot(kernels.sum_x_shifts(t, pred, sign), a))(t)
    np.testing.assert_allclose(gt, kernels.stack_x_shifts(a, pred, 3, -sign), rtol=1e-6)
    ref = jnp.stack([jnp.roll(a, -sign * (i - 1), axis=1) for i in range(3)], axis=-2)
    edge = np.ones(s.shape, bool)
    edge[:, 0, :, 2 if sign == -1 else 0] = edge[:, -1, :, 0 if sign == -1 else 2] = False
    np.testing.assert_array_equal(np.asarray(s)[edge], np.asarray(ref)[edge])
    np.testing.assert_array_equal(np.asarray(s)[~edge], 0.0)


@pytest.mark.parametrize("nd", [2, 3])
def test_upconv_matches_conv_transpose_and_gradient(nd):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2,) + (3, 2, 2)[:nd] + (4,)), jnp.float32)
  up = layers.UpConv(3)
  v = up.init(jax.random.key(0), x)
  ref_mod = nn.ConvTranspose(3, (2,) * nd, strides=(2,) * nd, padding="VALID")
  f = lambda v, x: up.apply(v, x)
  g = lambda v, x: ref_mod.apply(v, x)
  np.testing.assert_allclose(f(v, x), g(v, x), atol=1e-5)
  loss = lambda fn: jax.grad(lambda v, x: (fn(v, x) * jnp.arange(fn(v, x).size).reshape(
      fn(v, x).shape)).sum(), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(loss(f)), jax.tree.leaves(loss(g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_pooling_and_nearest_upsampling():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 6, 2, 3)), jnp.float32)
  np.testing.assert_array_equal(kernels.max_pool(x), nn.max_pool(x, (2, 2, 2), (2, 2, 2)))
  ref = jnp.repeat(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), 2, 3)
  np.testing.assert_array_equal(kernels.upsample_nearest(x), ref)


@pytest.mark.parametrize("winograd", [False, True])
def test_unet_conv_impls_agree_forward_and_backward(winograd):
  # winograd: every 3x3x3 conv of this tiny net takes Winograd (x = 4: F(4, 3), x = 2: F(2, 3)).
  min_macs = 0.0 if winograd else kernels.DEFAULT_WINOGRAD_MIN_MACS
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  models = {impl: unet.UNet(width=2, depth=1, conv_impl=impl, winograd_min_macs=min_macs)
            for impl in ("native", "unfold")}
  v = jax.jit(lambda k, x: models["native"].init(k, x, train=False))(jax.random.key(0), x)

  def loss(params, impl):
    y, _ = models[impl].apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.mean(y ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ln, gn = grad(v["params"], "native")
  lu, gu = grad(v["params"], "unfold")
  np.testing.assert_allclose(ln, lu, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(gn), jax.tree.leaves(gu)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# ---- batch norm modes ------------------------------------------------------------------------

def test_batchnorm_train_eval_and_original_mode():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(4, 3, 2, 5)), jnp.float32)
  bn = layers.BatchNorm(momentum=0.9, epsilon=1e-5)
  v = bn.init(jax.random.key(0), x, train=False)
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  xs = np.asarray(x).reshape(-1, 5)
  np.testing.assert_allclose(y.reshape(-1, 5), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5),
                             atol=1e-4)
  # PyTorch's running update: momentum 0.1 towards the mean and the unbiased variance.
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
  # Standard eval: running statistics.
  v2 = {"params": v["params"], "batch_stats": upd["batch_stats"]}
  y_eval = bn.apply(v2, x, train=False)
  m, s = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])
  np.testing.assert_allclose(y_eval.reshape(-1, 5), (xs - m) / np.sqrt(s + 1e-5), rtol=1e-4)
  # Original: batch statistics at eval, batch_stats immutable.
  y_orig = layers.BatchNorm(always_batch_stats=True).apply(v2, x, train=False)
  np.testing.assert_allclose(y_orig, y, atol=1e-5)


def _bn_reference(x, scale, bias, eps):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
  return (x - mean) * lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (2, 6, 4, 4, 3)])
def test_batchnorm_custom_gradient_matches_autodiff(shape):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=shape), jnp.float32)
  c = shape[-1]
  scale = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  # Weights on every output, including mean and var (their cotangents must flow too).
  wy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  wm = jnp.asarray(rng.normal(size=c), jnp.float32)
  wv = jnp.asarray(rng.normal(size=c), jnp.float32)

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias, 1e-5)
      return jnp.sum(y * wy) + jnp.sum(mean * wm) + jnp.sum(var * wv)
    return f
  ours = jax.jit(jax.value_and_grad(loss(kernels.batch_norm_train), argnums=(0, 1, 2)))(
      x, scale, bias)
  ref = jax.jit(jax.value_and_grad(loss(_bn_reference), argnums=(0, 1, 2)))(x, scale, bias)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  for a, b in zip(ours[1], ref[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bias_add_gradient():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=6), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours = jax.grad(lambda x, b: jnp.sum(kernels.add_channel_bias(x, b) ** 2 * w), (0, 1))(x, b)
  ref = jax.grad(lambda x, b: jnp.sum((x + b) ** 2 * w), (0, 1))(x, b)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_original_bn_unet_eval_needs_no_mutable_stats():
  x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  m = unet.UNet(width=2, depth=1, bn="original")
  v = jax.jit(lambda k, x: m.init(k, x, train=False))(jax.random.key(0), x)
  y_eval = jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)
  y_train, _ = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  np.testing.assert_allclose(y_eval, y_train, atol=1e-5)
  y_std = jax.jit(lambda v, x: unet.UNet(width=2, depth=1).apply(v, x, train=False))(v, x)
  assert not np.allclose(y_std, y_eval, atol=1e-3)


# ---- mixed precision, heads, build_model ---------------------------------------------------

def test_bfloat16_compute_with_float32_params():
  x = jnp.asarray(np.random.default_rng(6).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  m32 = unet.UNet(width=4, depth=1)
  m16 = unet.UNet(width=4, depth=1, dtype=jnp.bfloat16)
  v = jax.jit(lambda k, x: m16.init(k, x, train=False))(jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
  run = jax.jit(lambda v, x, bf16: (m16 if bf16 else m32).apply(
      v, x, train=True, mutable=["batch_stats"])[0], static_argnums=2)
  y16, y32 = run(v, x, True), run(v, x, False)
  assert y16.dtype == jnp.float32
  assert not np.array_equal(y16, y32)  # really computed in bf16
  assert float(jnp.abs(y16 - y32).max()) < 0.1 * float(jnp.abs(y32).max()) + 0.05


def test_build_model_tasks():
  cfg = ml_collections.ConfigDict(dict(variant="pytorch", width=2, depth=1, spatial_dims=3,
                                       bn="standard", dtype="float32", conv_impl="auto"))
  x = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  seg = heads.build_model(cfg, task="segment", n_class=3)
  vs = _shapes(seg, x.shape)
  assert jax.eval_shape(lambda v: seg.apply(v, x, train=False), vs).shape == (2, 4, 4, 4, 3)
  restore = heads.build_model(cfg, task="restore")
  vr = jax.jit(lambda k, x: restore.init(k, x, train=False))(jax.random.key(0), x)
  cls = heads.build_model(cfg, task="classify", n_class=2)
  vc = jax.jit(lambda k, x: cls.init(k, x, train=False))(jax.random.key(1), x)
  # Transfer by subtree: the restoration encoder drops into the classifier unchanged.
  vc2 = {"params": dict(vc["params"], encoder=vr["params"]["encoder"]),
         "batch_stats": dict(vc["batch_stats"], encoder=vr["batch_stats"]["encoder"])}
  apply = jax.jit(lambda v, x: cls.apply(v, x, train=False))
  y, y2 = apply(vc, x), apply(vc2, x)
  assert y.shape == (2, 2) and y.dtype == jnp.float32
  assert not np.allclose(y, y2)
  cfg.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    heads.build_model(cfg)
  with pytest.raises(ValueError, match="task"):
    heads.build_model(ml_collections.ConfigDict(dict(width=2)), task="detect")
