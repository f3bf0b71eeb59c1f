"""nnU-Net plans -> Flax networks: the axis rule, errors on bad plans, and parity with the PyTorch
networks of dynamic_network_architectures (fixtures made by tests/fixtures/make_nnunet_fixtures.py;
no torch needed here)."""
from __future__ import annotations

import copy
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax import errors
from genesis_jax.config import nnunet_plans
from genesis_jax.models import kernels, nnunet
from genesis_jax.weights import nnunet as nnunet_weights
from genesis_jax.weights import torch_pickle

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "nnunet"
NETWORKS = {  # fixture name -> (plans file, configuration)
    "plain_3d": ("plain_plans.json", "3d_fullres"),
    "plain_2d": ("plain_plans.json", "2d"),
    "resenc_3d": ("resenc_plans.json", "3d_fullres"),
    "resenc_2d": ("resenc_plans.json", "2d"),
}


def plan_of(name: str) -> nnunet_plans.NnUNetPlan:
  plans, config = NETWORKS[name]
  return nnunet_plans.load_plans(FIXTURES / plans, config)


def to_ours(x: np.ndarray, plan) -> np.ndarray:
  """(N, C, *plans axes) -> (N, *our axes, C)."""
  return x.transpose((0,) + tuple(2 + i for i in plan.axes) + (1,))


def write_plans(tmp_path, plans: dict, name: str = "plans.json") -> pathlib.Path:
  path = tmp_path / name
  path.write_text(json.dumps(plans))
  return path


def fixture_plans(name: str = "plain_plans.json") -> dict:
  return json.loads((FIXTURES / name).read_text())


# ---------------------------------------------------------------------------------------------
# Plans.

def test_anisotropic_plan_maps_to_our_axes():
  plan = plan_of("plain_3d")  # transpose_forward [0, 1, 2]: plans axes (z, y, x).
  raw = plan.raw["architecture"]["arch_kwargs"]
  assert raw["kernel_sizes"][0] == [1, 3, 3] and raw["strides"][1] == [1, 2, 2]
  assert plan.network == "PlainConvUNet" and plan.spatial_dims == 3
  assert plan.axes == (2, 1, 0) and plan.world_axes == (0, 1, 2)
  assert plan.arch["kernel_sizes"] == ((3, 3, 1), (3, 3, 3), (3, 3, 3))
  assert plan.arch["strides"] == ((1, 1, 1), (2, 2, 1), (2, 2, 2))
  assert plan.patch_size == (12, 8, 4) and plan.spacing == (0.8, 0.8, 3.0)
  assert plan.n_input_channels == 2 and plan.arch["n_conv_per_stage"] == (2, 1, 2)
  assert plan.to_plans(plan.patch_size) == (4, 8, 12)
  # The kernel's 1 lies on the axis of the coarse spacing, as in the plans.
  assert plan.spacing[plan.arch["kernel_sizes"][0].index(1)] == max(plan.spacing)


def test_transpose_forward_and_inheritance():
  plan = plan_of("resenc_3d")  # transpose_forward [2, 0, 1]: plans axes (x, z, y).
  assert plan.axes == (0, 2, 1)
  assert plan.arch["kernel_sizes"][1] == (3, 3, 1)  # plans [3, 1, 3]: the 1 is on z.
  assert plan.spacing == (0.8, 0.8, 3.0) and plan.patch_size == (8, 12, 4)
  assert plan.arch["n_blocks_per_stage"] == (1, 2, 2) and plan.arch["stem_channels"] == 4
  two_d = plan_of("resenc_2d")  # inherits_from 3d_fullres, slices across x.
  assert two_d.spatial_dims == 2 and two_d.world_axes == (1, 2) and two_d.axes == (1, 0)
  assert two_d.patch_size == (8, 12) and two_d.batch_size == 2
  assert two_d.raw["preprocessor_name"] == "DefaultPreprocessor"  # from the parent.
  plain_2d = plan_of("plain_2d")
  assert plain_2d.world_axes == (0, 1) and plain_2d.patch_size == (12, 8)
  assert plain_2d.arch["conv_bias"] is False


def test_older_v2_layout_is_rebuilt(tmp_path):
  plans = fixture_plans()
  config = plans["configurations"]["3d_fullres"]
  kwargs = config.pop("architecture")["arch_kwargs"]
  config.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4,
                unet_max_num_features=16, n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
                n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"],
                conv_kernel_sizes=kwargs["kernel_sizes"], pool_op_kernel_sizes=kwargs["strides"],
                num_pool_per_axis=[1, 2, 2])
  old = nnunet_plans.load_plans(write_plans(tmp_path, plans), "3d_fullres")
  assert old.arch == plan_of("plain_3d").arch


def test_input_channels_from_dataset_json(tmp_path):
  plans = fixture_plans()
  del plans["foreground_intensity_properties_per_channel"]
  path = write_plans(tmp_path, plans)
  assert nnunet_plans.load_plans(path, "2d").n_input_channels == 1
  (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC",
                                                                        "2": "DWI"}}))
  assert nnunet_plans.load_plans(path, "2d").n_input_channels == 3


