"""Tests of the released-weight import/export (genesis_jax/weights/: release, torch_pickle,
keras_h5, convert).

Fixtures (tests/fixtures/, made by make_fixtures.py with real torch 2.13 and h5py) are width-2
Genesis U-Nets whose key names and layouts are those of the released files.
"""
from __future__ import annotations

import pathlib
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax.models import unet
from genesis_jax.weights import convert, keras_h5, release, torch_pickle

FIX = pathlib.Path(__file__).parents[1] / "fixtures"
ZIP, LEGACY = FIX / "genesis_tiny_zip.pt", FIX / "genesis_tiny_legacy.pt"
KERAS = FIX / "genesis_tiny_keras.h5"


# ---- an independent numpy forward pass in the original layouts (N, C, x, y, z) ----------------

def _np_conv(x, w_at, k, bias):
  """'SAME' conv; w_at(i, j, l) is the (out, in) matrix of kernel tap (i, j, l)."""
  r = k // 2
  n, c, sx, sy, sz = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r), (r, r)))
  out = 0.0
  for i in range(k):
    for j in range(k):
      for l in range(k):
        window = xp[:, :, i:i + sx, j:j + sy, l:l + sz]
        out = out + np.einsum("ncxyz,oc->noxyz", window, w_at(i, j, l))
  return out + bias[None, :, None, None, None]


def _np_bn_relu(x, gamma, beta, mean, var, eps):
  shape = (1, -1, 1, 1, 1)
  y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape)
  return np.maximum(y + beta.reshape(shape), 0.0)


