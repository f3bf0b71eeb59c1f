"""The 2D-vs-3D comparison on the 3D phantom tasks (configs/experiment_phantom.py:2d3d): a 2D model
fine-tuned on the candidates' axial slices end to end, orthogonal slices, pre-training variants
with their own config file, the user-weights arm, and the bar chart with significance marks."""
from __future__ import annotations

import json
import pathlib
import runpy

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_task_config
from genesis_jax import errors
from genesis_jax.config import loading, validate
from genesis_jax.data import tasks
from genesis_jax.experiments import report, trials

CONFIG = "configs/experiment_phantom.py:2d3d"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
  from genesis_jax.data import phantoms as phantoms_lib
  root = tmp_path_factory.mktemp("ph2d3d") / "p"
  return phantoms_lib.write_phantom_dataset(root, 7, seed=1, shape=(64, 64, 48))


def _config_2d(phantoms, crop=(16, 16)):
  c = tiny_task_config("classify", phantoms)
  c.model.spatial_dims = len(crop)
  c.data.crop = crop
  return c


def test_2d_finetune_on_the_3d_ncc_task_end_to_end(tmp_path, phantoms):
  from genesis_jax.train import finetune
  c = _config_2d(phantoms)
  c.num_steps, c.eval_every, c.checkpoint_every = 2, 2, 2
  validate.validate(c)
  data = tasks.load(c, tmp_path)
  data3 = tasks.load(_config_2d(phantoms, (16, 16, 8)), tmp_path)
  for split in ("train", "test"):  # Each sample is its candidate's central axial slice.
    x2, x3 = data[split][0], data3[split][0]
    assert x2.shape == (len(x3), 16, 16, 1)
    np.testing.assert_array_equal(x2[..., 0], x3[:, :, :, 4, 0])
    np.testing.assert_array_equal(data[split][1], data3[split][1])
  finetune.train(c, tmp_path / "run")
  ev = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert ev["kind"] == "classify" and ev["n"] == len(data["test"][1])
  assert 0.0 <= ev["auc"] <= 1.0


def test_2d_segmentation_trains_on_axial_slices_and_tests_on_whole_volumes(tmp_path, phantoms):
  c = _config_2d(phantoms)
  c.task.kind = "segment"
  c.data.fg_fraction = 1.0
  validate.validate(c)
  data = tasks.load(c, tmp_path)
  x, y = data["train"]
  assert x.shape == y.shape == (3 * c.data.cubes_per_case, 16, 16, 1)
  assert all(m.any() for m in y)  # Each slice goes through a foreground voxel of its case.
  assert [v.shape for v, _ in data["test_volumes"]] == [(64, 64, 48)] * 2  # Slice-wise later.


def test_orthogonal_slices_are_three_channels_of_the_cube(tmp_path, phantoms):
  c = _config_2d(phantoms)
  c.data.slices = "orthogonal"
  validate.validate(c)
  x, _ = tasks.load(c, tmp_path)["val"]
  cube, _ = tasks.load(_config_2d(phantoms, (16, 16, 16)), tmp_path)["val"]
  assert x.shape == (len(cube), 16, 16, 3)
  np.testing.assert_array_equal(x[..., 0], cube[:, :, :, 8, 0])  # axial (x, y)
  np.testing.assert_array_equal(x[..., 1], cube[:, :, 8, :, 0])  # coronal (x, z)
  np.testing.assert_array_equal(x[..., 2], cube[:, 8, :, :, 0])  # sagittal (y, z)
  c.task.kind = "segment"
  with pytest.raises(errors.ConfigError, match="slices='orthogonal'.*task.kind='classify'"):
    validate.validate(c)


