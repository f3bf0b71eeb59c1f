"""Genesis pre-training of an nnU-Net plans' network (model.kind='nnunet'): config errors, the
plans' patch size and spacing, the nnU-Net raw folder as data, long-axis shuffling, and a tiny
pre-training -> export -> re-import round trip."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from genesis_jax import corruptions, errors
from genesis_jax.config import nnunet_plans, schema, validate
from genesis_jax.data import manifest, prepare
from genesis_jax.models import nnunet
from genesis_jax.train import pretrain
from genesis_jax.weights import nnunet as nnunet_weights
from genesis_jax.weights import nnunet_cli, transfer

from conftest import tiny_pretrain_config


def write_plans(path: pathlib.Path, patch, features=(4, 8, 16), kernels=None, strides=None,
                spacing=None, configuration="3d_fullres") -> pathlib.Path:
  """A minimal nnU-Net v2 plans file (PlainConvUNet); per-axis lists in the plans' (z, y, x)."""
  dims, n = len(patch), len(features)
  kernels = kernels or [[3] * dims] * n
  strides = strides or [[1] * dims] + [[2] * dims] * (n - 1)
  arch = {"n_stages": n, "features_per_stage": list(features),
          "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": kernels,
          "strides": strides, "n_conv_per_stage": [2] * n,
          "n_conv_per_stage_decoder": [2] * (n - 1),
          "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
          "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
  plans = {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
           "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
           "configurations": {configuration: {
               "patch_size": list(patch), "spacing": spacing or [2.0] + [1.0] * (dims - 1),
               "batch_size": 2, "architecture": {
                   "network_class_name":
                       "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                   "arch_kwargs": arch}}},
           "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0}}}
  path.write_text(json.dumps(plans))
  return path


@pytest.fixture
def tiny_plans(tmp_path) -> pathlib.Path:
  """3 stages, 4/8/16 features, patch (x, y, z) = 16 x 16 x 8 (plans order [8, 16, 16])."""
  return write_plans(tmp_path / "nnUNetPlans.json", [8, 16, 16],
                     strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])


def nnunet_config(plans, **data):
  c = schema.pretrain_config()
  c.model.kind = "nnunet"
  c.model.plans = str(plans)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_config_errors(tmp_path, tiny_plans):
  c = nnunet_config("")
  with pytest.raises(errors.ConfigError, match="needs config.model.plans"):
    validate.validate(c)
  with pytest.raises(errors.MissingPathError, match="nope.json"):
    validate.validate(nnunet_config(tmp_path / "nope.json"))
  c = nnunet_config(tiny_plans)
  c.model.configuration = "3d_lowres"
  with pytest.raises(errors.ConfigError, match="'3d_lowres' does not exist.*3d_fullres"):
    validate.validate(c)
  with pytest.raises(errors.ConfigError,
                     match=r"data.crop=\(32, 32, 16\) conflicts.*\(16, 16, 8\)"):
    validate.validate(nnunet_config(tiny_plans, crop=(32, 32, 16)))
  with pytest.raises(errors.ConfigError, match=r"data.spacing=\(1.0, 1.0, 1.0\) conflicts"):
    validate.validate(nnunet_config(tiny_plans, spacing=(1.0, 1.0, 1.0)))
  c = nnunet_config(tiny_plans)
  c.model.width = 8
  with pytest.raises(errors.ConfigError, match="model.width=8 applies to config.model.kind="):
    validate.validate(c)
  c = nnunet_config(tiny_plans)
  c.pretrain.skip_drop_rate = 0.5  # The plans' networks take the U-Net's skip mask too.
  validate.validate(c)
  validate.validate(nnunet_config(tiny_plans, crop=(16, 16, 8)))  # The plans' own values pass.


def test_plans_set_patch_spacing_and_dims(tmp_path):
  plans = write_plans(tmp_path / "p.json", [8, 32, 16], kernels=[[1, 3, 3], [3, 3, 3]],
                      strides=[[1, 1, 1], [1, 2, 2]], features=(4, 8), spacing=[3.0, 0.5, 0.7])
  c = nnunet_config(plans)
  validate.validate(c)
  r = validate.resolve_nnunet(c)
  assert tuple(r.data.crop) == (16, 32, 8) and tuple(r.data.spacing) == (0.7, 0.5, 3.0)
  assert tuple(c.data.crop) == schema.default("data.crop")  # The given config is left as it was.
  # The block count keeps the original's cover of 64 x 64 x 32 (block sizes scale per axis).
  assert validate.local_blocks_for((64, 64, 32)) == 10_000
  assert r.corruption.local_blocks == validate.local_blocks_for((16, 32, 8)) < 10_000
  assert validate.local_blocks_for((128, 128, 128)) > 10_000
  c.corruption.local_blocks = 500  # Set by the user: kept.
  assert validate.resolve_nnunet(c).corruption.local_blocks == 500
  plans2d = write_plans(tmp_path / "p2.json", [32, 16], features=(4, 8), spacing=[0.5, 0.7],
                        configuration="2d")
  c = nnunet_config(plans2d)
  c.model.configuration = "2d"
  validate.validate(c)
  r = validate.resolve_nnunet(c)
  assert tuple(r.data.crop) == (16, 32) and r.model.spatial_dims == 2
  assert tuple(r.data.spacing) == ()  # 2D plans give no slice spacing: no resampling.
  assert r.corruption.local_blocks == schema.default("corruption.local_blocks")
  g = schema.pretrain_config()
  assert validate.resolve_nnunet(g) is g


def test_shipped_phantom_plans_load():
  config_file = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pretrain_nnunet.py"
  from genesis_jax.config import loading
  c = loading.load_config_file(str(config_file))
  validate.validate(c)
  r = validate.resolve_nnunet(c)
  assert tuple(r.data.crop) == (32, 32, 16)
  assert all(a >= b for a, b in zip(r.data.phantom_shape, r.data.crop))


def test_cubes_that_do_not_fit_the_plans_are_named(tiny_plans):
  c = nnunet_config(tiny_plans).model
  with pytest.raises(errors.DataError, match=r"cubes are \(32, 32, 16\).*\(16, 16, 8\)"):
    pretrain.build_restoration_model(c, (32, 32, 16, 1))
  with pytest.raises(errors.DataError, match="2 channel"):
    pretrain.build_restoration_model(c, (16, 16, 8, 2))


def write_nifti(path: pathlib.Path, data: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def test_nnunet_raw_dataset_folder_is_a_folder_of_scans(tmp_path, tiny_plans):
  """Dataset999_Tiny/{dataset.json, imagesTr, labelsTr, imagesTs}: the images are prepared at
  the plans' patch size and spacing, the label maps are skipped."""
  root = tmp_path / "Dataset999_Tiny"
  rng = np.random.default_rng(0)
  for name in ("imagesTr/tiny_000_0000.nii.gz", "imagesTr/tiny_001_0000.nii.gz",
               "imagesTs/tiny_100_0000.nii.gz"):
    write_nifti(root / name, rng.uniform(-1000, 1000, (40, 40, 20)).astype(np.float32))
  write_nifti(root / "labelsTr/tiny_000.nii.gz", np.zeros((40, 40, 20), np.uint8))
  (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                 "labels": {"background": 0, "x": 1},
                                                 "numTraining": 2, "file_ending": ".nii.gz"}))
  c = nnunet_config(tiny_plans, source="folder", path=str(root), cubes_per_scan=2)
  validate.validate(c)
  c = validate.resolve_nnunet(c)
  out = prepare.ensure_dataset(c.data, tmp_path / "work", seed=0)
  m = manifest.load_manifest(out)
  sources = sorted(pathlib.Path(s["source"]).name for s in m["shards"])
  assert sources == ["tiny_000_0000.nii.gz", "tiny_001_0000.nii.gz", "tiny_100_0000.nii.gz"]
  assert all(s["prepared_spacing"] == [1.0, 1.0, 2.0] for s in m["shards"])
  cubes = np.load(out / m["shards"][0]["file"])
  assert cubes.shape[1:4] == (16, 16, 8)


def test_nnunet_preprocessed_folder_is_read_back_to_hu(tmp_path):
  """nnUNet_preprocessed/<dataset>/nnUNetPlans_3d_fullres/<case>.npz (and unpacked .npy): channel
  0, plans' (z, y, x) -> our (x, y, z), spacing from the plans, CTNormalization undone to HU; the
  _seg files are skipped."""
  from genesis_jax.data import nnunet_preprocessed
  root = tmp_path / "Dataset999_Tiny"
  root.mkdir()
  plans_path = write_plans(root / "nnUNetPlans.json", [8, 16, 16], spacing=[2.5, 0.5, 0.75])
  plans = json.loads(plans_path.read_text())
  cfg = plans["configurations"]["3d_fullres"]
  cfg["data_identifier"] = "nnUNetPlans_3d_fullres"
  cfg["normalization_schemes"] = ["CTNormalization"]
  plans["foreground_intensity_properties_per_channel"] = {"0": {"mean": 40.0, "std": 200.0}}
  plans_path.write_text(json.dumps(plans))
  folder = root / "nnUNetPlans_3d_fullres"
  folder.mkdir()
  rng = np.random.default_rng(0)
  hu = {c: rng.uniform(-1000, 1000, (36, 30, 20)).astype(np.float32) for c in ("a", "b")}
  zyx = lambda v: ((v - 40.0) / 200.0).transpose(2, 1, 0)[None]  # (C, z, y, x), z-scored
  np.savez(folder / "a.npz", data=zyx(hu["a"]), seg=np.zeros((1, 20, 30, 36), np.int8))
  np.save(folder / "b.npy", zyx(hu["b"]))
  np.save(folder / "b_seg.npy", np.zeros((1, 20, 30, 36), np.int8))
  assert [p.name for p in nnunet_preprocessed.find_cases(folder)] == ["a.npz", "b.npy"]
  vol = nnunet_preprocessed.load_case(folder / "a.npz")
  np.testing.assert_allclose(vol.data, hu["a"], atol=1e-3)
  assert vol.spacing == (0.75, 0.5, 2.5)
  c = nnunet_config(plans_path, source="folder", path=str(folder), cubes_per_scan=2)
  validate.validate(c)
  out = prepare.ensure_dataset(validate.resolve_nnunet(c).data, tmp_path / "work", seed=0)
  m = manifest.load_manifest(out)
  assert sorted(pathlib.Path(s["source"]).name for s in m["shards"]) == ["a.npz", "b.npy"]
  assert np.load(out / m["shards"][0]["file"]).shape[1:4] == (16, 16, 8)
  assert nnunet_preprocessed.plans_of(root) is None  # A dataset folder is not a case folder.


def test_nnunet_preprocessed_b2nd(tmp_path):
  """nnU-Net 2.5+ writes <case>.b2nd (blosc2, an optional dependency: skipped without it)."""
  blosc2 = pytest.importorskip("blosc2")
  from genesis_jax.data import nnunet_preprocessed
  plans_path = write_plans(tmp_path / "nnUNetPlans.json", [8, 16, 16])
  plans = json.loads(plans_path.read_text())
  plans["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_3d_fullres"
  plans_path.write_text(json.dumps(plans))
  (tmp_path / "nnUNetPlans_3d_fullres").mkdir()
  data = np.random.default_rng(0).normal(size=(1, 10, 12, 14)).astype(np.float32)
  blosc2.asarray(data, urlpath=str(tmp_path / "nnUNetPlans_3d_fullres" / "c.b2nd"), mode="w")
  vol = nnunet_preprocessed.load_case(tmp_path / "nnUNetPlans_3d_fullres" / "c.b2nd")
  np.testing.assert_array_equal(vol.data, data[0].transpose(2, 1, 0))  # No CTNormalization.


def test_local_shuffle_on_long_axes():
  """Axes of 90 voxels or more (nnU-Net patch sizes): blocks up to s//10 per axis, each a
  bijection of its block; every voxel's source lies inside a block around it."""
  shape = (96, 20, 10)
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape + (1,))
  shuffle = jax.jit(corruptions.local_shuffle, static_argnums=2)
  for seed in range(2):
    one = np.asarray(shuffle(jax.random.PRNGKey(seed), x, 1))
    assert np.array_equal(np.sort(one.ravel()), np.asarray(x).ravel())
  y = np.asarray(shuffle(jax.random.PRNGKey(7), x, 400)).astype(np.int64)[..., 0]
  src = np.stack(np.unravel_index(y, shape), -1)
  step = np.abs(src - np.stack(np.indices(shape), -1)).max(axis=(0, 1, 2))
  assert (step < np.array([9, 2, 1])).all() and step[0] >= 5  # Long axis: blocks past 8 voxels.
  assert float(np.mean(y != np.asarray(x)[..., 0])) > 0.05


def test_pretrain_export_reimport(tmp_path, tiny_dataset, tiny_plans):
  """2 steps on phantom cubes, the best checkpoint exported at the end, `nnunet_cli export` of
  the latest; both import back to the same parameters and outputs."""
  c = tiny_pretrain_config(tiny_dataset, 2, eval_every=2)
  c.model.width = schema.default("model.width")
  c.model.kind = "nnunet"
  c.model.plans = str(tiny_plans)
  c.corruption.transforms = "nonlinear"  # The cheapest to compile: this test is about the network.
  c.pretrain.skip_drop_rate = 0.5  # The U-Net's skip mask reaches the plans' network too.
  c.model.conv_impl = "native"  # Shorter compiles than unfold at this size.
  validate.validate(c)
  work = tmp_path / "run"
  pretrain.train(c, work)
  plan = nnunet_plans.load_plans(tiny_plans, "3d_fullres")
  model = nnunet.build(plan, num_classes=1)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 8, 1))
  for which, path in (("best", work / nnunet_cli.EXPORT_NAME),
                      ("latest", nnunet_cli.export(work, tmp_path / "latest.pth", which="latest"))):
    ours, _ = transfer.load_pretrained(str(work), which=which)
    back = nnunet_weights.import_nnunet_checkpoint(path, plan)
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(ours["params"]))
    flat_back = dict(jax.tree_util.tree_leaves_with_path(back))
    assert flat_ours.keys() == flat_back.keys()
    for k in flat_ours:
      np.testing.assert_array_equal(np.asarray(flat_ours[k]), np.asarray(flat_back[k]))
    y_ours = model.apply({"params": ours["params"]}, x)
    y_back = model.apply({"params": back}, x)
    np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_back))
  summary = json.loads((work / "summary.json").read_text())
  assert summary["final_step"] == 2


def test_export_refuses_a_genesis_workdir(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"kind": "genesis"}}))
  with pytest.raises(errors.ConfigError, match="only model.kind='nnunet' runs export"):
    nnunet_cli.export(tmp_path, tmp_path / "x.pth")


def test_bench_runs_both_frameworks_from_the_same_weights(tmp_path, tiny_plans):
  """bench/bench_nnunet.py (torch is a bench-only dependency: skipped without it) at tiny size:
  both children run and start from the same loss (same weights, same batch)."""
  pytest.importorskip("torch")
  pytest.importorskip("dynamic_network_architectures")
  import os
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[2]
  out = tmp_path / "bench.jsonl"
  env = dict(os.environ, PYTHONPATH=str(repo))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "bench/bench_nnunet.py", "--plans", str(tiny_plans),
                         "--steps", "1", "--warmup", "1", "--rounds", "1", "--out", str(out)],
                        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  summary = json.loads(out.read_text().splitlines()[-1])
  assert summary["jax_s_per_step"] > 0 and summary["torch_s_per_step"] > 0
  assert abs(summary["first_loss"]["jax"] - summary["first_loss"]["torch"]) < 1e-4