def _np_pool(x):
  n, c, sx, sy, sz = x.shape
  return x.reshape(n, c, sx // 2, 2, sy // 2, 2, sz // 2, 2).max(axis=(3, 5, 7))


def _batch_stats(x):
  return x.mean(axis=(0, 2, 3, 4)), x.var(axis=(0, 2, 3, 4))


def _np_torch_unet(sd, x, batch_stats):
  """The original UNet3D from its state_dict (keys without 'module.'); x (N, C, x, y, z)."""
  def unit(p, x):
    w = sd[f"{p}.conv1.weight"]  # (out, in, x, y, z)
    x = _np_conv(x, lambda i, j, l: w[:, :, i, j, l], 3, sd[f"{p}.conv1.bias"])
    mean, var = _batch_stats(x) if batch_stats else (sd[f"{p}.bn1.running_mean"],
                                                      sd[f"{p}.bn1.running_var"])
    return _np_bn_relu(x, sd[f"{p}.bn1.weight"], sd[f"{p}.bn1.bias"], mean, var, 1e-5)

  def block(name, x):
    return unit(f"{name}.ops.1", unit(f"{name}.ops.0", x))

  def up(name, x, skip):
    w = sd[f"{name}.up_conv.weight"]  # (in, out, 2, 2, 2): out[2p + i] += x[p] w[:, :, i]
    y = np.einsum("ncxyz,coijk->noxiyjzk", x, w)
    n, o = y.shape[:2]
    y = y.reshape(n, o, 2 * x.shape[2], 2 * x.shape[3], 2 * x.shape[4])
    y = y + sd[f"{name}.up_conv.bias"][None, :, None, None, None]
    return block(name, np.concatenate([y, skip], axis=1))

  s64 = block("down_tr64", x)
  s128 = block("down_tr128", _np_pool(s64))
  s256 = block("down_tr256", _np_pool(s128))
  y = block("down_tr512", _np_pool(s256))
  y = up("up_tr64", up("up_tr128", up("up_tr256", y, s256), s128), s64)
  w = sd["out_tr.final_conv.weight"]
  return _np_conv(y, lambda i, j, l: w[:, :, i, j, l], 1, sd["out_tr.final_conv.bias"])


def _np_keras_unet(layers, x, final):
  """The original Keras network (channels-first, nearest upsampling, eps 1e-3, moving stats)."""
  def unit(k, x):
    conv, bn = layers[f"depth_{k}_conv"], layers[f"depth_{k}_bn"]
    w = conv["kernel"]  # (x, y, z, in, out)
    x = _np_conv(x, lambda i, j, l: w[i, j, l].T, 3, conv["bias"])
    return _np_bn_relu(x, bn["gamma"], bn["beta"], bn["moving_mean"], bn["moving_variance"], 1e-3)

  def upsample(x):
    return x.repeat(2, axis=2).repeat(2, axis=3).repeat(2, axis=4)

  skips = []
  for level in range(4):
    if level:
      x = _np_pool(x)
    x = unit(2 * level + 1, unit(2 * level, x))
    skips.append(x)
  for i, skip in enumerate(reversed(skips[:3])):
    x = np.concatenate([upsample(x), skip], axis=1)
    x = unit(9 + 2 * i, unit(8 + 2 * i, x))
  w = layers[final]["kernel"]
  return _np_conv(x, lambda i, j, l: w[i, j, l].T, 1, layers[final]["bias"])


def _channels_last(x):
  return np.moveaxis(x, 1, -1)


def _apply(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.fixture(scope="module")
def torch_vars():
  return release.import_pytorch(ZIP)


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(FIX / "genesis_tiny_torch_expected.npz"))


# ---- PyTorch import ------------------------------------------------------------------------

def test_zip_and_legacy_serializations_import_identically(torch_vars):
  legacy = release.import_pytorch(LEGACY)
  same = jax.tree.map(np.array_equal, torch_vars, legacy)
  assert jax.tree.all(same)
  assert release.model_config_of(torch_vars) == dict(
      variant="pytorch", width=2, depth=3, spatial_dims=3, in_channels=1, out_channels=1)
  raw = torch_pickle.load(LEGACY)
  assert len(raw["state_dict"]) == 106 and raw["epoch"] == 3
  assert all(k.startswith("module.") for k in raw["state_dict"])


@pytest.mark.parametrize("bn", ["standard", "original"])
def test_imported_pytorch_forward_matches_torch_and_numpy(torch_vars, expected, bn):
  x = expected["x"]  # (N, C, x, y, z) as torch sees it
  sd = {k[len("module."):]: v for k, v in torch_pickle.load(ZIP)["state_dict"].items()}
  ref = _np_torch_unet(sd, x.astype(np.float64), batch_stats=bn == "original")
  torch_out = expected["eval_standard" if bn == "standard" else "eval_original"]
  np.testing.assert_allclose(ref, torch_out, atol=1e-4)  # the numpy reference is right
  model = unet.UNet(width=2, bn=bn, conv_impl="native")
  y = _channels_last(ref)
  ours = _apply(model, torch_vars, jnp.asarray(_channels_last(x)))
  np.testing.assert_allclose(ours, y, atol=1e-4)


def test_imported_pytorch_forward_unfold_impl(torch_vars, expected):
  model = unet.UNet(width=2, conv_impl="unfold")
  ours = _apply(model, torch_vars, jnp.asarray(_channels_last(expected["x"])))
  np.testing.assert_allclose(ours, _channels_last(expected["eval_standard"]), atol=1e-4)


# ---- Keras import --------------------------------------------------------------------------

def test_imported_keras_forward_matches_numpy(expected):
  variables = release.import_keras(KERAS)
  assert release.model_config_of(variables)["variant"] == "keras"
  layers = keras_h5.read_layers(KERAS)
  x = expected["x"]
  ref = _np_keras_unet(layers, x.astype(np.float64), final="conv3d_15")
  ours = _apply(unet.UNet(width=2, variant="keras"), variables, jnp.asarray(_channels_last(x)))
  np.testing.assert_allclose(ours, _channels_last(ref), atol=1e-4)


def test_keras_missing_and_extra_layers_are_named(tmp_path):
  bad = tmp_path / "bad.h5"
  shutil.copy(KERAS, bad)
  with h5py.File(bad, "a") as f:
    del f["model_weights/depth_3_bn/depth_3_bn/gamma:0"]
    g = f["model_weights/depth_3_bn"]
    g.attrs["weight_names"] = [n for n in g.attrs["weight_names"] if b"gamma" not in n]
  with pytest.raises(ValueError, match="depth_3_bn/gamma"):
    release.import_keras(bad)
  with h5py.File(bad, "a") as f:
    names = list(f["model_weights"].attrs["layer_names"])
    f["model_weights"].attrs["layer_names"] = names + [b"dense_9"]
    g = f["model_weights"].create_group("dense_9")
    g.attrs["weight_names"] = [b"dense_9/kernel:0"]
    g.create_dataset("dense_9/kernel:0", data=np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="dense_9/kernel"):
    release.import_keras(bad)


# ---- export and errors ---------------------------------------------------------------------

def _random_tree(seed: int) -> dict:
  """Random values in the shapes of a width-3 UNet (no init compile needed)."""
  m = unet.UNet(width=3, out_channels=2)
  shapes = jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 8, 8, 8, 1), jnp.float32))
  rng = np.random.default_rng(seed)
  tree = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


