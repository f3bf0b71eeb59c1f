"""The Scratch-vs-Genesis experiment: N independent fine-tuning trials per arm and task.

Every arm of a task runs on the same split (fixed by the data, not the seed) with the same trial
seeds, so arms differ only in their initialisation. Finished trials (their eval.json) are reused,
so an interrupted experiment continues where it stopped. Results: <workdir>/results.{md,json,png}
with mean +- std per arm and two-sided tests against the scratch arm (report.py says which).
Tasks and arms can carry their own overrides in brackets (see defaults.experiment_config).
"""
from __future__ import annotations

import ast
import json
import pathlib
import runpy

from genesis_jax.experiments import report

TASK_METRIC = {"classify": ("auc", "AUC"), "segment": ("mean_iou", "IoU")}


def parse_overrides(text: str) -> list[tuple[str, object]]:
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ValueError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A bare string.
    out.append((key.strip(), value))
  return out


def apply_overrides(config, overrides: list[tuple[str, object]]):
  """Sets dotted keys on a locked config; unknown keys raise with ml_collections' suggestion."""
  for key, value in overrides:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = getattr(node, p)
    current = getattr(node, leaf)
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    setattr(node, leaf, value)
  return config


def load_config_file(path: str):
  spec, _, variant = str(path).partition(":")
  if not pathlib.Path(spec).exists():
    raise FileNotFoundError(f"config file {spec!r} does not exist")
  get_config = runpy.run_path(spec)["get_config"]
  config = get_config(variant) if variant else get_config()
  config.lock()
  return config


def split_bracket(item: str, what: str) -> tuple[str, list[tuple[str, object]]]:
  """"head[key=value|key=value]" -> ("head", overrides); no brackets -> ("head", [])."""
  item = item.strip()
  if "[" not in item:
    if "]" in item:
      raise ValueError(f"{what} {item!r}: ']' without '['")
    return item, []
  head, _, rest = item.partition("[")
  if not rest.endswith("]"):
    raise ValueError(f"{what} {item!r}: overrides must end with ']', as in name[key=value|key=value]")
  return head.strip(), parse_overrides(rest[:-1].replace("|", ","))


def _items(text: str) -> list[str]:
  """Splits on commas outside brackets."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch == "[") - (ch == "]")
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  out.append(cur)
  return [s.strip() for s in out if s.strip()]


def parse_arms(text: str) -> dict[str, tuple[str, list[tuple[str, object]]]]:
  """"scratch=,genesis=@pretrain,probe=@pretrain[finetune.freeze_encoder=True]" ->
  {arm: (init, overrides)}; an arm's overrides apply after the experiment-wide ones."""
  arms = {}
  for item in _items(text):
    name, _, init = item.partition("=")
    init, overrides = split_bracket(init, f"arm {name.strip()!r}")
    arms[name.strip()] = (init, overrides)
  if not arms:
    raise ValueError("config.experiment.arms is empty")
  return arms


def parse_tasks(text: str) -> list[tuple[str, list[tuple[str, object]]]]:
  """"configs/a.py,configs/b.py[num_steps=100]" -> [(config file, overrides), ...]."""
  tasks = [split_bracket(item, "task") for item in _items(text)]
  if not tasks:
    raise ValueError("config.experiment.tasks is empty")
  return tasks


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
  from genesis_jax import run as experiment
  exp = config.experiment
  common = parse_overrides(exp.overrides)
  arms = parse_arms(exp.arms)
  for task_file, task_overrides in parse_tasks(exp.tasks):
    for _, arm_overrides in arms.values():
      experiment.validate(apply_overrides(load_config_file(task_file),
                                          common + task_overrides + arm_overrides))
  if any(init == "@pretrain" for init, _ in arms.values()):
    experiment.validate(apply_overrides(load_config_file(exp.pretrain_config),
                                        parse_overrides(exp.pretrain_overrides)))


