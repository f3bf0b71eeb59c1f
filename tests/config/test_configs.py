"""Every shipped config (and variant) loads, validates, and its experiment overrides name real keys."""
from __future__ import annotations

import pathlib

import pytest

from genesis_jax import run as experiment
from genesis_jax.experiments import trials

REPO = pathlib.Path(__file__).resolve().parents[2]
VARIANTS = {"experiment_phantom.py": ["diagnose", "budget", "levels", "ncs_dice", "long"],
            "pretrain_genesis.py": ["plateau"]}
CASES = [(p.name, v) for p in sorted((REPO / "configs").glob("*.py"))
         for v in [""] + VARIANTS.get(p.name, [])]


@pytest.mark.parametrize("name,variant", CASES)
def test_config_loads_and_validates(name, variant, monkeypatch):
  monkeypatch.chdir(REPO)  # experiment configs name task configs relative to the repository
  path = f"configs/{name}" + (f":{variant}" if variant else "")
  config = trials.load_config_file(path)
  if config.data.source in ("folder", "prepared", "npy"):
    config.unlock()
    config.data.path = str(REPO)  # a path that exists; the configs leave it to the user
  experiment.validate(config)
  if config.mode != "experiment":
    return
  # What trials.run checks before pre-training: every arm's and task's overrides apply.
  trials.check_trial_configs(config)
  exp = config.experiment
  arms = set(trials.parse_arms(exp.arms))
  for pair in filter(None, exp.compare.split(",")):
    assert set(pair.split(":")) <= arms, pair


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_unknown_variant_is_an_error(name, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ValueError, match="nosuch"):
    trials.load_config_file(f"configs/{name}:nosuch")


def test_bad_arm_value_fails_before_pretraining(monkeypatch):
  monkeypatch.chdir(REPO)
  config = trials.load_config_file("configs/experiment_phantom.py")
  config.unlock()
  config.experiment.arms = "scratch=,genesis=@pretrain[task.feature_level=9]"
  with pytest.raises(ValueError, match="feature_level=9"):
    trials.check_trial_configs(config)
  config.experiment.arms = "scratch=,genesis=@pretrain[train.optimizer=sgdd]"
  with pytest.raises(ValueError, match="sgdd"):
    trials.run(config, "/nonexistent/never/written")  # fails before anything is written


def test_conv_impl_values(monkeypatch):
  monkeypatch.chdir(REPO)
  config = trials.load_config_file("configs/pretrain_phantom.py")
  config.unlock()
  config.model.conv_impl = "unfold:4"  # F(4, 3) whatever the precision: a valid choice
  experiment.validate(config)
  config.model.conv_impl = "unfold:3"
  with pytest.raises(ValueError, match=r"conv_impl='unfold:3' is not one of .*'unfold:4'"):
    experiment.validate(config)