@pytest.mark.parametrize("legacy", [False, True])
def test_export_import_round_trip_is_identical(tmp_path, legacy):
  tree = _random_tree(0)
  path = tmp_path / "ours.pt"
  release.export_pytorch(tree, path, legacy=legacy)
  assert (path.read_bytes()[:2] == b"PK") != legacy
  back = release.import_pytorch(path)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  assert jax.tree.all(jax.tree.map(np.array_equal, tree, back))
  sd = torch_pickle.load(path)["state_dict"]
  assert len(sd) == 106
  # The transposed conv really is stored in PyTorch's (in, out, x, y, z) layout, unflipped.
  ours = tree["params"]["decoder"]["up_2"]["up_conv"]["kernel"]  # flipped (x, y, z, in, out)
  np.testing.assert_array_equal(sd["module.up_tr256.up_conv.weight"][:, :, 0, 1, 1],
                                ours[1, 0, 0])
  kernel = tree["params"]["encoder"]["down_0"]["conv_1"]["conv"]["kernel"]
  np.testing.assert_array_equal(sd["module.down_tr64.ops.1.conv1.weight"][:, :, 0, 1, 2],
                                kernel[0, 1, 2].T)


def test_mismatched_pytorch_keys_are_named(tmp_path):
  sd = release.to_pytorch_state_dict(_random_tree(1))
  missing = dict(sd)
  del missing["up_tr128.ops.1.bn1.running_var"]
  torch_pickle.save({"state_dict": {"module." + k: v for k, v in missing.items()}},
                    tmp_path / "missing.pt")
  with pytest.raises(ValueError, match=r"Missing: \['up_tr128.ops.1.bn1.running_var'\]"):
    release.import_pytorch(tmp_path / "missing.pt")
  extra = dict(sd, **{"aux.weight": np.zeros(3, np.float32)})
  torch_pickle.save({"state_dict": extra}, tmp_path / "extra.pt", legacy=True)
  with pytest.raises(ValueError, match=r"Unexpected: \['aux.weight'\]"):
    release.import_pytorch(tmp_path / "extra.pt")
  shaped = dict(sd)
  shaped["down_tr256.ops.0.conv1.bias"] = np.zeros(5, np.float32)
  torch_pickle.save({"state_dict": shaped}, tmp_path / "shape.pt")
  with pytest.raises(ValueError, match="down_tr256.ops.0.conv1.bias"):
    release.import_pytorch(tmp_path / "shape.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="junk.pt"):
    release.import_pytorch(tmp_path / "junk.pt")


def test_untrusted_objects_are_not_executed(tmp_path):
  import os
  import pickle

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

  (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": {}, "x": Evil()}, protocol=2))
  with pytest.raises(ValueError):
    release.import_pytorch(tmp_path / "evil.pt")
  assert not (tmp_path / "pwned").exists()


def test_convert_cli_writes_loadable_orbax_checkpoint(tmp_path, torch_vars):
  dst = tmp_path / "genesis"
  convert.main([str(LEGACY), str(dst)])
  variables, cfg = convert.load_converted(str(dst))
  assert cfg["variant"] == "pytorch" and cfg["width"] == 2 and cfg["depth"] == 3
  assert cfg["source"].endswith("genesis_tiny_legacy.pt")
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, torch_vars))
  with pytest.raises(SystemExit, match="exists"):
    convert.main([str(KERAS), str(dst)])


def test_errors_are_genesis_errors_and_nothing_is_half_written(tmp_path):
  from genesis_jax import errors
  with pytest.raises(errors.DataError, match="no such file"):
    release.import_keras(tmp_path / "absent.h5")
  with pytest.raises(release.WeightImportError, match="unknown weight file extension"):
    release.import_release(tmp_path / "weights.txt")
  path = tmp_path / "complex.pt"
  with pytest.raises(torch_pickle.TorchFileError, match="No torch storage"):
    torch_pickle.save({"x": np.zeros(2, np.complex64)}, path)
  assert not list(tmp_path.iterdir())
  with pytest.raises(SystemExit, match="unknown weight file extension"):
    convert.main([str(tmp_path / "weights.txt"), str(tmp_path / "out")])
