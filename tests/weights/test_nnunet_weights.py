"""nnU-Net checkpoints without torch: our export is PyTorch's exact state_dict, nnU-Net's own
checkpoint imports, the written .pth passes nnU-Net's pretrained-weights checks, and checkpoints of
other plans get a CheckpointError naming the key. Fixtures: tests/fixtures/make_nnunet_fixtures.py.
Only `test_export_loads_strictly_into_pytorch` needs torch (skipped without it, as in CI)."""
from __future__ import annotations

import json
import pathlib
import pydoc

import jax
import numpy as np
import pytest

from genesis_jax import errors
from genesis_jax.config import nnunet_plans
from genesis_jax.models import nnunet
from genesis_jax.weights import nnunet as nnunet_weights
from genesis_jax.weights import torch_pickle

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "nnunet"
NETWORKS = {
    "plain_3d": ("plain_plans.json", "3d_fullres"),
    "plain_2d": ("plain_plans.json", "2d"),
    "resenc_3d": ("resenc_plans.json", "3d_fullres"),
    "resenc_2d": ("resenc_plans.json", "2d"),
}


def plan_of(name: str):
  return nnunet_plans.load_plans(FIXTURES / NETWORKS[name][0], NETWORKS[name][1])


def to_ours(x: np.ndarray, plan) -> np.ndarray:
  return x.transpose((0,) + tuple(2 + i for i in plan.axes) + (1,))


def leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), np.asarray(v)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_export_is_pytorchs_state_dict(name):
  plan = plan_of(name)
  torch_sd = torch_pickle.load(FIXTURES / f"{name}.pt")
  params = nnunet_weights.load_state_dict(torch_sd, plan)
  ours = nnunet_weights.export_state_dict(params, plan)
  assert list(ours) == list(torch_sd)  # Same keys, aliases included, in PyTorch's order.
  for k, v in torch_sd.items():
    assert ours[k].shape == v.shape and ours[k].dtype == np.float32, k
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  # Every parameter of ours is used, under its first PyTorch key.
  used = {path for _, path, _ in nnunet_weights.torch_layout(plan)}
  assert {p for p, _ in leaves(params)} == used


def test_kernel_layout_follows_the_axis_rule():
  plan = plan_of("plain_3d")  # transpose_forward [0, 1, 2]: torch (out, in, z, y, x).
  sd = torch_pickle.load(FIXTURES / "plain_3d.pt")
  params = nnunet_weights.load_state_dict(sd, plan)
  w = sd["encoder.stages.0.0.convs.0.conv.weight"]
  assert w.shape == (4, 2, 1, 3, 3)
  ours = params["encoder"]["stage_0"]["conv_0"]["conv"]["kernel"]
  np.testing.assert_array_equal(ours, w.transpose(4, 3, 2, 1, 0))  # (kx, ky, kz, in, out)
  t = sd["decoder.transpconvs.1.weight"]  # ConvTranspose: (in, out, z, y, x)
  np.testing.assert_array_equal(params["decoder"]["transpconv_1"]["kernel"],
                                t.transpose(4, 3, 2, 0, 1))


def nnunet_pretrained_check(model_keys_shapes: dict, path: pathlib.Path) -> dict:
  """What nnunetv2/run/load_pretrained_weights.py asserts and copies, on numpy arrays."""
  pretrained = torch_pickle.load(path)["network_weights"]
  for key, shape in model_keys_shapes.items():
    if ".seg_layers." not in key:
      assert key in pretrained, key
      assert pretrained[key].shape == shape, key
  return {k: v for k, v in pretrained.items()
          if k in model_keys_shapes and ".seg_layers." not in k}


def restoration_params(plan, name: str, seed: int = 0) -> dict:
  """Params of the fixture network with random values and a 1-channel output (as pre-training's
  restoration head), without the cost of an init."""
  rng = np.random.default_rng(seed)
  sd = {k: rng.normal(0, 0.3, v.shape).astype(np.float32)[:1 if ".seg_layers." in k else None]
        for k, v in torch_pickle.load(FIXTURES / f"{name}.pt").items()}
  return nnunet_weights.load_state_dict(sd, plan)


def test_written_checkpoint_passes_nnunets_loader_and_reimports(tmp_path):
  plan = plan_of("resenc_3d")
  model = nnunet.build(plan, 1)  # A restoration network: 1 output channel.
  x = np.random.default_rng(0).normal(size=(1,) + plan.patch_size + (1,)).astype(np.float32)
  params = restoration_params(plan, "resenc_3d")
  path = tmp_path / "genesis_nnunet.pth"
  nnunet_weights.write_nnunet_checkpoint(path, params, plan)
  # The segmentation network nnU-Net builds (3 classes) takes everything but its seg layers.
  target = {k: v.shape for k, v in torch_pickle.load(FIXTURES / "resenc_3d.pt").items()}
  copied = nnunet_pretrained_check(target, path)
  assert len(copied) == len([k for k in target if ".seg_layers." not in k])
  meta = torch_pickle.load(path)["genesis_jax"]
  assert meta["configuration"] == "3d_fullres" and meta["writer"] == "genesis_jax"
  back = nnunet_weights.import_nnunet_checkpoint(path, plan)
  y0 = jax.jit(model.apply)({"params": params}, x)
  y1 = jax.jit(model.apply)({"params": back}, x)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
  assert not list(tmp_path.glob("*.partial"))


