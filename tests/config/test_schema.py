"""The schema: one section set per mode family, every key checked in one place, clear messages."""
from __future__ import annotations

import math
import pathlib
import re

import ml_collections
import pytest

from genesis_jax import errors
from genesis_jax.config import loading, schema, validate

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_builders_hold_only_their_familys_keys():
  pre, ft, exp = schema.pretrain_config(), schema.finetune_config(), schema.experiment_config()
  assert "corruption" in pre and "task" not in pre and "predict" not in pre
  assert "corruption" not in ft and "eval_batches" not in ft and "cubes_per_scan" not in ft.data
  assert {"task", "finetune", "eval", "predict"} <= set(ft)
  assert set(exp) == {"mode", "experiment"}
  assert (pre.mode, ft.mode, exp.mode) == ("pretrain", "finetune", "experiment")
  # Per-family defaults: the original's pre-training and fine-tuning recipes.
  assert (pre.train.optimizer, pre.train.learning_rate, pre.num_steps) == ("sgd", 1.0, 200_000)
  assert (ft.train.optimizer, ft.train.learning_rate, ft.num_steps) == ("adam", 1e-3, 2000)
  assert pre.model.winograd_min_macs == ft.model.winograd_min_macs == 1e8
  for c in (pre, ft, exp):
    validate.validate(c)


def test_a_key_of_another_mode_is_an_error_that_says_so():
  ft = schema.finetune_config()
  ft.lock()
  with pytest.raises(AttributeError):  # ml_collections: the key is not there to set...
    ft.corruption.local_rate = 0.1
  with pytest.raises(errors.ConfigError, match=r"config.corruption.local_rate is a pre-training "
                     r"key \(modes pretrain, prepare\); this fine-tuning config"):
    loading.set_key(ft, "corruption.local_rate", 0.1)  # ... and the message names its family.
  pre = schema.pretrain_config()
  pre.lock()
  with pytest.raises(errors.ConfigError, match="config.task.kind is a fine-tuning key"):
    loading.set_key(pre, "task.kind", "segment")
  with pytest.raises(errors.ConfigError, match=r"Did you mean config.train.batch_size\?"):
    loading.set_key(pre, "train.batchsize", 2)
  exp = schema.experiment_config()
  with pytest.raises(errors.ConfigError, match="experiment.overrides"):
    loading.set_key(exp, "num_steps", 100)


def test_a_config_with_keys_of_another_family_or_mode_fails_validation():
  ft = schema.finetune_config()
  ft.corruption = ml_collections.ConfigDict({"local_rate": 0.1})  # unlocked: a config file's own
  with pytest.raises(errors.ConfigError, match="corruption.local_rate is a pre-training key"):
    validate.validate(ft)
  pre = schema.pretrain_config()
  pre.mode = "finetune"
  with pytest.raises(errors.ConfigError, match=r"mode='finetune' needs a fine-tuning config "
                     r"\(built with schema.finetune_config\(\)\)"):
    validate.validate(pre)
  pre.mode = "prepare"
  validate.validate(pre)
  pre.mode = "pretrian"
  with pytest.raises(errors.ConfigError, match="Did you mean 'pretrain'"):
    validate.validate(pre)
  pre = schema.pretrain_config()
  pre.train.batchsize = 3
  with pytest.raises(errors.ConfigError, match="train.batchsize is not a config key"):
    validate.validate(pre)