def test_the_variant_and_its_pretraining_variants(monkeypatch):
  monkeypatch.chdir(REPO)
  config = loading.load_config_file(CONFIG)
  validate.validate(config)
  trials.check_trial_configs(config)
  exp = config.experiment
  assert [a for a, _, _ in trials.arms_of(exp)] == [
      "scratch_2d", "genesis_ct_2d", "genesis_xray_2d", "scratch", "genesis"]
  xray, ct2d, ct3d = (trials.pretrain_config(exp, v) for v in ("xray2d", "ct2d", ""))
  assert trials.pretrain_file(exp, "xray2d") == "configs/pretrain_xray2d.py:faithful"
  assert (xray.data.source, ct2d.data.source, ct3d.data.source) == (
      "phantom_xray", "phantom", "phantom")
  assert xray.model.spatial_dims == ct2d.model.spatial_dims == 2 and ct3d.model.spatial_dims == 3
  # Genesis CT 3D is `:faithful`'s pre-training; the 2D ones its recipe on 32 x 32 crops.
  faithful = loading.load_config_file("configs/pretrain_phantom.py:faithful")
  assert ct3d.to_dict() == faithful.to_dict()
  assert tuple(ct2d.data.crop) == tuple(xray.data.crop) == (32, 32)
  assert (ct2d.data.lung_filter, ct2d.data.sampler) == (True, "lung_centred")
  # The 2D pre-trainings differ in their data only; the optimiser is the faithful recipe's.
  for key in ("num_steps", "train.batch_size", "data.crop", "corruption.local_blocks",
              "train.schedule", "model.width", "train.optimizer", "train.learning_rate",
              "train.momentum", "train.decay_every", "train.decay_factor",
              "train.early_stop_patience", "eval_every", "data.phantom_subjects"):
    assert loading.flatten(xray)[key] == loading.flatten(ct2d)[key], key
    if key not in ("data.crop", "corruption.local_blocks"):
      assert loading.flatten(ct2d)[key] == loading.flatten(faithful)[key], key
  assert (xray.train.optimizer, xray.train.learning_rate, xray.train.momentum) == ("sgd", 1.0, 0.9)
  assert xray.data.cubes_per_scan * 2 == ct2d.data.cubes_per_scan  # 1,536 crops each (2 views).
  # experiment.pretrain_overrides are for experiment.pretrain_config, not a variant's own file.
  exp.pretrain_overrides = {"num_steps": 7}
  assert trials.pretrain_config(exp, "ct2d").num_steps == 7
  assert trials.pretrain_config(exp, "xray2d").num_steps == xray.num_steps
  exp.pretrain_variants.xray2d.overrides = {"model": {"width": 5}}
  assert trials.pretrain_config(exp, "xray2d").model.width == 5


def test_a_bad_own_config_variant_is_refused_before_anything_runs(monkeypatch):
  monkeypatch.chdir(REPO)
  config = loading.load_config_file(CONFIG)
  config.experiment.pretrain_variants.xray2d.config = ""
  with pytest.raises(errors.ConfigError, match="pretrain_variants.xray2d: a variant with its own "
                     "config file"):
    validate.validate(config)
  config.experiment.pretrain_variants.xray2d.config = "configs/pretrain_xray2d.py:faithful"
  config.experiment.pretrain_variants.xray2d.overrides = {"model": {"spatial_dims": 3}}
  with pytest.raises(errors.ConfigError, match=r"variant 'xray2d' of configs/pretrain_xray2d.py"):
    trials.check_trial_configs(config)


