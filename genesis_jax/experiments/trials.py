"""The Scratch-vs-Genesis experiment: N independent fine-tuning trials per arm and task.

Every arm of a task runs on the same split (fixed by the data, not the seed) with the same trial
seeds, so arms differ only in their initialisation. Finished trials (their eval.json) are reused,
so an interrupted experiment continues where it stopped. Results: <workdir>/results.{md,json,png}
with mean +- std per arm and two-sided tests against the scratch arm (report.py says which).
Tasks and arms are dicts in `config.experiment` (see schema.experiment_config and docs/config.md),
each with its own overrides, keyed like the config.
"""
from __future__ import annotations

import json
import pathlib

from genesis_jax import errors
from genesis_jax.config.loading import apply_overrides, load_config_file, ordered_names
from genesis_jax.config.validate import validate
from genesis_jax.experiments import report

TASK_METRIC = {"classify": ("auc", "AUC"), "segment": ("mean_iou", "IoU"),
               "multilabel": ("auc", "AUC")}  # multilabel: the mean over the findings.


def arms_of(exp) -> list[tuple[str, str, object]]:
  """[(arm, init, overrides)] in the order written; an arm's overrides apply last."""
  return [(name, str(exp.arms[name].init), exp.arms[name].get("overrides"))
          for name in ordered_names(exp.arms)]


def tasks_of(exp) -> list[tuple[str, str, object]]:
  """[(task name, config file, overrides)] in the order written."""
  return [(name, str(exp.tasks[name].config), exp.tasks[name].get("overrides"))
          for name in ordered_names(exp.tasks)]


def task_config(exp, task_file: str, task_overrides, arm_overrides):
  """A task's config with the experiment's, the task's and the arm's overrides, in that order."""
  config = load_config_file(task_file)
  for overrides in (exp.overrides, task_overrides, arm_overrides):
    apply_overrides(config, overrides)
  return config


def own_config_file(entry) -> str | None:
  """The config file a pre-training variant names ({'config': file, 'overrides': {...}}), or None
  for a variant that is overrides of experiment.pretrain_config (the pre-training configs have
  no top-level key 'config', so the two forms cannot be confused)."""
  if hasattr(entry, "keys") and "config" in entry and set(entry.keys()) <= {"config", "overrides"}:
    return str(entry["config"])
  return None


def pretrain_file(exp, variant: str = "") -> str:
  """The config file of the experiment's pre-training or of one of its variants."""
  own = own_config_file(exp.pretrain_variants[variant]) if variant else None
  return own or str(exp.pretrain_config)


def pretrain_config(exp, variant: str = ""):
  """The pre-training config: the file, experiment.pretrain_overrides, then the variant's.

  A variant naming its own config file ({'config': file, 'overrides': {...}}) is that file with
  its own overrides only (experiment.pretrain_overrides are for experiment.pretrain_config)."""
  entry = exp.pretrain_variants[variant] if variant else None
  own = own_config_file(entry) if variant else None
  if own is not None:
    return apply_overrides(load_config_file(own), entry.get("overrides"))
  config = apply_overrides(load_config_file(exp.pretrain_config), exp.pretrain_overrides)
  if variant:
    apply_overrides(config, entry)
  return config


def pretrain_variant(init: str) -> str | None:
  """None for an arm that uses no pre-training of the experiment; "" for '@pretrain'; the
  variant's name for '@pretrain:<name>'."""
  if init == "@pretrain":
    return ""
  if init.startswith("@pretrain:"):
    return init.partition(":")[2]
  return None


def shared_phantom_path(tcfg, workdir: pathlib.Path) -> pathlib.Path:
  """Where the trials of an experiment share a built-in phantom data set (~34 MB, ~12 s each).

  One folder per (subjects, seed, shape), the parameters that fix the data set, so every trial
  and arm with the same parameters reads the same files instead of writing its own copy.
  """
  from genesis_jax.data import tasks as task_data
  d = tcfg.data
  n = task_data.num_cases(d)
  shape = "x".join(str(int(s)) for s in d.phantom_shape)
  return workdir / "phantom_data" / f"seed{int(d.phantom_seed)}_{n}cases_{shape}"


def check_trial_configs(config) -> None:
  """Every task x arm trial config (and the pre-training config, if an arm uses it) takes its
  overrides and validates. Run before any (long) pre-training, so a misspelt key or a bad value
  in an override fails at once, not hours later."""
  exp = config.experiment
  arms = arms_of(exp)
  for task, task_file, task_overrides in tasks_of(exp):
    for arm, _, arm_overrides in arms:
      try:
        validate(task_config(exp, task_file, task_overrides, arm_overrides))
      except errors.ConfigError as e:
        raise type(e)(f"experiment task {task!r}, arm {arm!r}: {e}") from None
  for variant in sorted({pretrain_variant(init) for _, init, _ in arms} - {None}):
    try:
      validate(pretrain_config(exp, variant))
    except errors.ConfigError as e:
      which = f"variant {variant!r} of " if variant else ""
      where = f"{which}{pretrain_file(exp, variant)}"
      raise type(e)(f"experiment pre-training ({where}): {e}") from None


