"""Fine-tuning and prediction with an nnU-Net plans' network (model.kind='nnunet', issue 20):
from scratch, from a model.kind='nnunet' pre-training, from an nnU-Net .pth (seg layers kept when
the class count matches), predict from a fine-tuned run and from a checkpoint_final.pth + plans,
and the errors (shapes that do not fit the plans, no plans, classification)."""
from __future__ import annotations

import json
import math
import pathlib

import jax
import nibabel as nib
import numpy as np
import pytest
from flax import traverse_util

from genesis_jax import errors, predict
from genesis_jax.config import nnunet_plans, validate
from genesis_jax.models import nnunet
from genesis_jax.train import finetune, pretrain
from genesis_jax.train import step as step_lib
from genesis_jax.weights import nnunet as nnunet_weights
from genesis_jax.weights import torch_pickle, transfer

from conftest import tiny_pretrain_config, tiny_task_config

N_STAGES = 2


def write_plans(path: pathlib.Path, features=(4, 8)) -> pathlib.Path:
  """A tiny nnU-Net v2 plans file: PlainConvUNet, 2 stages, patch (x, y, z) 16 x 16 x 8 (plans
  order [8, 16, 16]), spacing 1 x 1 x 2 mm, CTNormalization."""
  n = len(features)
  arch = {"n_stages": n, "features_per_stage": list(features),
          "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
          "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
          "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
          "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
  plans = {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
           "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
           "configurations": {"3d_fullres": {
               "patch_size": [8, 16, 16], "spacing": [2.0, 1.0, 1.0], "batch_size": 2,
               "normalization_schemes": ["CTNormalization"], "architecture": {
                   "network_class_name":
                       "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                   "arch_kwargs": arch}}},
           "foreground_intensity_properties_per_channel": {"0": {
               "mean": -300.0, "std": 400.0, "percentile_00_5": -1000.0,
               "percentile_99_5": 600.0}}}
  path.write_text(json.dumps(plans))
  return path


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> pathlib.Path:
  return write_plans(tmp_path_factory.mktemp("plans") / "nnUNetPlans.json")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
  from genesis_jax.data import phantoms as phantoms_lib
  root = tmp_path_factory.mktemp("nnunet_task_phantoms") / "p"
  return phantoms_lib.write_phantom_dataset(root, 6, seed=1, shape=(48, 48, 32))


def task_config(plans, phantoms, init=""):
  """Fine-tuning NCS-style segmentation with the tiny plans' network: 2 steps, 1 test case."""
  c = tiny_task_config("segment", phantoms, init)
  c.model.kind, c.model.plans = "nnunet", str(plans)
  c.model.width = 32  # The Genesis U-Net's key at its default: the plans decide the network.
  c.model.conv_impl = "native"  # XLA's conv: the shortest compile
  c.data.phantom_shape = (48, 48, 32)
  c.data.train_cases, c.data.val_cases, c.data.test_cases = 3, 2, 1
  c.data.cubes_per_case = 4
  c.train.batch_size = 4
  c.num_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 1
  return c


def n_params(plan, n_class=1) -> int:
  return len(jax.tree.leaves(nnunet_weights.expected_params(plan, n_class)))


def seg_leaves() -> int:
  return 2 * (N_STAGES - 1)  # kernel and bias of each decoder stage's seg layer


def random_params(plan, n_class, seed=3):
  model = nnunet.build(plan, n_class)
  x = np.zeros((1, *plan.patch_size, 1), np.float32)
  return jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(seed), x))["params"]


def flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, plans, phantoms):
  workdir = tmp_path_factory.mktemp("nnunet_scratch")
  summary = finetune.train(task_config(plans, phantoms), workdir)
  return workdir, summary


def test_finetune_from_scratch(scratch_run, plans, phantoms):
  workdir, summary = scratch_run
  assert summary["final_step"] == 2 and math.isfinite(summary["final_train_loss"])
  assert math.isfinite(summary["best_val_loss"])
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["kind"] == "nnunet"
  assert tuple(saved["data"]["crop"]) == (16, 16, 8)  # from the plans
  assert tuple(saved["data"]["spacing"]) == (1.0, 1.0, 2.0)
  ev = json.loads((workdir / "eval.json").read_text())
  assert ev["n"] == 1 and 0.0 <= ev["mean_iou"] <= 1.0
  best, _ = transfer.load_pretrained(str(workdir), which="best")
  assert set(best["params"]) == {"encoder", "decoder"}  # the plans' network
  assert not (workdir / "transfer_report.json").exists()
  # mode=evaluate rebuilds the plans' network and tests the same best checkpoint again.
  config = task_config(plans, phantoms)
  config.mode = "evaluate"
  again = finetune.evaluate(validate.resolve_nnunet(config), workdir)
  assert again["mean_iou"] == pytest.approx(ev["mean_iou"], abs=1e-6)


def test_finetune_from_pth(tmp_path, plans, phantoms):
  """An nnU-Net checkpoint with the task's class count: every layer loads, seg layers included;
  the loaded values are the file's."""
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  params = random_params(plan, 1)
  pth = tmp_path / "checkpoint_final.pth"
  torch_pickle.save({"network_weights": nnunet_weights.export_state_dict(params, plan)}, str(pth))
  config = task_config(plans, phantoms, pth)
  config.finetune.freeze_encoder = True  # so the encoder in the best checkpoint is the file's
  summary = finetune.train(config, tmp_path / "run")
  assert math.isfinite(summary["final_train_loss"])
  report = json.loads((tmp_path / "run" / "transfer_report.json").read_text())
  assert len(report["loaded"]) == n_params(plan) and not report["fresh"]
  best, _ = transfer.load_pretrained(str(tmp_path / "run"), which="best")
  for k, v in flat(params["encoder"]).items():
    np.testing.assert_array_equal(flat(best["params"]["encoder"])[k], v, err_msg=k)


def test_pth_seg_layers_of_another_class_count_or_a_genesis_export_are_fresh(tmp_path, plans):
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  three = tmp_path / "three.pth"
  torch_pickle.save({"network_weights": nnunet_weights.export_state_dict(
      random_params(plan, 3), plan)}, str(three))
  loaded, info = transfer.load_nnunet_checkpoint(three, plan, 2)
  assert info == {"classes": 3, "seg_loaded": False, "genesis_export": False}
  assert not any(k.startswith("seg_") for k in loaded["params"]["decoder"])
  # Own class count (predict): the seg layers are read.
  loaded, info = transfer.load_nnunet_checkpoint(three, plan)
  assert info["seg_loaded"] and loaded["params"]["decoder"]["seg_0"]["kernel"].shape[-1] == 3
  # A genesis_jax pre-training export: its 1-channel restoration head never becomes the task's.
  export = tmp_path / "nnunet_pretrained.pth"
  nnunet_weights.write_nnunet_checkpoint(export, random_params(plan, 1), plan)
  _, info = transfer.load_nnunet_checkpoint(export, plan, 1)
  assert info == {"classes": 1, "seg_loaded": False, "genesis_export": True}
  with pytest.raises(errors.CheckpointError, match="export has no segmentation head"):
    transfer.load_nnunet_checkpoint(export, plan)


def test_finetune_from_nnunet_pretraining(tmp_path, tiny_dataset, plans, phantoms):
  """(b): a model.kind='nnunet' pre-training workdir; all but the seg layers load."""
  pre = tiny_pretrain_config(tiny_dataset, 2, eval_every=2)
  pre.model.kind, pre.model.plans = "nnunet", str(plans)
  pre.model.width = 32
  pre.model.conv_impl = "native"
  pre.corruption.transforms = "nonlinear"  # the cheapest to compile: this is about the transfer
  pre.data.crop = (16, 16, 8)
  pre.data.spacing = (1.0, 1.0, 2.0)
  pretrain.train(pre, tmp_path / "pre")
  config = task_config(plans, phantoms, tmp_path / "pre")
  config.finetune.pretrained_lr_mult = 0.0  # loaded leaves stay; the fresh seg layers train
  summary = finetune.train(config, tmp_path / "ft")
  assert math.isfinite(summary["final_train_loss"])
  report = json.loads((tmp_path / "ft" / "transfer_report.json").read_text())
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  assert len(report["loaded"]) == n_params(plan) - seg_leaves()
  assert len(report["fresh"]) == seg_leaves()
  assert all("/decoder/seg_" in p for p in report["fresh"])
  pre_params = flat(transfer.load_pretrained(str(tmp_path / "pre"))[0]["params"])
  best = flat(transfer.load_pretrained(str(tmp_path / "ft"), which="latest")[0]["params"])
  for k in report["loaded"]:
    np.testing.assert_array_equal(best[k.split("/", 1)[1]], pre_params[k.split("/", 1)[1]])
  # The fresh output layer trained: it moved from the run's own initialisation.
  model = finetune.build_task_model(config.model, "segment", 1)
  init = flat(step_lib.init_variables(model, (16, 16, 8, 1), config.seed)["params"])
  seg = f"decoder/seg_{N_STAGES - 2}/kernel"
  assert init[seg].shape == best[seg].shape and not np.allclose(best[seg], init[seg])


def test_pth_of_other_plans_is_an_error_naming_the_key(tmp_path, plans):
  """What finetune.init=PATH.pth reads (transfer.load_nnunet_checkpoint) refuses a checkpoint of
  other plans, naming the first key whose shape differs."""
  other = nnunet_plans.load_plans(write_plans(tmp_path / "other.json", (4, 16)), "3d_fullres")
  pth = tmp_path / "other.pth"
  torch_pickle.save({"network_weights": nnunet_weights.export_state_dict(
      random_params(other, 1), other)}, str(pth))
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  with pytest.raises(errors.CheckpointError, match=r"encoder\.stages\.1\.0\.convs\.0\.conv\.weight "
                     r"has shape \(16, 4, 3, 3, 3\)"):
    transfer.load_nnunet_checkpoint(pth, plan, 1)


def test_config_errors(plans, phantoms):
  config = task_config("", phantoms)
  with pytest.raises(errors.ConfigError, match="needs config.model.plans"):
    validate.validate(config)
  config = task_config(plans, phantoms)
  config.task.kind = "classify"
  with pytest.raises(errors.ConfigError, match="only task.kind='segment'"):
    validate.validate(config)
  config = tiny_task_config("segment", phantoms)
  config.predict.checkpoint = "checkpoint_final.pth"
  with pytest.raises(errors.ConfigError, match="set config.model.kind='nnunet'"):
    validate.validate(config)


def write_scan(path: pathlib.Path) -> nib.Nifti1Image:
  """A small CT-like NIfTI (RAS+ affine, 1 x 1 x 2 mm) with a bright sphere."""
  rng = np.random.default_rng(0)
  hu = rng.normal(-800, 30, (20, 18, 9)).astype(np.float32)
  g = np.indices(hu.shape)
  hu[((g[0] - 10) ** 2 + (g[1] - 9) ** 2 + (2 * (g[2] - 4)) ** 2) < 16] = 40.0
  img = nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0]) + np.eye(4, k=3) * 0 +
                        np.array([[0, 0, 0, -5.0], [0, 0, 0, 7.0], [0, 0, 0, 3.0], [0] * 4]))
  nib.save(img, str(path))
  return img


