"""Every shipped config (and variant) loads and validates; experiment overrides name real keys."""
from __future__ import annotations

import pathlib

import pytest

from genesis_jax.config import loading, validate
from genesis_jax.experiments import trials

REPO = pathlib.Path(__file__).resolve().parents[2]
VARIANTS = {"experiment_phantom.py": ["diagnose", "budget", "levels", "ncs_dice", "long",
                                      "faithful", "faithful_gpu", "faithful_budget", "faithful_ncs", "2d3d_ncs",
                                      "nnunet",
                                      "2d3d", "xray"],
            "pretrain_genesis.py": ["plateau"], "finetune_ncc.py": ["faithful"],
            "finetune_ncs.py": ["faithful"], "pretrain_phantom.py": ["faithful"],
            "pretrain_xray2d.py": ["folder", "faithful"]}
CASES = [(p.name, v) for p in sorted((REPO / "configs").glob("*.py"))
         for v in [""] + VARIANTS.get(p.name, [])]


@pytest.mark.parametrize("name,variant", CASES)
def test_config_loads_and_validates(name, variant, monkeypatch):
  monkeypatch.chdir(REPO)  # experiment configs name task configs relative to the repository
  path = f"configs/{name}" + (f":{variant}" if variant else "")
  config = loading.load_config_file(path)
  if "data" in config and config.data.source in ("folder", "prepared", "npy", "images2d"):
    config.data.path = str(REPO)  # a path that exists; the configs leave it to the user
  validate.validate(config)
  if config.mode != "experiment":
    return
  # What trials.run checks before pre-training: every arm's and task's overrides apply.
  trials.check_trial_configs(config)
  exp = config.experiment
  arms = {name for name, _, _ in trials.arms_of(exp)}
  for pair in exp.compare:
    assert set(pair) <= arms, pair


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_unknown_variant_is_an_error(name, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ValueError, match="nosuch"):
    loading.load_config_file(f"configs/{name}:nosuch")


def test_bad_arm_value_fails_before_pretraining(monkeypatch):
  monkeypatch.chdir(REPO)
  config = loading.load_config_file("configs/experiment_phantom.py")
  config.experiment.arms.genesis.overrides = {"task": {"feature_level": 9}}
  with pytest.raises(ValueError, match="feature_level=9"):
    trials.check_trial_configs(config)
  config.experiment.arms.genesis.overrides = {"train": {"optimizer": "sgdd"}}
  with pytest.raises(ValueError, match="arm 'genesis'.*sgdd"):
    trials.run(config, "/nonexistent/never/written")  # fails before anything is written
  # A key of another mode in a fine-tuning override names the mode it belongs to.
  config.experiment.arms.genesis.overrides = {"corruption": {"local_rate": 0.1}}
  with pytest.raises(ValueError, match="corruption.local_rate is a pre-training key"):
    trials.check_trial_configs(config)


def test_pretrain_variants(monkeypatch):
  """'@pretrain:<name>' arms pre-train with the variant's overrides on top; a name that is not a
  variant, or another '@' form, is an error before anything runs."""
  monkeypatch.chdir(REPO)
  config = loading.load_config_file("configs/experiment_phantom.py:faithful")
  exp = config.experiment
  assert trials.pretrain_variant(exp.arms.genesis_fix.init) == "fix"
  assert trials.pretrain_variant(exp.arms.genesis.init) == ""
  assert trials.pretrain_variant(exp.arms.scratch.init) is None
  fix, plain = trials.pretrain_config(exp, "fix"), trials.pretrain_config(exp)
  assert fix.pretrain.bottleneck_loss_weight == 1.0 and plain.pretrain.bottleneck_loss_weight == 0
  assert fix.train.optimizer == plain.train.optimizer == "sgd"  # the faithful variant underneath
  config.experiment.arms.genesis_fix.init = "@pretrain:fx"
  with pytest.raises(ValueError, match=r"init='@pretrain:fx' names no pre-training variant; "
                     r"config.experiment.pretrain_variants has \['fix'\]"):
    validate.validate(config)
  config.experiment.arms.genesis_fix.init = "@pretrian"
  with pytest.raises(ValueError, match="use '@pretrain', '@pretrain:<variant>'"):
    validate.validate(config)
  budget = loading.load_config_file("configs/experiment_phantom.py:faithful_budget")
  validate.validate(budget)
  trials.check_trial_configs(budget)
  assert set(budget.experiment.arms.keys()) == {
      "scratch", "scratch_2", "scratch_4", "genesis_fix", "genesis_fix_2", "genesis_fix_4"}
  assert budget.experiment.arms.genesis_fix_2.init == "@pretrain:fix"