def _check_reusable(run_dir: pathlib.Path, tcfg, base) -> None:
  """A finished trial is reused only if it ran with the config this experiment asks for.

  Keys the saved config lacks (added to genesis_jax since) count as matching when they are at
  the task config's own value (`base`, no overrides), i.e. the behaviour the trial ran with.
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
  if saved.get("data.source") == wanted.get("data.source") == "phantom":
    saved.pop("data.path", None)
    wanted.pop("data.path", None)
  diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k)
                and not (k not in saved and wanted.get(k) == default.get(k)))
  if diff:
    shown = "; ".join(f"{k}: ran with {saved.get(k)!r}, now {wanted.get(k)!r}" for k in diff[:6])
    raise ValueError(
        f"finished trial {run_dir} ran with a different config ({shown}"
        f"{'; ...' if len(diff) > 6 else ''}). Delete that directory to rerun it, or run this "
        f"experiment in a new workdir.")


def _pretrain(config, workdir: pathlib.Path) -> pathlib.Path:
  from genesis_jax.train import pretrain
  run_dir = workdir / "pretrain"
  pcfg = apply_overrides(load_config_file(config.experiment.pretrain_config),
                         parse_overrides(config.experiment.pretrain_overrides))
  if (run_dir / "summary.json").exists():
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("final_step", 0) >= pcfg.num_steps or summary.get("stopped_early"):
      return run_dir
  print(f"[experiment] pre-training in {run_dir}", flush=True)
  pretrain.train(pcfg, run_dir)
  return run_dir


def run(config, workdir) -> dict:
  from genesis_jax.train import finetune
  workdir = pathlib.Path(workdir)
  exp = config.experiment
  arms = parse_arms(exp.arms)
  pretrained = {}
  tasks = parse_tasks(exp.tasks)
  common = parse_overrides(exp.overrides)

  def trial_config(task_file, task_overrides, init, arm_overrides, t):
    tcfg = apply_overrides(load_config_file(task_file), common + task_overrides + arm_overrides)
    tcfg.seed = int(exp.seed) + t
    tcfg.finetune.init = init
    if tcfg.data.source == "phantom" and not tcfg.data.path:
      tcfg.data.path = str(shared_phantom_path(tcfg, workdir))
    return tcfg

  check_trial_configs(config)
  for arm, (init, _) in arms.items():
    if init == "@pretrain":
      pretrained[arm] = str(_pretrain(config, workdir))
  results: dict[str, dict[str, list[float]]] = {}
  metric_names: dict[str, str] = {}
  for task_file, task_overrides in tasks:
    tcfg0 = load_config_file(task_file)
    task = pathlib.Path(task_file.partition(":")[0]).stem
    key, label = TASK_METRIC[tcfg0.task.kind]
    metric_names[task] = label
    results[task] = {}
    for arm, (init, arm_overrides) in arms.items():
      results[task][arm] = []
      for t in range(int(exp.trials)):
        run_dir = workdir / task / arm / f"trial_{t}"
        eval_file = run_dir / "eval.json"
        tcfg = trial_config(task_file, task_overrides, pretrained.get(arm, init), arm_overrides, t)
        if eval_file.exists():
          _check_reusable(run_dir, tcfg, tcfg0)
        else:
          print(f"[experiment] {task} / {arm} / trial {t} -> {run_dir}", flush=True)
          finetune.train(tcfg, run_dir)
        value = json.loads(eval_file.read_text())[key]
        results[task][arm].append(float(value))
  pairs = None
  if exp.get("compare"):
    pairs = []
    for item in _items(exp.compare):
      a, sep, b = item.partition(":")
      if not sep or not a.strip() or not b.strip():
        raise ValueError(f"config.experiment.compare item {item!r} is not 'arm:other_arm'")
      pairs.append((a.strip(), b.strip()))
  summary = report.summarize_trials(results, metric_names, pairs=pairs)
  md, js, png = report.write_report(summary, workdir, exp.get("report", "results"))
  print(pathlib.Path(md).read_text(), flush=True)
  return summary
