"""Scratch vs Genesis on the phantom target tasks (NCC AUC, NCS IoU), N trials each.

  python -m genesis_jax.main --config configs/experiment_phantom.py --workdir runs/experiment

Pre-trains first (configs/pretrain_phantom.py, in <workdir>/pretrain) unless done, then runs
experiment.trials fine-tuning trials per arm and task, and writes <workdir>/results.{md,json,png}.
NCS runs 100 steps and tests on 4 subjects so that the whole experiment fits ~2 h of a 2-core CPU.

Variant ":diagnose" (NCC only, same pre-training): why does (or doesn't) Genesis help? Adds arms
that select the fine-tuning checkpoint by validation AUC instead of validation loss, and linear
probes (frozen encoder, new head) on Genesis features and on random features:

  python -m genesis_jax.main --config configs/experiment_phantom.py:diagnose \\
      --workdir runs/experiment   # reuses the pre-training and the plain arms' finished trials;
                                  # table in <workdir>/results_diagnose.{md,json,png}

Variant ":budget" (NCC only, same workdir and pre-training): Scratch vs Genesis with 2, 4 and 6
labelled training subjects (`data.train_subset`; validation and test subjects unchanged), best
checkpoint by validation AUC; the 6-subject arms are the `:diagnose` run's *_auc arms, reused:

  python -m genesis_jax.main --config configs/experiment_phantom.py:budget \
      --workdir runs/experiment   # table in <workdir>/results_budget.{md,json,png}

Variant ":levels" (NCC only, same workdir and pre-training): the `:diagnose` probes (frozen
encoder, new head, selection by validation AUC) on each encoder level (`task.feature_level` 0, 1,
2; level 3, the deepest, is the :diagnose run's probe arms, reused), Genesis vs random encoder,
3 trials each:

  python -m genesis_jax.main --config configs/experiment_phantom.py:levels \
      --workdir runs/experiment   # table in <workdir>/results_levels.{md,json,png}

Variant ":ncs_dice" (NCS only, same workdir and pre-training): the main NCS comparison with the
best checkpoint and early stopping by validation Dice instead of validation loss:

  python -m genesis_jax.main --config configs/experiment_phantom.py:ncs_dice \
      --workdir runs/experiment   # table in <workdir>/results_ncs_dice.{md,json,png}

Variant ":long" (NCC only, a new workdir): the same comparison after 2x longer pre-training
(1,200 steps; the scratch arm repeats the main run's trials, a check of determinism):

  python -m genesis_jax.main --config configs/experiment_phantom.py:long \\
      --workdir runs/experiment_long
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults
from genesis_jax.config.schema import arm, task

NCC = {"finetune_ncc": task("configs/finetune_ncc.py")}
NCS_CPU = {"finetune_ncs": task("configs/finetune_ncs.py",
                                {"num_steps": 100, "data.test_cases": 4})}


def get_config(variant: str = ""):
  c = defaults.experiment_config()
  c.experiment.tasks = {**NCC, **NCS_CPU}
  c.experiment.arms = {"scratch": arm(""), "genesis": arm("@pretrain")}
  c.experiment.pretrain_config = "configs/pretrain_phantom.py"
  c.experiment.trials = 5
  auc = {"train.monitor": "auc"}
  probe = {"finetune.freeze_encoder": True, "train.monitor": "auc"}
  if variant == "diagnose":
    c.experiment.report = "results_diagnose"
    c.experiment.tasks = NCC
    c.experiment.arms = {
        "scratch": arm(""), "genesis": arm("@pretrain"),
        "scratch_auc": arm("", auc), "genesis_auc": arm("@pretrain", auc),
        "probe_random": arm("", probe), "probe_genesis": arm("@pretrain", probe)}
    c.experiment.compare = (("genesis", "scratch"), ("genesis_auc", "scratch_auc"),
                            ("probe_genesis", "probe_random"))
  elif variant == "budget":
    c.experiment.report = "results_budget"
    c.experiment.tasks = NCC
    arms, pairs = {}, []
    for k in (2, 4, 6):
      suffix = "" if k == 6 else f"_{k}"  # 6 = every training subject: the :diagnose arms.
      subset = {} if k == 6 else {"data.train_subset": k}
      arms[f"scratch_auc{suffix}"] = arm("", {**auc, **subset})
      arms[f"genesis_auc{suffix}"] = arm("@pretrain", {**auc, **subset})
      pairs.append((f"genesis_auc{suffix}", f"scratch_auc{suffix}"))
    c.experiment.arms = arms
    c.experiment.compare = tuple(pairs)
  elif variant == "levels":
    c.experiment.report = "results_levels"
    c.experiment.tasks = NCC
    arms, pairs = {}, []
    for level in (0, 1, 2, 3):
      suffix = "" if level == 3 else f"_level{level}"  # 3 = deepest: the :diagnose probe arms.
      extra = {} if level == 3 else {"task.feature_level": level}
      arms[f"probe_random{suffix}"] = arm("", {**probe, **extra})
      arms[f"probe_genesis{suffix}"] = arm("@pretrain", {**probe, **extra})
      pairs.append((f"probe_genesis{suffix}", f"probe_random{suffix}"))
    c.experiment.arms = arms
    c.experiment.compare = tuple(pairs)
    c.experiment.trials = 3  # 18 new trials; the probes vary little between trials.
  elif variant == "ncs_dice":
    c.experiment.report = "results_ncs_dice"
    c.experiment.tasks = NCS_CPU
    dice = {"train.monitor": "dice"}
    c.experiment.arms = {"scratch": arm(""), "genesis": arm("@pretrain"),
                         "scratch_dice": arm("", dice), "genesis_dice": arm("@pretrain", dice)}
    c.experiment.compare = (("genesis", "scratch"), ("genesis_dice", "scratch_dice"))
  elif variant == "long":
    c.experiment.report = "results_long"
    c.experiment.tasks = NCC
    c.experiment.pretrain_overrides = {"num_steps": 1200, "eval_every": 200,
                                       "checkpoint_every": 200}
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for experiment_phantom.py "
                             f"(known: diagnose, budget, levels, ncs_dice, long).")
  return c