def test_user_2d_weights_arm(monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  module = runpy.run_path("configs/experiment_phantom.py")
  setup = module["setup_2d3d"]
  weights = tmp_path / "my_2d_encoder"
  weights.mkdir()
  monkeypatch.setitem(setup.__globals__, "USER_2D_WEIGHTS", str(weights))
  exp = module["get_config"]("2d3d").experiment
  assert exp.arms["user_2d"]["init"] == str(weights)
  assert exp.arms["user_2d"]["overrides"]["model"]["spatial_dims"] == 2
  assert ("user_2d", "scratch_2d") in [tuple(p) for p in exp.compare]
  monkeypatch.setitem(setup.__globals__, "USER_2D_WEIGHTS", str(tmp_path / "absent.pt"))
  with pytest.raises(errors.ConfigError, match="USER_2D_WEIGHTS=.*absent.pt' does not exist"):
    module["get_config"]("2d3d")


def test_runner_pretrains_each_variant_from_its_file_and_charts(monkeypatch, tmp_path):
  """The runner with stand-ins for pre-training and fine-tuning: each arm's init is its own
  pre-training's workdir, made from the right config; the report has the bar chart."""
  from genesis_jax.train import finetune, pretrain
  monkeypatch.chdir(REPO)
  config = loading.load_config_file(CONFIG)
  config.experiment.trials = 3
  pretrained, inits = {}, {}

  def fake_pretrain(cfg, run_dir):
    pretrained[pathlib.Path(run_dir).name] = (cfg.data.source, cfg.model.spatial_dims)
    pathlib.Path(run_dir).mkdir(parents=True)
    (pathlib.Path(run_dir) / "summary.json").write_text(json.dumps({"final_step": cfg.num_steps}))

  def fake_finetune(cfg, run_dir):
    run_dir = pathlib.Path(run_dir)
    inits[run_dir.parent.name] = (cfg.finetune.init, cfg.model.spatial_dims, tuple(cfg.data.crop))
    value = 0.5 + 0.1 * (run_dir.parent.name == "genesis") + 0.001 * cfg.seed
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"auc": value, "mean_iou": value}))

  monkeypatch.setattr(pretrain, "train", fake_pretrain)
  monkeypatch.setattr(finetune, "train", fake_finetune)
  summary = trials.run(config, tmp_path)
  assert pretrained == {"pretrain": ("phantom", 3), "pretrain_ct2d": ("phantom", 2),
                        "pretrain_xray2d": ("phantom_xray", 2)}
  assert inits["genesis_xray_2d"] == (str(tmp_path / "pretrain_xray2d"), 2, (32, 32))
  assert inits["genesis_ct_2d"][0] == str(tmp_path / "pretrain_ct2d")
  assert inits["scratch_2d"] == ("", 2, (32, 32)) and inits["genesis"][1] == 3
  ncc = summary["tasks"]["finetune_ncc"]
  assert [(c["arm"], c["vs"]) for c in ncc["comparisons"]] == [
      ("genesis_ct_2d", "scratch_2d"), ("genesis_xray_2d", "scratch_2d"), ("genesis", "scratch")]
  assert ncc["comparisons"][2]["welch_p"] < 1e-3
  for suffix in (".md", ".json", ".png", "_bars.png"):
    assert (tmp_path / f"results_2d3d{suffix}").is_file()


def test_the_2d_lung_filter_keeps_lung_centred_32_pixel_slices_and_no_64_pixel_ones(
    monkeypatch, tmp_path):
  """ct2d's data: the original's lung filter and lung-centred crops on 2D axial slices of the CT
  phantoms. Every kept 32 x 32 slice is centred on lung and under 15% of it is >= -150 HU; a 64 x
  64 slice is wider than a phantom lung, so the filter keeps none (hence PRETRAIN_2D)."""
  from genesis_jax.data import manifest, pipeline, prepare, sampling
  monkeypatch.chdir(REPO)
  exp = loading.load_config_file(CONFIG).experiment
  c = trials.pretrain_config(exp, "ct2d").data
  c.phantom_subjects, c.cubes_per_scan = 2, 8
  out = prepare.ensure_dataset(c, tmp_path / "a", seed=0)
  assert sum(s["count"] for s in manifest.validate_dataset(out)["shards"]) == 16
  lo, hi = c.hu_window
  threshold = (sampling.LUNG_HU_THRESHOLD - lo) / (hi - lo)
  source = pipeline.CubeSource(out, "train")
  for i in range(len(source)):
    crop = source[i][..., 0]
    assert crop.shape == (32, 32) and np.mean(crop >= threshold) < sampling.LUNG_MAX_FRACTION
    centre = crop[15:17, 15:17]  # Lung-centred: the centre pixel is in the lung window.
    assert np.any((centre >= (sampling.LUNG_WINDOW_HU[0] - lo) / (hi - lo))
                  & (centre <= (sampling.LUNG_WINDOW_HU[1] - lo) / (hi - lo)))
  c.crop = (64, 64)
  with pytest.raises(errors.DataError, match="no cube passed the filters"):
    prepare.ensure_dataset(c, tmp_path / "b", seed=0)