def _check_reusable(run_dir: pathlib.Path, tcfg, base) -> None:
  """A finished trial is reused only if it ran with the config this experiment asks for.

  Keys the saved config lacks (added to genesis_jax since) count as matching when they are at
  the task config's own value (`base`, no overrides), i.e. the behaviour the trial ran with;
  keys only the saved config has are no longer fine-tuning keys and do not count.
  For built-in phantom data `data.path` is only where the set was written (the set is fixed by
  its seed, shape and case counts, which are compared), so it does not count.
  """
  saved_file = run_dir / "config.json"
  if not saved_file.exists():
    return
  from flax import traverse_util
  flat = lambda text: traverse_util.flatten_dict(json.loads(text), sep=".")
  saved = flat(saved_file.read_text())
  wanted = flat(tcfg.to_json_best_effort())
  default = flat(base.to_json_best_effort())
  if saved.get("data.source") == wanted.get("data.source") in ("phantom", "phantom_xray"):
    saved.pop("data.path", None)
    wanted.pop("data.path", None)
  # Keys the fine-tuning schema no longer has (e.g. the pre-training sections older fine-tuning
  # configs carried) were unused by the trial: they do not count either.
  diff = sorted(k for k in wanted if saved.get(k) != wanted.get(k)
                and not (k not in saved and wanted.get(k) == default.get(k)))
  if diff:
    shown = "; ".join(f"{k}: ran with {saved.get(k)!r}, now {wanted.get(k)!r}" for k in diff[:6])
    raise errors.ConfigError(
        f"finished trial {run_dir} ran with a different config ({shown}"
        f"{'; ...' if len(diff) > 6 else ''}). Delete that directory to rerun it, or run this "
        f"experiment in a new workdir.")


def _pretrain(config, workdir: pathlib.Path, variant: str = "") -> pathlib.Path:
  from genesis_jax.train import pretrain
  run_dir = workdir / (f"pretrain_{variant}" if variant else "pretrain")
  pcfg = pretrain_config(config.experiment, variant)
  if (run_dir / "summary.json").exists():
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("final_step", 0) >= pcfg.num_steps or summary.get("stopped_early"):
      return run_dir
  print(f"[experiment] pre-training in {run_dir}", flush=True)
  pretrain.train(pcfg, run_dir)
  return run_dir


def run(config, workdir) -> dict:
  """Runs the experiment in `workdir`, locked (train/workdir.py) for its whole length; its
  pre-training and trials lock their own sub-workdirs."""
  from genesis_jax.train import workdir as workdir_lib
  check_trial_configs(config)
  with workdir_lib.acquire(workdir):
    return run_locked(config, pathlib.Path(workdir))


def run_locked(config, workdir: pathlib.Path) -> dict:
  """The experiment's trials and report (`run` holds the workdir's lock)."""
  from genesis_jax.train import finetune
  exp = config.experiment
  arms = arms_of(exp)
  pretrained = {}
  for arm, init, _ in arms:
    variant = pretrain_variant(init)
    if variant is not None:
      pretrained[arm] = str(_pretrain(config, workdir, variant))
  results: dict[str, dict[str, list[float]]] = {}
  metric_names: dict[str, str] = {}
  for task, task_file, task_overrides in tasks_of(exp):
    tcfg0 = load_config_file(task_file)
    key, label = TASK_METRIC[tcfg0.task.kind]
    metric_names[task] = label
    results[task] = {}
    for arm, init, arm_overrides in arms:
      results[task][arm] = []
      for t in range(int(exp.trials)):
        run_dir = workdir / task / arm / f"trial_{t}"
        eval_file = run_dir / "eval.json"
        tcfg = task_config(exp, task_file, task_overrides, arm_overrides)
        tcfg.seed = int(exp.seed) + t
        tcfg.finetune.init = pretrained.get(arm, init)
        if tcfg.data.source == "phantom" and not tcfg.data.path:
          tcfg.data.path = str(shared_phantom_path(tcfg, workdir))
        if tcfg.data.source == "phantom_xray" and not tcfg.data.path:  # Radiographs: shared too.
          tcfg.data.path = str(shared_phantom_path(tcfg, workdir / "xray"))
        if eval_file.exists():
          _check_reusable(run_dir, tcfg, tcfg0)
        else:
          print(f"[experiment] {task} / {arm} / trial {t} -> {run_dir}", flush=True)
          finetune.train(tcfg, run_dir)
        value = json.loads(eval_file.read_text())[key]
        results[task][arm].append(float(value))
  pairs = [tuple(p) for p in exp.compare] or None
  summary = report.summarize_trials(results, metric_names, pairs=pairs)
  md, js, png = report.write_report(summary, workdir, exp.report)
  report.write_bar_chart(summary, workdir, exp.report)  # <report>_bars.png: bars with p marks.
  print(pathlib.Path(md).read_text(), flush=True)
  return summary