@pytest.mark.parametrize("path,value,match", [
    ("train.learning_rate", 0.0, r"learning_rate=0.0 must be > 0"),
    ("num_steps", 0, r"num_steps=0 must be >= 1"),
    ("log_every", 0, r"log_every=0 must be >= 1"),
    ("eval_every", 0, r"eval_every=0 must be >= 1"),
    ("checkpoint_every", 0, r"checkpoint_every=0 must be >= 1"),
    ("keep_checkpoints", 0, r"keep_checkpoints=0 must be >= 1"),
    ("model.width", 0, r"width=0 must be >= 1"),
    ("train.batch_size", 0, r"batch_size=0 must be >= 1"),
    ("corruption.flip_rate", 1.5, r"flip_rate=1.5 must be in \[0, 1\]"),
    ("data.val_fraction", 1.0, r"val_fraction=1.0 must be in \[0, 1\)"),
    ("data.crop", (64, 64, 30), r"divisible by 8"),
    ("data.crop", (64, 64), r"has 2 entries but config.model.spatial_dims=3"),
    ("data.crop", (64, 0, 32), r"every entry must be >= 1"),
    ("data.hu_window", (100.0, -100.0), r"lo < hi"),
    ("data.spacing", (1.0, 1.0), r"must have 0 or 3 entries"),
    ("data.scales", (), r"data.scales is empty"),
    ("model.winograd_min_macs", -1.0, r"winograd_min_macs=-1.0 must be >= 0"),
    ("train.schedule", "cosin", r"schedule='cosin' is not one of .* Did you mean 'cosine'"),
    ("train.monitor", "auc", r"monitor='auc' is not one of \('val_loss',\)"),
    ("corruption.transforms", "nonlinear+blur", r"unknown \['blur'\]"),
])
def test_pretrain_ranges_and_choices(path, value, match):
  c = schema.pretrain_config()
  loading.set_key(c, path, value)
  with pytest.raises(errors.ConfigError, match=match):
    validate.validate(c)


@pytest.mark.parametrize("path,value,match", [
    ("data.source", "prepared", r"fine-tuning reads 'phantom' or 'folder'"),
    ("data.train_subset", 9, r"train_subset=9 must be in \[0, train_cases=8\]"),
    ("task.kind", "detect", r"kind='detect' is not one of"),
    ("task.loss", "ce", r"loss='ce' is not one of \('dice', 'dice\+ce'\)"),
    ("finetune.which", "last", r"which='last' is not one of"),
    ("predict.threshold", 2.0, r"threshold=2.0 must be in \[0, 1\]"),
    ("eval.overlap", 1.0, r"overlap=1.0 must be in \[0, 1\)"),
    ("mode", "predict", r"mode=predict needs config.predict.input"),
])
def test_finetune_ranges_and_rules(path, value, match):
  c = schema.finetune_config()
  loading.set_key(c, path, value)
  with pytest.raises(errors.ConfigError, match=match):
    validate.validate(c)


def test_winograd_threshold_takes_infinity_and_zero():
  c = schema.pretrain_config()
  for v in (0.0, math.inf, 1e6):
    c.model.winograd_min_macs = v
    validate.validate(c)


def test_data_path_is_checked_except_when_predicting(tmp_path):
  c = schema.finetune_config()
  c.data.source = "folder"
  with pytest.raises(errors.ConfigError, match="needs config.data.path"):
    validate.validate(c)
  c.data.path = str(tmp_path / "nope")
  with pytest.raises(errors.MissingPathError, match="nope.*does not exist"):
    validate.validate(c)
  c.mode, c.predict.input = "predict", str(tmp_path)
  validate.validate(c)  # predict reads the run's own data settings (its config.json)


def test_experiment_structures_are_checked():
  c = schema.experiment_config()
  c.experiment.arms = {}
  with pytest.raises(errors.ConfigError, match="experiment.arms is empty"):
    validate.validate(c)
  c = schema.experiment_config()
  c.experiment.arms.genesis = {"init": "@pretrain", "overides": {}}
  with pytest.raises(errors.ConfigError, match=r"arms.genesis has keys \['init', 'overides'\]"):
    validate.validate(c)
  c = schema.experiment_config()
  c.experiment.compare = (("genesis", "scratc"),)
  with pytest.raises(errors.ConfigError, match="must be a pair"):
    validate.validate(c)
  c.experiment.compare = ("genesis:scratch",)  # the old "arm:other" strings
  with pytest.raises(errors.ConfigError, match=r"old string form is gone; write "
                     r"config.experiment.compare = \(\('genesis', 'scratch'\),\)"):
    validate.validate(c)


