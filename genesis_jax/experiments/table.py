"""Results table of an experiment workdir from the trials finished so far.

  python -m genesis_jax.experiments.table runs/experiment

Reads <workdir>/<task>/<arm>/trial_*/eval.json (AUC for classification, mean IoU for
segmentation) and writes <workdir>/partial/results.{md,json,png} with
genesis_jax.experiments.report; useful while an experiment is still running or was stopped early.
"""
from __future__ import annotations

import json
import pathlib
import sys

from genesis_jax.experiments import report
from genesis_jax.experiments.trials import TASK_METRIC


def main(workdir: str) -> None:
  root = pathlib.Path(workdir)
  results, names = {}, {}
  for eval_file in sorted(root.glob("*/*/trial_*/eval.json")):
    task, arm = eval_file.parts[-4], eval_file.parts[-3]
    ev = json.loads(eval_file.read_text())
    key, label = TASK_METRIC[ev["kind"]]
    results.setdefault(task, {}).setdefault(arm, []).append(float(ev[key]))
    names[task] = label
  if not results:
    sys.exit(f"no finished trials under {root}")
  out = root / "partial"
  out.mkdir(exist_ok=True)
  md, _, _ = report.write_report(report.summarize_trials(results, names), out)
  print(pathlib.Path(md).read_text())


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/experiment")
