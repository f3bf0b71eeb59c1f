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

Variant ":faithful" (issue 17; a new workdir): the original's recipe on both sides, and the opt-in
fix. REGISTERED on 2026-12-01 before any of its trials ran; reported whatever it shows:

  python -m genesis_jax.main --config configs/experiment_phantom.py:faithful \
      --workdir runs/experiment_faithful   # table in <workdir>/results_faithful.{md,json,png}

- Pre-training: configs/pretrain_phantom.py:faithful (SGD lr 1.0 momentum 0.9 batch 6, step decay,
  the lung filter and lung-centred cubes; width 8, 32x32x16 cubes, 600 steps) in <workdir>/pretrain;
  the same plus `pretrain.bottleneck_loss_weight=1.0` (the fix: the restoration loss of a pass
  with every skip connection zeroed is added) in <workdir>/pretrain_fix.
- Tasks: configs/finetune_ncc.py:faithful (PyTorch default init of what is not loaded) and
  configs/finetune_ncs.py:faithful (the whole pre-trained U-Net, output conv included), NCS at 100
  steps on 4 test subjects as the main table; both with the original's patience, 10 evaluations
  (`train.early_stop_patience=10`; at 200/100 steps and an evaluation every 25 steps no trial stops
  early, so the best checkpoint is chosen over the whole run).
- Arms: scratch (""), genesis ("@pretrain"), genesis_fix ("@pretrain:fix"); 5 trials per arm and
  task, seeds 0-4, the same split for every arm.
- Selection: each trial's checkpoint by validation loss (the original's rule); the test split is
  read once, by the selected checkpoint. Metrics: NCC test AUC; NCS test foreground IoU (mean over
  subjects), with the original's IoU definition in each trial's eval.json beside it.
- Tests: Welch t and Mann-Whitney U (two-sided) for genesis vs scratch, genesis_fix vs scratch and
  genesis_fix vs genesis; mean +- std per arm.
- Budget sweep (`:faithful_budget`, same workdir): of genesis and genesis_fix, the arm with the
  lower mean best validation loss over its 5 NCC trials (validation only), and scratch, with 2
  and 4 labelled training subjects (`data.train_subset`), 5 trials each, same rule; the 6-subject
  points are the `:faithful` NCC arms, reused.

Variant ":faithful_ncs" (issue 17, item 5 follow-up; the `:faithful` workdir). REGISTERED on
2026-12-01, after the `:faithful` NCS result (both Genesis arms IoU 0 in 10/10 trials) and before
any of these trials ran; reported whatever it shows. Question: is that zero the pre-training, or
the protocol (the restoration output conv kept as the segmentation head; 100 steps)?

  python -m genesis_jax.main --config configs/experiment_phantom.py:faithful_ncs \
      --workdir runs/experiment_faithful   # table in <workdir>/results_faithful_ncs.{md,json,png}

- Task: `:faithful`'s NCS (configs/finetune_ncs.py:faithful, patience 10, 4 test subjects).
- Arms, 5 trials each, seeds 0-4, the same split: the `:faithful` NCS arms reused (scratch,
  genesis, genesis_fix: keep head, 100 steps); genesis_newhead and genesis_fix_newhead (the same
  weights, the 1x1 output conv re-initialised: `finetune.keep_head=False`, 100 steps); at 200
  steps: scratch_200, genesis_200 (head kept) and genesis_newhead_200.