def test_xray_variant_shares_the_2d_pretrainings_and_the_radiographs(monkeypatch, tmp_path):
  """`:xray`: the DRR multi-label task, scratch_2d vs the two 2D Genesis arms, selection by
  validation loss; its pre-training variants are `:2d3d`'s (the same workdirs, reused); every
  trial reads one shared radiograph set; the report has the mean AUC per arm."""
  from genesis_jax.train import finetune, pretrain
  monkeypatch.chdir(REPO)
  config = loading.load_config_file("configs/experiment_phantom.py:xray")
  validate.validate(config)
  trials.check_trial_configs(config)
  exp = config.experiment
  two = loading.load_config_file(CONFIG).experiment
  for v in ("ct2d", "xray2d"):
    assert trials.pretrain_config(exp, v).to_dict() == trials.pretrain_config(two, v).to_dict()
  assert [a for a, _, _ in trials.arms_of(exp)] == ["scratch_2d", "genesis_xray_2d",
                                                   "genesis_ct_2d"]
  (name, file, overrides), = trials.tasks_of(exp)
  tcfg = trials.task_config(exp, file, overrides, None)
  assert (name, tcfg.task.kind, tcfg.train.monitor) == ("finetune_xray_cls", "multilabel",
                                                         "val_loss")
  exp.trials = 2
  seen = {}

  def fake_pretrain(cfg, run_dir):
    pathlib.Path(run_dir).mkdir(parents=True)
    (pathlib.Path(run_dir) / "summary.json").write_text(json.dumps({"final_step": cfg.num_steps}))

  def fake_finetune(cfg, run_dir):
    run_dir = pathlib.Path(run_dir)
    seen[(run_dir.parent.name, cfg.seed)] = (cfg.data.path, cfg.finetune.init)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json_best_effort())
    (run_dir / "eval.json").write_text(json.dumps({"auc": 0.6 + 0.01 * cfg.seed}))

  monkeypatch.setattr(pretrain, "train", fake_pretrain)
  monkeypatch.setattr(finetune, "train", fake_finetune)
  summary = trials.run(config, tmp_path)
  assert len({path for path, _ in seen.values()}) == 1  # One radiograph set for every trial.
  assert seen[("genesis_xray_2d", 0)][1] == str(tmp_path / "pretrain_xray2d")
  assert seen[("scratch_2d", 1)][1] == ""
  task = summary["tasks"]["finetune_xray_cls"]
  assert [(c["arm"], c["vs"]) for c in task["comparisons"]] == [
      ("genesis_xray_2d", "scratch_2d"), ("genesis_ct_2d", "scratch_2d")]
  assert (tmp_path / "results_xray.md").is_file()
  seen.clear()
  trials.run(config, tmp_path)  # Finished trials are reused (their saved configs match).
  assert not seen


def test_significance_marks():
  assert [report.significance_mark(p) for p in (0.0004, 0.001, 0.009, 0.04, 0.05, 0.5, None)] == [
      "***", "**", "**", "*", "", "", ""]


def test_bar_chart_marks_the_significant_arm(tmp_path):
  rng = np.random.default_rng(0)
  results = {"NCC": {"scratch": (0.80 + 0.01 * rng.standard_normal(5)).tolist(),
                     "genesis": (0.90 + 0.01 * rng.standard_normal(5)).tolist(),
                     "scratch_2d": (0.70 + 0.01 * rng.standard_normal(5)).tolist(),
                     "genesis_2d": (0.70 + 0.01 * rng.standard_normal(5)).tolist()}}
  summary = report.summarize_trials(results, {"NCC": "AUC"}, pairs=[
      ("genesis", "scratch"), ("genesis_2d", "scratch_2d")])
  p = {c["arm"]: c["welch_p"] for c in summary["tasks"]["NCC"]["comparisons"]}
  assert report.significance_mark(p["genesis"]) == "***" and p["genesis_2d"] > 0.05
  path = report.write_bar_chart(summary, tmp_path, "r")
  assert path == str(tmp_path / "r_bars.png")
  marked = np.asarray(Image.open(path).convert("L"), np.int16)
  summary["tasks"]["NCC"]["comparisons"][0]["welch_p"] = 0.5  # Now nothing is significant.
  plain = np.asarray(report.draw_bars(summary).convert("L"), np.int16)
  assert marked.shape == plain.shape
  ys, xs = np.nonzero(marked != plain)
  assert len(xs) > 10  # The mark, and nothing else, differs: above the genesis bar (arm 2 of 4).
  width = marked.shape[1]
  left = report.MARGIN_L
  slot = (width - 12 - left) / 4
  assert left + slot < xs.min() and xs.max() < left + 2 * slot
  assert ys.max() < report.PANEL_H - report.MARGIN_B