def bad_plans(tmp_path, edit) -> pathlib.Path:
  plans = fixture_plans()
  edit(plans, plans["configurations"]["3d_fullres"]["architecture"])
  return write_plans(tmp_path, plans)


@pytest.mark.parametrize("edit, match", [
    (lambda p, a: a.update(network_class_name="dynamic_network_architectures.architectures."
                           "unet.ResidualUNet"), r"ResidualUNet.*supported.*PlainConvUNet"),
    (lambda p, a: a["arch_kwargs"].update(squeeze_excitation=True),
     r"unknown arch_kwargs \['squeeze_excitation'\].*known"),
    (lambda p, a: a["arch_kwargs"].update(norm_op="torch.nn.BatchNorm3d"),
     r"BatchNorm3d.*InstanceNorm3d"),
    (lambda p, a: a["arch_kwargs"].update(nonlin="torch.nn.GELU"), r"GELU.*LeakyReLU"),
    (lambda p, a: a["arch_kwargs"].update(strides=[[1, 1, 1], [2, 2, 2]]), r"strides.*3 entries"),
    (lambda p, a: p["configurations"]["3d_fullres"].update(patch_size=[4, 8, 10]),
     r"patch_size.*divisible"),
])
def test_unsupported_networks_are_named(tmp_path, edit, match):
  with pytest.raises(errors.ConfigError, match=match):
    nnunet_plans.load_plans(bad_plans(tmp_path, edit), "3d_fullres")


def test_other_versions_and_missing_configurations(tmp_path):
  with pytest.raises(errors.MissingPathError, match="does not exist"):
    nnunet_plans.load_plans(tmp_path / "nope.json", "3d_fullres")
  with pytest.raises(errors.ConfigError, match=r"folder.*plain_plans.json.*resenc_plans.json"):
    nnunet_plans.load_plans(FIXTURES, "3d_fullres")
  v1 = write_plans(tmp_path, {"plans_per_stage": {"0": {}}, "num_stages": 1}, "v1.json")
  with pytest.raises(errors.ConfigError, match="nnU-Net v1"):
    nnunet_plans.load_plans(v1, "3d_fullres")
  pkl = tmp_path / "nnUNetPlansv2.1_plans_3D.pkl"
  pkl.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(errors.ConfigError, match="v1"):
    nnunet_plans.load_plans(pkl, "3d_fullres")
  text = tmp_path / "garbage.json"
  text.write_text("not json")
  with pytest.raises(errors.ConfigError, match="not a JSON"):
    nnunet_plans.load_plans(text, "3d_fullres")
  with pytest.raises(errors.ConfigError,
                     match=r"'3d_lowres' does not exist.*\['2d', '3d_fullres'\]"):
    nnunet_plans.load_plans(FIXTURES / "plain_plans.json", "3d_lowres")


# ---------------------------------------------------------------------------------------------
# Networks.

@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_same_weights_same_outputs_as_pytorch(name):
  plan = plan_of(name)
  params = nnunet_weights.load_state_dict(torch_pickle.load(FIXTURES / f"{name}.pt"), plan)
  data = np.load(FIXTURES / f"{name}.npz")
  y = jax.jit(nnunet.build(plan, 3).apply)({"params": params}, to_ours(data["x"], plan))
  np.testing.assert_allclose(np.asarray(y), to_ours(data["y"], plan), atol=1e-4, rtol=0)


def test_deep_supervision_outputs_match_pytorch():
  plan = plan_of("plain_3d")
  params = nnunet_weights.load_state_dict(torch_pickle.load(FIXTURES / "plain_3d.pt"), plan)
  data = np.load(FIXTURES / "plain_3d.npz")
  ys = jax.jit(nnunet.build(plan, 3, deep_supervision=True).apply)(
      {"params": params}, to_ours(data["x"], plan))
  assert len(ys) == plan.arch["n_stages"] - 1 == len([k for k in data if k.startswith("y_ds")])
  for i, y in enumerate(ys):
    np.testing.assert_allclose(np.asarray(y), to_ours(data[f"y_ds{i}"], plan), atol=1e-4, rtol=0)


def test_init_builds_every_seg_layer_and_nnunet_init():
  plan = plan_of("resenc_2d")
  model = nnunet.build(plan, 2)
  x = jnp.zeros((1,) + plan.patch_size + (1,))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert set(variables) == {"params"}  # InstanceNorm: no batch statistics.
  p = variables["params"]
  assert {k for k in p["decoder"] if k.startswith("seg_")} == {"seg_0", "seg_1"}
  block = p["encoder"]["stage_2"]["block_1"]
  assert not np.any(block["conv2"]["norm"]["scale"]) and np.all(block["conv1"]["norm"]["scale"])
  kernel = np.asarray(p["encoder"]["stage_2"]["block_1"]["conv1"]["conv"]["kernel"])
  assert kernel.shape == (3, 3, 16, 16)
  assert abs(kernel.std() / np.sqrt(2 / 1.0001 / (9 * 16)) - 1) < 0.1  # kaiming_normal, fan_in.
  assert p["decoder"]["seg_1"]["kernel"].shape == (1, 1, 4, 2)
  # The tree is exactly what the PyTorch state_dict maps to (weights/nnunet.py).
  paths = set()

  def walk(tree, prefix=()):
    for k, v in tree.items():
      walk(v, prefix + (k,)) if isinstance(v, dict) else paths.add(prefix + (k,))
  walk(p)
  assert paths == {path for _, path, _ in nnunet_weights.torch_layout(plan)}