- Selection as `:faithful` (validation loss; the test split read once by the selected checkpoint).
- Tests (Welch, Mann-Whitney, two-sided): genesis_newhead vs scratch, genesis_fix_newhead vs
  scratch, genesis_newhead vs genesis (the head's effect), genesis_200 vs scratch_200,
  genesis_newhead_200 vs scratch_200.

Variant ":faithful_gpu" (issue 17, item 6; a new workdir, a GPU): `:faithful` at the original's
scale where a phantom allows it: the full-width network (model.width 32), 64x64x32 cubes for
pre-training and both tasks, bfloat16 compute, 3,000 pre-training steps per pre-training, NCS at
the task's 200 steps and 8 test subjects. Run it with `bench/gpu_experiment.sh`, which bounds the
wall time and collects the report (it can be run again: finished work is reused).

Variants ":2d3d" and ":xray" (issue 19; the `:faithful` workdir, REGISTERED on 2026-12-01 before
any of their trials ran): the paper's 2D-vs-3D comparison on the `:faithful` NCC and NCS tasks
(Scratch 2D, Genesis CT 2D, Genesis X-ray 2D, and `:faithful`'s Scratch 3D and Genesis CT 3D
trials, reused), and the 2D arms on the built-in radiographs' multi-label task; see setup_2d3d
and setup_xray below:

  python -m genesis_jax.main --config configs/experiment_phantom.py:2d3d \\
      --workdir runs/experiment_faithful   # <workdir>/results_2d3d.{md,json,png}, _bars.png
  python -m genesis_jax.main --config configs/experiment_phantom.py:xray \\
      --workdir runs/experiment_faithful   # <workdir>/results_xray.{md,json,png}

Variant ":long" (NCC only, a new workdir): the same comparison after 2x longer pre-training
(1,200 steps; the scratch arm repeats the main run's trials, a check of determinism):

  python -m genesis_jax.main --config configs/experiment_phantom.py:long \\
      --workdir runs/experiment_long
"""
from genesis_jax import errors
from genesis_jax.config import schema as defaults
from genesis_jax.config.schema import arm, nest, task

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
  elif variant in ("faithful", "faithful_budget", "faithful_gpu", "faithful_ncs"):
    faithful_setup(c)
    if variant == "faithful_budget":
      faithful_budget(c)
    if variant == "faithful_ncs":
      faithful_ncs(c)
    if variant == "faithful_gpu":
      faithful_gpu(c)
  elif variant == "nnunet":
    nnunet_setup(c)
  elif variant == "2d3d":
    setup_2d3d(c)
  elif variant == "xray":
    setup_xray(c)
  elif variant == "2d3d_ncs":
    setup_2d3d_ncs(c)
  elif variant == "long":
    c.experiment.report = "results_long"
    c.experiment.tasks = NCC
    c.experiment.pretrain_overrides = {"num_steps": 1200, "eval_every": 200,
                                       "checkpoint_every": 200}
  elif variant:
    raise errors.ConfigError(f"Unknown variant {variant!r} for experiment_phantom.py "
                             f"(known: diagnose, budget, levels, ncs_dice, long, faithful, "
                             f"faithful_budget, faithful_ncs, faithful_gpu, nnunet, 2d3d, "
                             f"2d3d_ncs, xray).")
  return c


# The arm the `:faithful_budget` sweep runs beside scratch, set by the registered rule (lower mean
# best validation loss over the `:faithful` NCC trials): genesis_fix 0.5155 against genesis 0.7259
# (runs/experiment_faithful, session 8, all 5 NCC trials of both arms finished).
FAITHFUL_BUDGET_ARM = "genesis_fix"


def faithful_setup(c) -> None:
  """The registered `:faithful` experiment (see the module docstring)."""
  c.experiment.report = "results_faithful"
  c.experiment.pretrain_config = "configs/pretrain_phantom.py:faithful"
  c.experiment.pretrain_variants = {"fix": nest({"pretrain.bottleneck_loss_weight": 1.0})}
  patience = {"train.early_stop_patience": 10}
  c.experiment.tasks = {
      "finetune_ncc": task("configs/finetune_ncc.py:faithful", patience),
      "finetune_ncs": task("configs/finetune_ncs.py:faithful",
                           {"num_steps": 100, "data.test_cases": 4, **patience})}
  c.experiment.arms = {"scratch": arm(""), "genesis": arm("@pretrain"),
                       "genesis_fix": arm("@pretrain:fix")}
  c.experiment.compare = (("genesis", "scratch"), ("genesis_fix", "scratch"),
                          ("genesis_fix", "genesis"))
  c.experiment.trials = 5


def faithful_budget(c) -> None:
  """The `:faithful_budget` sweep: scratch and FAITHFUL_BUDGET_ARM with 2 and 4 subjects."""
  if FAITHFUL_BUDGET_ARM is None:
    raise errors.ConfigError("configs/experiment_phantom.py:faithful_budget: the arm to sweep is "
                             "chosen from the :faithful NCC trials' validation loss; run "
                             "':faithful' first and set FAITHFUL_BUDGET_ARM by that rule.")
  c.experiment.report = "results_faithful_budget"
  c.experiment.tasks = {"finetune_ncc": c.experiment.tasks["finetune_ncc"]}
  arms, pairs = {}, []
  best = c.experiment.arms[FAITHFUL_BUDGET_ARM]
  for k in (2, 4, 6):
    suffix = "" if k == 6 else f"_{k}"  # 6 = every training subject: the :faithful arms.
    subset = {} if k == 6 else {"data.train_subset": k}
    arms[f"scratch{suffix}"] = arm("", subset)
    arms[f"{FAITHFUL_BUDGET_ARM}{suffix}"] = arm(best["init"], subset)
    pairs.append((f"{FAITHFUL_BUDGET_ARM}{suffix}", f"scratch{suffix}"))
  c.experiment.arms = arms
  c.experiment.compare = tuple(pairs)


def faithful_ncs(c) -> None:
  """`:faithful_ncs`: the `:faithful` NCS arms with the output conv re-initialised and at 200
  steps (see the module docstring)."""
  c.experiment.report = "results_faithful_ncs"
  c.experiment.tasks = {"finetune_ncs": c.experiment.tasks["finetune_ncs"]}
  new_head = {"finetune.keep_head": False}
  longer = {"num_steps": 200}
  c.experiment.arms = {
      "scratch": arm(""), "genesis": arm("@pretrain"), "genesis_fix": arm("@pretrain:fix"),
      "genesis_newhead": arm("@pretrain", new_head),
      "genesis_fix_newhead": arm("@pretrain:fix", new_head),
      "scratch_200": arm("", longer), "genesis_200": arm("@pretrain", longer),
      "genesis_newhead_200": arm("@pretrain", {**new_head, **longer})}
  c.experiment.compare = (("genesis_newhead", "scratch"), ("genesis_fix_newhead", "scratch"),
                          ("genesis_newhead", "genesis"), ("genesis_200", "scratch_200"),
                          ("genesis_newhead_200", "scratch_200"))


def faithful_gpu(c) -> None:
  """`:faithful` at full width, 64x64x32 cubes and bfloat16 (a GPU run)."""
  c.experiment.report = "results_faithful_gpu"
  scale = {"model.width": 32, "model.dtype": "bfloat16", "data.crop": (64, 64, 32)}
  c.experiment.overrides = nest(scale)
  c.experiment.pretrain_overrides = nest({**scale, "num_steps": 3000, "eval_every": 500,
                                          "checkpoint_every": 500,
                                          "train.decay_every": 40 * 500})
  c.experiment.tasks.finetune_ncs.overrides = nest({"train.early_stop_patience": 10})


def nnunet_setup(c) -> None:
  """`:nnunet` (issue 20; a new workdir): Scratch vs Genesis with the network of an nnU-Net plans
  file, on the phantom NCS task, fine-tuned with genesis_jax.

    python -m genesis_jax.main --config configs/experiment_phantom.py:nnunet \\
        --workdir runs/experiment_nnunet   # table in <workdir>/results_nnunet.{md,json,png}

  Both arms fine-tune model.kind='nnunet' with configs/nnunet_plans_phantom.json (PlainConvUNet,
  4 stages, 8/16/32/64 features, anisotropic first stage, patch 32 x 32 x 16, spacing
  0.85 x 0.85 x 1.75 mm); the genesis arm starts from configs/pretrain_nnunet.py's pre-training
  of that network (Genesis corruptions, 1-channel restoration head) in <workdir>/pretrain, with
  every layer but the segmentation outputs loaded. The plans decide the crop and spacing, set
  here explicitly so that a finished trial's saved config matches on a rerun. NCS as the main
  experiment: 100 steps, 4 test subjects, selection on validation loss; 5 trials per arm."""
  import pathlib  # pylint: disable=import-outside-toplevel
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  plans = str(pathlib.Path(__file__).resolve().parent / "nnunet_plans_phantom.json")
  plan = nnunet_plans.load_plans(plans, "3d_fullres")
  c.experiment.report = "results_nnunet"
  c.experiment.tasks = NCS_CPU
  c.experiment.pretrain_config = "configs/pretrain_nnunet.py"
  # The pre-training at the main experiment's scale of data (24 subjects), batch 4, 600 steps.
  c.experiment.pretrain_overrides = nest({
      "model.plans": plans, "data.phantom_subjects": 24, "data.cubes_per_scan": 32,
      "data.val_fraction": 0.15, "train.batch_size": 4, "num_steps": 600, "eval_every": 200,
      "checkpoint_every": 200, "log_every": 25})
  # model.width back at its default: the phantom tasks' width 8 is the Genesis U-Net's.
  c.experiment.overrides = nest({
      "model.kind": "nnunet", "model.plans": plans, "model.configuration": "3d_fullres",
      "model.width": defaults.default("model.width", defaults.FT),
      "data.crop": tuple(plan.patch_size), "data.spacing": tuple(plan.spacing)})
  c.experiment.arms = {"scratch": arm(""), "genesis": arm("@pretrain")}
  c.experiment.compare = (("genesis", "scratch"),)
  c.experiment.trials = 5


# `:2d3d`: weights for the arm "user_2d" (a 2D encoder you supply), or "" for no such arm. They
# must be in this 2D U-Net's layout (model.spatial_dims=2, depth 3): a genesis_jax 2D
# pre-training workdir, a converted dir (python -m genesis_jax.weights.convert) or a Models
# Genesis-layout .pt/.h5 file; weights of another architecture (e.g. an ImageNet ResNet) do not
# map onto it: loading them fails naming the parameter paths that do not match. Weights of
# another width need it in USER_2D_OVERRIDES, e.g. {"model.width": 32}.
USER_2D_WEIGHTS = ""
USER_2D_OVERRIDES: dict = {}
# The 2D arms' input: axial slices with the 3D cube's in-plane size (data.crop (32, 32) of the
# tasks' (32, 32, 16)); segmentation trains on the cases' axial slices and is tested slice by
# slice over each whole test volume; classification sees each candidate's central axial slice.
TWO_D = {"model.spatial_dims": 2, "data.crop": (32, 32)}
# The 2D pre-trainings' crops: the in-plane size of the `:faithful` 3D cubes (32 x 32 x 16) and of
# the 2D arms' input. On CT the original's lung filter (under 15% of a crop at >= -150 HU) keeps
# no 64 x 64 or 48 x 48 axial crop of a phantom (wider than a phantom lung: every crop holds chest
# wall or mediastinum) and every 32 x 32 one. 480 shuffled blocks cover a 32 x 32 slice as the
# original's 10,000 cover 64 x 64 x 32 (blocks of 1-3 pixels a side: 480 * 2 * 2 / 1,024 = 1.9
# blocks per pixel, against 10,000 * 3.5 * 3.5 * 2 / 131,072 = 1.9).
PRETRAIN_2D = {"data.crop": (32, 32), "corruption.local_blocks": 480}


def pretrain_variants_2d() -> dict:
  """The `:2d3d` and `:xray` pre-trainings: "ct2d" (configs/pretrain_phantom.py:faithful on 2D
  axial slices) and "xray2d" (configs/pretrain_xray2d.py:faithful, the same optimiser recipe, on
  the built-in radiographs), both at PRETRAIN_2D."""
  return {"ct2d": nest({"model.spatial_dims": 2, **PRETRAIN_2D}),
          "xray2d": {"config": "configs/pretrain_xray2d.py:faithful",
                     "overrides": nest(PRETRAIN_2D)}}


def setup_2d3d(c) -> None:
  """`:2d3d` (issue 19; the `:faithful` workdir, whose "scratch" and "genesis" trials and
  pre-training it reuses): the paper's 3D-vs-2D comparison (poster Result 2) on the phantom NCC
  and NCS tasks. Re-registered on the `:faithful` basis on 2026-12-01, before any of its trials
  ran (it had never run; it used to reuse the Adam-recipe main workdir runs/experiment).

    python -m genesis_jax.main --config configs/experiment_phantom.py:2d3d \\
        --workdir runs/experiment_faithful   # table and bar chart: <workdir>/results_2d3d{.md,
                                             # .json,.png,_bars.png}

  - Tasks: exactly `:faithful`'s (faithful_setup): configs/finetune_ncc.py:faithful and
    configs/finetune_ncs.py:faithful (100 steps, 4 test subjects, the output conv kept), both
    with patience 10 evaluations; selection by validation loss, the test split read once.
  - Arms: scratch (Scratch 3D) and genesis (Genesis CT 3D: configs/pretrain_phantom.py:faithful
    in <workdir>/pretrain), the finished `:faithful` trials, reused; scratch_2d; genesis_ct_2d
    (2D Genesis on axial CT slices: configs/pretrain_phantom.py:faithful, i.e. SGD lr 1.0
    momentum 0.9 batch 6, step decay, the lung filter and lung-centred crops, with
    model.spatial_dims=2 and PRETRAIN_2D, in <workdir>/pretrain_ct2d); genesis_xray_2d
    (configs/pretrain_xray2d.py:faithful, the same optimiser recipe and PRETRAIN_2D on the
    built-in radiographs with their radiograph findings, in <workdir>/pretrain_xray2d); user_2d
    when USER_2D_WEIGHTS is set. Both 2D pre-trainings: 600 steps, 1,536 crops of 24 seed-0
    subjects (64 slices a CT; 32 crops a radiograph, PA and lateral), the same corruptions.
  - The 2D arms apply a 2D model the way the paper does (TWO_D): classification on the
    candidate's central axial slice (data.slices='axial'; 'orthogonal' gives the three
    orthogonal central slices as 3 channels instead), segmentation slice by slice along z, the
    predictions stacked into the volume's mask.
  - Tests (Welch and Mann-Whitney, two-sided): each 2D Genesis arm against scratch_2d, genesis
    against scratch; 5 trials per arm, seeds 0-4, the same split.
  """
  import os  # pylint: disable=import-outside-toplevel
  faithful_setup(c)
  c.experiment.report = "results_2d3d"
  c.experiment.pretrain_variants = pretrain_variants_2d()  # No arm uses `:faithful`'s "fix".
  arms = {"scratch_2d": arm("", TWO_D), "genesis_ct_2d": arm("@pretrain:ct2d", TWO_D),
          "genesis_xray_2d": arm("@pretrain:xray2d", TWO_D),
          "scratch": arm(""), "genesis": arm("@pretrain")}
  pairs = [("genesis_ct_2d", "scratch_2d"), ("genesis_xray_2d", "scratch_2d"),
           ("genesis", "scratch")]
  if USER_2D_WEIGHTS:
    if not os.path.exists(USER_2D_WEIGHTS):
      raise errors.ConfigError(f"configs/experiment_phantom.py: USER_2D_WEIGHTS="
                               f"{USER_2D_WEIGHTS!r} does not exist; give 2D weights in this "
                               f"U-Net's layout, or '' for no user_2d arm.")
    arms["user_2d"] = arm(os.path.abspath(USER_2D_WEIGHTS), {**TWO_D, **USER_2D_OVERRIDES})
    pairs.append(("user_2d", "scratch_2d"))
  c.experiment.arms = arms
  c.experiment.compare = tuple(pairs)
  c.experiment.trials = 5


def setup_xray(c) -> None:
  """`:xray` (issue 19; the `:faithful` workdir and `:2d3d`'s 2D pre-trainings, reused): Genesis
  X-ray 2D and Genesis CT 2D against Scratch 2D on the built-in radiographs' multi-label task.
  Registered on 2026-12-01, before any of its trials ran.

    python -m genesis_jax.main --config configs/experiment_phantom.py:xray \\
        --workdir runs/experiment_faithful   # table in <workdir>/results_xray.{md,json,png}

  - Task: configs/finetune_xray_cls.py (PA and lateral DRRs of 120 seed-1 subjects, 10
    findings, split 64/16/40 subjects, 64 x 64), with selection and early stopping by validation
    loss (`train.monitor="val_loss"`, the `:faithful` rule) and patience 10 evaluations.
  - Arms: scratch_2d; genesis_xray_2d and genesis_ct_2d (`:2d3d`'s pretrain_xray2d and
    pretrain_ct2d); 5 trials per arm, seeds 0-4, the same split.
  - Metric: test mean AUC over the findings (per-finding AUC in each trial's eval.json).
  - Tests (Welch and Mann-Whitney, two-sided): genesis_xray_2d vs scratch_2d, genesis_ct_2d vs
    scratch_2d.
  """
  setup_2d3d(c)
  c.experiment.report = "results_xray"
  c.experiment.tasks = {"finetune_xray_cls": task(
      "configs/finetune_xray_cls.py",
      {"train.monitor": "val_loss", "train.early_stop_patience": 10})}
  c.experiment.arms = {"scratch_2d": arm(""), "genesis_xray_2d": arm("@pretrain:xray2d"),
                       "genesis_ct_2d": arm("@pretrain:ct2d")}
  c.experiment.compare = (("genesis_xray_2d", "scratch_2d"), ("genesis_ct_2d", "scratch_2d"))
  c.experiment.trials = 5


def setup_2d3d_ncs(c) -> None:
  """`:2d3d_ncs` (issue 19; the `:faithful` workdir): `:2d3d`'s NCS with the 2D Genesis arms'
  output conv re-initialised. Registered on 2026-12-01 after `:2d3d` (both 2D Genesis arms IoU
  ~0 with the restoration head kept, as Genesis 3D in `:faithful`) and `:faithful_ncs`'s 100-step
  arms (with a fresh head Genesis 3D is level with scratch), before any of these trials ran.

    python -m genesis_jax.main --config configs/experiment_phantom.py:2d3d_ncs \
        --workdir runs/experiment_faithful   # table in <workdir>/results_2d3d_ncs.{md,json,png}

  - Task: `:2d3d`'s NCS (configs/finetune_ncs.py:faithful, 100 steps, 4 test subjects, patience
    10; selection by validation loss).
  - Arms, 5 trials each, seeds 0-4: scratch_2d and scratch (reused from `:2d3d`/`:faithful`);
    genesis_ct_2d_newhead and genesis_xray_2d_newhead (`:2d3d`'s 2D pre-trainings with
    `finetune.keep_head=False`); genesis_newhead (Genesis CT 3D, fresh head: reused from
    `:faithful_ncs`).
  - Tests (Welch and Mann-Whitney, two-sided): each 2D *_newhead arm against scratch_2d,
    genesis_newhead against scratch.
  """
  setup_2d3d(c)
  c.experiment.report = "results_2d3d_ncs"
  c.experiment.tasks = {"finetune_ncs": c.experiment.tasks["finetune_ncs"]}
  new_head = {"finetune.keep_head": False}
  c.experiment.arms = {
      "scratch_2d": arm("", TWO_D),
      "genesis_ct_2d_newhead": arm("@pretrain:ct2d", {**TWO_D, **new_head}),
      "genesis_xray_2d_newhead": arm("@pretrain:xray2d", {**TWO_D, **new_head}),
      "scratch": arm(""), "genesis_newhead": arm("@pretrain", new_head)}
  c.experiment.compare = (("genesis_ct_2d_newhead", "scratch_2d"),
                          ("genesis_xray_2d_newhead", "scratch_2d"),
                          ("genesis_newhead", "scratch"))
  c.experiment.trials = 5