def test_predict_from_a_finetuned_run_and_from_a_checkpoint(tmp_path, scratch_run, plans,
                                                            phantoms):
  workdir, _ = scratch_run
  scan = write_scan(tmp_path / "case_001_0000.nii.gz")
  config = task_config(plans, phantoms)
  config.mode = "predict"
  config.predict.input = str(tmp_path / "case_001_0000.nii.gz")
  config.predict.output = str(tmp_path / "out_run")
  validate.validate(config)
  result = predict.run(validate.resolve_nnunet(config), workdir)
  out = nib.load(result["written"][0]["output"])
  assert out.shape == scan.shape and result["written"][0]["output"].endswith("case_001_pred.nii.gz")
  np.testing.assert_allclose(out.affine, scan.affine, atol=1e-5)
  # checkpoint_final.pth + plans, no run of ours: 2 classes (softmax), a label map.
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  pth = tmp_path / "checkpoint_final.pth"
  torch_pickle.save({"network_weights": nnunet_weights.export_state_dict(
      random_params(plan, 2), plan)}, str(pth))
  config.predict.checkpoint = str(pth)
  config.predict.output = str(tmp_path / "out_pth")
  validate.validate(config)
  result = predict.run(validate.resolve_nnunet(config), tmp_path / "no_run_here")
  out = nib.load(result["written"][0]["output"])
  assert out.shape == scan.shape and result["checkpoint"] == str(pth)
  np.testing.assert_allclose(out.affine, scan.affine, atol=1e-5)
  assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}