def test_nnunet_checkpoint_final_imports():
  plan = plan_of("resenc_3d")
  params = nnunet_weights.import_nnunet_checkpoint(FIXTURES / "checkpoint_final.pth", plan)
  data = np.load(FIXTURES / "resenc_3d.npz")
  y = jax.jit(nnunet.build(plan, 3).apply)({"params": params}, to_ours(data["x"], plan))
  np.testing.assert_allclose(np.asarray(y), to_ours(data["y"], plan), atol=1e-4, rtol=0)


def test_import_without_seg_layers_for_other_classes():
  plan = plan_of("resenc_3d")
  full = nnunet_weights.import_nnunet_checkpoint(FIXTURES / "checkpoint_final.pth", plan)
  body = nnunet_weights.import_nnunet_checkpoint(FIXTURES / "checkpoint_final.pth", plan,
                                                 num_classes=5, seg_layers=False)
  assert set(full["decoder"]) - set(body["decoder"]) == {"seg_0", "seg_1"}
  np.testing.assert_array_equal(body["encoder"]["stem"]["conv_0"]["conv"]["kernel"],
                                full["encoder"]["stem"]["conv_0"]["conv"]["kernel"])


def test_ddp_and_compile_prefixes_are_stripped():
  plan = plan_of("plain_2d")
  sd = torch_pickle.load(FIXTURES / "plain_2d.pt")
  wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}
  a = nnunet_weights.load_state_dict(sd, plan)
  b = nnunet_weights.load_state_dict(wrapped, plan)
  for (pa, va), (pb, vb) in zip(leaves(a), leaves(b)):
    assert pa == pb
    np.testing.assert_array_equal(va, vb)


def test_checkpoints_of_other_plans_are_named(tmp_path):
  sd = torch_pickle.load(FIXTURES / "plain_3d.pt")
  plans = json.loads((FIXTURES / "plain_plans.json").read_text())
  kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
  kwargs["features_per_stage"] = [4, 8, 32]
  other = tmp_path / "plans.json"
  other.write_text(json.dumps(plans))
  plan = nnunet_plans.load_plans(other, "3d_fullres")
  with pytest.raises(errors.CheckpointError,
                     match=r"encoder.stages.2.0.convs.0.conv.weight has shape \(16, 8, 3, 3, 3\).*"
                           r"needs \(32, 8, 3, 3, 3\)"):
    nnunet_weights.load_state_dict(sd, plan)
  plain = plan_of("plain_3d")
  with pytest.raises(errors.CheckpointError, match=r"seg_layers.0.weight.*\(3, 8, 1, 1, 1\).*"
                                                   r"needs \(2, 8, 1, 1, 1\)"):
    nnunet_weights.load_state_dict(sd, plain, num_classes=2)
  with pytest.raises(errors.CheckpointError, match="key encoder.stem.convs.0.conv.weight is "
                                                   "missing"):
    nnunet_weights.load_state_dict(sd, plan_of("resenc_3d"))
  extra = dict(sd, **{"encoder.stages.3.0.convs.0.conv.weight": np.zeros((1,), np.float32)})
  with pytest.raises(errors.CheckpointError, match="first encoder.stages.3.0.convs.0.conv.weight"):
    nnunet_weights.load_state_dict(extra, plain)
  with pytest.raises(errors.MissingPathError):
    nnunet_weights.import_nnunet_checkpoint(tmp_path / "nope.pth", plain)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(errors.CheckpointError):
    nnunet_weights.import_nnunet_checkpoint(junk, plain)


def test_export_loads_strictly_into_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("dynamic_network_architectures")
  plan = plan_of("plain_3d")
  arch = dict(plan.raw["architecture"]["arch_kwargs"])
  for k in plan.raw["architecture"]["_kw_requires_import"]:
    arch[k] = pydoc.locate(arch[k]) if arch[k] is not None else None
  net = pydoc.locate(plan.network_class_name)(input_channels=2, num_classes=1, **arch).eval()
  model = nnunet.build(plan, 1)
  x = np.random.default_rng(1).normal(size=(2, 2) + plan.to_plans(plan.patch_size))
  x = x.astype(np.float32)
  params = restoration_params(plan, "plain_3d", seed=1)
  sd = nnunet_weights.export_state_dict(params, plan)
  net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    y_torch = net(torch.from_numpy(x)).numpy()
  y = jax.jit(model.apply)({"params": params}, to_ours(x, plan))
  np.testing.assert_allclose(np.asarray(y), to_ours(y_torch, plan), atol=1e-4, rtol=0)
  # The written file as nnU-Net's load_pretrained_weights reads it (torch.load, default
  # weights_only=True too), into its 3-class network: everything but the seg layers.
  path = tmp_path / "pretrained.pth"
  nnunet_weights.write_nnunet_checkpoint(path, params, plan)
  seg_net = pydoc.locate(plan.network_class_name)(input_channels=2, num_classes=3, **arch)
  model_dict = seg_net.state_dict()
  pretrained = torch.load(path)["network_weights"]
  pretrained = {k: v for k, v in pretrained.items() if ".seg_layers." not in k}
  assert all(pretrained[k].shape == v.shape for k, v in model_dict.items()
             if ".seg_layers." not in k)
  model_dict.update(pretrained)
  seg_net.load_state_dict(model_dict)
  key = "encoder.stages.0.0.convs.0.conv.weight"
  np.testing.assert_array_equal(seg_net.state_dict()["decoder." + key].numpy(), sd[key])