def test_arm_and_task_helpers_nest_dotted_keys():
  assert schema.arm("@pretrain", {"train.monitor": "auc", "data.train_subset": 2}) == {
      "init": "@pretrain", "overrides": {"train": {"monitor": "auc"}, "data": {"train_subset": 2}}}
  assert schema.task("a.py") == {"config": "a.py", "overrides": {}}
  overrides = ml_collections.ConfigDict(schema.nest({"num_steps": 4, "data.crop": (16, 16, 8)}))
  c = loading.apply_overrides(schema.finetune_config(), overrides)
  assert c.num_steps == 4 and c.data.crop == (16, 16, 8)
  with pytest.raises(errors.ConfigError, match=r"config.num_steps='many' must be an integer"):
    loading.apply_overrides(c, {"num_steps": "many"})


def test_arm_order_is_the_order_written():
  c = schema.experiment_config()
  c.experiment.arms = {"zeta": schema.arm(), "alpha": schema.arm("@pretrain")}
  assert loading.ordered_names(c.experiment.arms) == ["zeta", "alpha"]


@pytest.mark.parametrize("config,override,match", [
    ("configs/finetune_ncc.py", "--config.corruption.local_rate=0.1",
     r"^config.corruption.local_rate is a pre-training key"),
    ("configs/demo.py", "--config.trian.batch_size=2", r"Did you mean config.train.batch_size\?$"),
    ("configs/demo.py", "--config.train.batchsize=2", r"Did you mean config.train.batch_size\?$"),
    ("configs/experiment_phantom.py", "--config.num_steps=100", r"experiment.overrides"),
    ("configs/experiment_phantom.py", "--config.experiment.arms=scratch=,genesis=@pretrain",
     r"old string form is gone; give a dict, e.g. --config.experiment.arms="),
    ("configs/experiment_phantom.py", "--config.experiment.arms.probe.init=x",
     r"config.experiment.arms has no entry 'probe'; set the dict whole"),
])
def test_cli_override_errors_are_explained_in_one_line(config, override, match, monkeypatch):
  monkeypatch.chdir(REPO)
  msg = loading.explain_overrides(["--config", config, "--workdir", "x", override])
  assert msg is not None and "\n" not in msg
  assert re.search(match, msg), msg


def test_valid_overrides_need_no_explanation(monkeypatch):
  monkeypatch.chdir(REPO)
  assert loading.explain_overrides(["--config", "configs/demo.py", "--config.seed=1",
                                    "--config.corruption.local_rate", "0.1"]) is None
  assert loading.explain_overrides(["--config=configs/experiment_phantom.py",
                                    "--config.experiment.arms.genesis.init=x"]) is None


def test_corruption_defaults_come_from_the_schema():
  from genesis_jax import corruptions
  p = corruptions.CorruptionParams()
  for name in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "outpaint_rate",
               "local_blocks", "flip_compat"):
    assert getattr(p, name) == schema.default(f"corruption.{name}")
  assert p == corruptions.CorruptionParams.from_config(schema.pretrain_config().corruption)
  with pytest.raises(corruptions.CorruptionConfigError, match="local_blocks=-1 must be >= 0"):
    corruptions.CorruptionParams(local_blocks=-1)
  assert issubclass(corruptions.CorruptionConfigError, errors.ConfigError)


def test_arms_and_tasks_are_overridable_from_the_command_line(monkeypatch):
  from absl import flags
  from ml_collections import config_flags
  monkeypatch.chdir(REPO)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  argv = ["prog", "--config", "configs/experiment_phantom.py",
          "--config.experiment.arms.genesis.init=runs/pretrain",
          "--config.experiment.tasks.finetune_ncs.overrides.num_steps=50",
          "--config.experiment.overrides={'eval_every': 10}",
          "--config.experiment.compare=(('genesis', 'scratch'),)"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  fv(argv)
  exp = fv.config.experiment
  assert exp.arms.genesis.init == "runs/pretrain" and exp.arms.scratch.init == ""
  assert exp.tasks.finetune_ncs.overrides.num_steps == 50
  assert exp.overrides.eval_every == 10
  assert tuple(map(tuple, exp.compare)) == (("genesis", "scratch"),)
  validate.validate(fv.config)