def test_checkpoint_predictor_reproduces_nnunet_ct_normalization(tmp_path, plans, phantoms):
  """predict.checkpoint's windows: HU clipped to the plans' percentiles, minus the mean, over the
  std (nnU-Net's CTNormalization), fed to the checkpoint's network with its own seg layers."""
  from genesis_jax.data import preprocess as preprocess_lib
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  params = random_params(plan, 2)
  pth = tmp_path / "checkpoint_final.pth"
  torch_pickle.save({"network_weights": nnunet_weights.export_state_dict(params, plan)}, str(pth))
  config = task_config(plans, phantoms)
  config.mode, config.predict.input, config.predict.checkpoint = "predict", "x.nii.gz", str(pth)
  run_cfg, apply = predict.nnunet_checkpoint_predictor(validate.resolve_nnunet(config))
  assert run_cfg.task.n_class == 2 and tuple(run_cfg.data.crop) == (16, 16, 8)
  hu = np.random.default_rng(1).uniform(-1500, 1500, (2, 16, 16, 8, 1)).astype(np.float32)
  ours = np.asarray(apply(preprocess_lib.normalize_intensity(hu, run_cfg.data)))
  z = (np.clip(hu, -1000.0, 600.0) - (-300.0)) / 400.0
  logits = nnunet.build(plan, 2).apply({"params": params}, z)
  np.testing.assert_allclose(ours, np.asarray(jax.nn.softmax(logits, axis=-1)), atol=1e-5)