def test_faithful_ncs_reuses_the_faithful_ncs_trials(monkeypatch):
  """The registered follow-up's reused arms ask for exactly the `:faithful` NCS trials' configs
  (so their finished trials are reused, not rerun); the new arms differ only in what they name."""
  monkeypatch.chdir(REPO)
  base = loading.load_config_file("configs/experiment_phantom.py:faithful")
  ncs = loading.load_config_file("configs/experiment_phantom.py:faithful_ncs")
  validate.validate(ncs)
  trials.check_trial_configs(ncs)
  assert list(ncs.experiment.tasks.keys()) == ["finetune_ncs"]

  def cfg(exp, name):
    t = exp.experiment.tasks.finetune_ncs
    return trials.task_config(exp.experiment, str(t.config), t.get("overrides"),
                              exp.experiment.arms[name].get("overrides"))

  for name in ("scratch", "genesis", "genesis_fix"):
    assert cfg(ncs, name).to_dict() == cfg(base, name).to_dict()
    assert ncs.experiment.arms[name].init == base.experiment.arms[name].init
  new = cfg(ncs, "genesis_newhead_200")
  assert (new.finetune.keep_head, new.num_steps) == (False, 200)
  assert cfg(ncs, "genesis_200").finetune.keep_head is True
  assert cfg(ncs, "genesis_newhead").num_steps == 100


def test_2d3d_reuses_the_faithful_trials(monkeypatch):
  """`:2d3d`'s 3D arms ask for exactly the `:faithful` trials' configs (so its finished scratch
  and genesis trials and its pre-training are reused, not rerun); its 2D arms run the same tasks
  on 2D axial slices, and nothing uses `:faithful`'s "fix" pre-training."""
  monkeypatch.chdir(REPO)
  base = loading.load_config_file("configs/experiment_phantom.py:faithful")
  new = loading.load_config_file("configs/experiment_phantom.py:2d3d")
  validate.validate(new)
  trials.check_trial_configs(new)
  assert list(new.experiment.tasks.keys()) == list(base.experiment.tasks.keys())
  assert new.experiment.pretrain_config == base.experiment.pretrain_config
  assert trials.pretrain_config(new.experiment).to_dict() == trials.pretrain_config(
      base.experiment).to_dict()
  assert set(new.experiment.pretrain_variants.keys()) == {"ct2d", "xray2d"}

  def cfg(exp, task, name):
    t = exp.experiment.tasks[task]
    return trials.task_config(exp.experiment, str(t.config), t.get("overrides"),
                              exp.experiment.arms[name].get("overrides"))

  for task in ("finetune_ncc", "finetune_ncs"):
    for name in ("scratch", "genesis"):
      assert cfg(new, task, name).to_dict() == cfg(base, task, name).to_dict()
      assert new.experiment.arms[name].init == base.experiment.arms[name].init
    flat2d = loading.flatten(cfg(new, task, "genesis_ct_2d"))
    flat3d = loading.flatten(cfg(base, task, "genesis"))
    assert {k for k in flat3d if flat2d.get(k) != flat3d[k]} == {"model.spatial_dims",
                                                                  "data.crop"}
  assert new.experiment.trials == base.experiment.trials == 5


def test_2d3d_ncs_reuses_the_2d3d_and_faithful_ncs_trials(monkeypatch):
  """`:2d3d_ncs`'s reused arms ask for exactly the finished trials' configs: scratch_2d and
  scratch as in `:2d3d`, genesis_newhead as in `:faithful_ncs`."""
  monkeypatch.chdir(REPO)
  new = loading.load_config_file("configs/experiment_phantom.py:2d3d_ncs")
  validate.validate(new)
  trials.check_trial_configs(new)
  d3 = loading.load_config_file("configs/experiment_phantom.py:2d3d")
  fncs = loading.load_config_file("configs/experiment_phantom.py:faithful_ncs")

  def cfg(exp, name):
    t = exp.experiment.tasks.finetune_ncs
    return trials.task_config(exp.experiment, str(t.config), t.get("overrides"),
                              exp.experiment.arms[name].get("overrides")).to_dict()

  for name, source in (("scratch_2d", d3), ("scratch", d3), ("genesis_newhead", fncs)):
    assert cfg(new, name) == cfg(source, name)
    assert new.experiment.arms[name].init == source.experiment.arms[name].init
  assert (new.experiment.pretrain_variants.to_dict()
          == d3.experiment.pretrain_variants.to_dict())  # The same 2D pre-trainings, reused.
  for name in ("genesis_ct_2d_newhead", "genesis_xray_2d_newhead"):
    changed = {k for k, v in cfg(new, name)["finetune"].items()
               if v != cfg(d3, name.removesuffix("_newhead"))["finetune"][k]}
    assert changed == {"keep_head"} and cfg(new, name)["finetune"]["keep_head"] is False


def test_lung_rules_need_ct():
  from genesis_jax.config import schema
  for key, value in (("lung_filter", True), ("sampler", "lung_centred")):
    c = schema.pretrain_config()
    c.data.modality = "mri"
    c.data[key] = value
    with pytest.raises(ValueError, match=rf"config.data.{key}.* needs config.data.modality='ct'"):
      validate.validate(c)


def test_conv_impl_values(monkeypatch):
  monkeypatch.chdir(REPO)
  config = loading.load_config_file("configs/pretrain_phantom.py")
  config.model.conv_impl = "unfold:4"  # F(4, 3) whatever the precision: a valid choice
  validate.validate(config)
  config.model.conv_impl = "unfold:3"
  with pytest.raises(ValueError, match=r"conv_impl='unfold:3' is not one of .*'unfold:4'"):
    validate.validate(config)
