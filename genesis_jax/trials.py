"""The Scratch-vs-Genesis experiment: N independent fine-tuning trials per arm and task.

Every arm of a task runs on the same split (fixed by the data, not the seed) with the same trial
seeds, so arms differ only in their initialisation. Finished trials (their eval.json) are reused,
so an interrupted experiment continues where it stopped. Results: <workdir>/results.{md,json,png}
with mean +- std per arm and two-sided tests against the scratch arm (report.py says which).
"""
from __future__ import annotations

import ast
import json
import pathlib
import runpy

from genesis_jax import report

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


def parse_arms(text: str) -> dict[str, str]:
  arms = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, init = item.partition("=")
    arms[name.strip()] = init.strip()
  if not arms:
    raise ValueError("config.experiment.arms is empty")
  return arms


def _pretrain(config, workdir: pathlib.Path) -> pathlib.Path:
  from genesis_jax.training import pretrain
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
  from genesis_jax.training import finetune
  workdir = pathlib.Path(workdir)
  exp = config.experiment
  arms = parse_arms(exp.arms)
  pretrained = {}
  for arm, init in arms.items():
    if init == "@pretrain":
      pretrained[arm] = str(_pretrain(config, workdir))
  results: dict[str, dict[str, list[float]]] = {}
  metric_names: dict[str, str] = {}
  for task_file in filter(None, (s.strip() for s in exp.tasks.split(","))):
    tcfg0 = load_config_file(task_file)
    task = pathlib.Path(task_file.partition(":")[0]).stem
    key, label = TASK_METRIC[tcfg0.task.kind]
    metric_names[task] = label
    results[task] = {}
    for arm, init in arms.items():
      results[task][arm] = []
      for t in range(int(exp.trials)):
        run_dir = workdir / task / arm / f"trial_{t}"
        eval_file = run_dir / "eval.json"
        if not eval_file.exists():
          tcfg = apply_overrides(load_config_file(task_file), parse_overrides(exp.overrides))
          tcfg.seed = int(exp.seed) + t
          tcfg.finetune.init = pretrained.get(arm, init)
          print(f"[experiment] {task} / {arm} / trial {t} -> {run_dir}", flush=True)
          finetune.train(tcfg, run_dir)
        value = json.loads(eval_file.read_text())[key]
        results[task][arm].append(float(value))
  summary = report.summarize_trials(results, metric_names)
  md, js, png = report.write_report(summary, workdir)
  print(pathlib.Path(md).read_text(), flush=True)
  return summary