def test_bad_input_shapes_are_named():
  plan = plan_of("plain_3d")
  model = nnunet.build(plan, 1)
  with pytest.raises(errors.ConfigError, match="axis 2 must be divisible by 2"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 8, 5, 2)))
  with pytest.raises(errors.ConfigError, match="3 spatial axes"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 8, 2)))


def test_bfloat16_compute_stays_close():
  plan = plan_of("plain_2d")
  params = nnunet_weights.load_state_dict(torch_pickle.load(FIXTURES / "plain_2d.pt"), plan)
  data = np.load(FIXTURES / "plain_2d.npz")
  y16 = jax.jit(nnunet.build(plan, 3, dtype=jnp.bfloat16).apply)({"params": params},
                                                                to_ours(data["x"], plan))
  assert y16.dtype == jnp.float32
  ref = to_ours(data["y"], plan)
  assert np.abs(np.asarray(y16) - ref).max() < 0.1 * np.abs(ref).max()


def test_conv_impls_and_skip_keep():
  plan = plan_of("plain_3d")
  params = nnunet_weights.load_state_dict(torch_pickle.load(FIXTURES / "plain_3d.pt"), plan)
  x = to_ours(np.load(FIXTURES / "plain_3d.npz")["x"], plan)
  out = {impl: jax.jit(nnunet.build(plan, 3, conv_impl=impl).apply)({"params": params}, x)
         for impl in ("native", "unfold")}
  np.testing.assert_allclose(np.asarray(out["native"]), np.asarray(out["unfold"]), atol=1e-4)
  model = nnunet.build(plan, 3, conv_impl="native")
  apply = jax.jit(lambda keep: model.apply({"params": params}, x, skip_keep=keep))
  kept, dropped = apply(jnp.ones(2)), apply(jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(np.asarray(kept), np.asarray(out["native"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(dropped[0]), np.asarray(kept[0]), atol=1e-5)
  assert np.abs(np.asarray(dropped[1]) - np.asarray(kept[1])).max() > 1e-2
  with pytest.raises(errors.ConfigError, match="conv_impl"):
    nnunet.build(plan, 3, conv_impl="fft")


@pytest.mark.parametrize("spatial,kernel,strides", [
    ((8, 8, 6), (3, 3, 3), (2, 2, 2)),  # 3D isotropic, even sizes
    ((7, 9, 5), (3, 3, 3), (2, 2, 2)),  # odd sizes
    ((8, 6, 4), (3, 3, 1), (2, 2, 1)),  # anisotropic: plans' kernel [1, 3, 3], stride [1, 2, 2]
    ((7, 6, 5), (3, 3, 1), (2, 2, 1)),
    ((6, 8, 7), (1, 3, 3), (1, 2, 2)),  # the same along other axes (transpose_forward)
    ((9, 7, 6), (5, 3, 1), (3, 2, 2)),  # 3D: other kernels and strides
    ((7, 8, 5), (2, 2, 3), (2, 2, 1)),
    ((8, 6), (3, 3), (2, 2)),  # 2D
    ((7, 9), (3, 3), (2, 2)),
    ((9, 10), (5, 3), (3, 2)),  # other kernels and strides, even kernel, kernel 1
    ((7, 8), (2, 4), (2, 2)),
    ((7, 8), (1, 1), (2, 2)),
])
def test_strided_conv_space_to_depth_equals_lax(spatial, kernel, strides):
  rng = np.random.default_rng(sum(spatial))
  nd = len(spatial)
  x = jnp.asarray(rng.normal(size=(2,) + spatial + (3,)), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (3, 4)), jnp.float32)
  pad = [((n - 1) // 2, (n - 1) // 2) for n in kernel]
  letters = "DHW"[-nd:]
  dn = (f"N{letters}C", f"{letters}IO", f"N{letters}C")

  def native(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, pad, dimension_numbers=dn)

  def s2d(x, k):
    return kernels.conv_space_to_depth(x, k, strides, pad)

  want, got = jax.jit(native)(x, k), jax.jit(s2d)(x, k)
  assert got.shape == want.shape
  w = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  for a, b in [(want, got)] + list(zip(
      *[jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k)) * w), (0, 1)))(x, k)
        for f in (native, s2d)])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                               atol=1e-5 * max(1.0, float(jnp.abs(a).max())))
