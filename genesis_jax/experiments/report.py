"""Experiment statistics and report: mean +- std per arm, p-values between arms, table and chart.

Mirrors the paper's results table (mean +- std of each arm's trials per task):
for every task, each arm (scratch, genesis, ...) has N independent trials of one metric. The
summary gives per arm the mean and the sample standard deviation (ddof=1) of the trials, and for
each arm against the task's baseline arm two two-sided tests:
- Welch's t-test, `scipy.stats.ttest_ind(a, b, equal_var=False)` (the paper reports t-test
  p-values; Welch's does not assume equal variances, which the published stds contradict);
- Mann-Whitney U, `scipy.stats.mannwhitneyu(a, b, alternative="two-sided")`, which does not
  assume normality (few trials, bounded metrics).
A p-value is None where the test is undefined (fewer than 2 trials in an arm for Welch, or both
arms constant).

Metric values are stored as given (e.g. AUC in [0, 1]); `scale` is only a display multiplier
(default 100, the paper's percentages).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats

from genesis_jax import errors
from genesis_jax.eval import visualize

TESTS = {
    "welch": "two-sided Welch's t-test, scipy.stats.ttest_ind(equal_var=False)",
    "mannwhitney": "two-sided Mann-Whitney U, scipy.stats.mannwhitneyu(alternative='two-sided')",
}


class TrialResultsError(errors.DataError):
  """Trial results that cannot be summarised: empty arms, non-finite values, unknown baseline."""


def _p_or_none(p) -> float | None:
  p = float(p)
  return None if math.isnan(p) else min(max(p, 0.0), 1.0)


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
  """Both tests of arm `a` against baseline `b`."""
  out = {"welch_t": None, "welch_p": None, "mannwhitney_u": None, "mannwhitney_p": None}
  if a.size >= 2 and b.size >= 2 and (np.ptp(a) > 0 or np.ptp(b) > 0):
    with warnings.catch_warnings():
      # One constant arm (e.g. AUC 1.0 in every trial) is legitimate: Welch uses the other's
      # variance; scipy still warns about the zero variance it computes.
      warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
      t = stats.ttest_ind(a, b, equal_var=False)
    out["welch_t"], out["welch_p"] = float(t.statistic), _p_or_none(t.pvalue)
  if a.size >= 1 and b.size >= 1:
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    out["mannwhitney_u"], out["mannwhitney_p"] = float(u.statistic), _p_or_none(u.pvalue)
  return out


def summarize_trials(results: Mapping[str, Mapping[str, Sequence[float]]],
                     metric_names: Mapping[str, str], *, baseline: str | None = None,
                     pairs: Sequence[tuple[str, str]] | None = None,
                     scale: float | Mapping[str, float] = 100.0) -> dict:
  """Per-task, per-arm statistics and tests against a baseline arm.

  Args:
    results: {task: {arm: [metric value of each independent trial]}}; arms may differ by task.
    metric_names: {task: metric name shown in the table, e.g. "AUC", "IoU"}.
    baseline: the arm every other arm is tested against; default "scratch" where a task has it,
      else the task's first arm.
    pairs: instead, the (arm, vs) comparisons to test; pairs whose arms a task lacks are skipped
      there, and naming an arm that no task has is an error.
    scale: display multiplier for the table and chart, one for all tasks or {task: scale}.

  Returns:
    A JSON-serialisable dict: {"tests", "std", "arms" (all arms, first-seen order), "tasks":
    {task: {"metric", "scale", "baseline", "arms": {arm: {"n", "mean", "std", "median", "min",
    "max", "trials"}}, "comparisons": [{"arm", "vs", "diff", "welch_t", "welch_p",
    "mannwhitney_u", "mannwhitney_p"}]}}}.
  """
  if not results:
    raise TrialResultsError("results is empty: no tasks to summarise")
  summary: dict = {"tests": dict(TESTS), "std": "sample standard deviation (ddof=1) over trials",
                   "arms": [], "tasks": {}}
  for task, arms in results.items():
    if task not in metric_names:
      raise TrialResultsError(f"task {task!r} has no entry in metric_names")
    if not arms:
      raise TrialResultsError(f"task {task!r} has no arms")
    values = {}
    for arm, trials in arms.items():
      v = np.asarray(list(trials), dtype=np.float64).ravel()
      if v.size == 0:
        raise TrialResultsError(f"results[{task!r}][{arm!r}] has no trials")
      if not np.all(np.isfinite(v)):
        raise TrialResultsError(f"results[{task!r}][{arm!r}] has a NaN or Inf trial: {v.tolist()}")
      values[arm] = v
      if arm not in summary["arms"]:
        summary["arms"].append(arm)
    if baseline is not None:
      if baseline not in values:
        raise TrialResultsError(
            f"baseline arm {baseline!r} missing from task {task!r} (arms: {list(values)})")
      base = baseline
    else:
      base = "scratch" if "scratch" in values else next(iter(values))
    task_scale = float(scale[task]) if isinstance(scale, Mapping) else float(scale)
    entry = {"metric": metric_names[task], "scale": task_scale, "baseline": base,
             "arms": {}, "comparisons": []}
    for arm, v in values.items():
      entry["arms"][arm] = {
          "n": int(v.size), "mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
          "trials": v.tolist()}
    todo = ([(a, b) for a, b in pairs if a in values and b in values] if pairs is not None
            else [(arm, base) for arm in values if arm != base])
    for arm, vs in todo:
      entry["comparisons"].append(
          {"arm": arm, "vs": vs, "diff": float(values[arm].mean() - values[vs].mean()),
           **_compare(values[arm], values[vs])})
    summary["tasks"][task] = entry
  if pairs is not None:
    unknown = sorted({a for pair in pairs for a in pair} - set(summary["arms"]))
    if unknown:
      raise TrialResultsError(f"comparison arm(s) {unknown} not among the arms {summary['arms']}")
  return summary


def _fmt_p(p: float | None) -> str:
  if p is None:
    return "n/a"
  return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def to_markdown(summary: dict) -> str:
  """The results table: one row per task, `mean ± std (n=N)` per arm, p-values per comparison."""
  arms = summary["arms"]
  pairs = []
  for entry in summary["tasks"].values():
    for c in entry["comparisons"]:
      if (c["arm"], c["vs"]) not in pairs:
        pairs.append((c["arm"], c["vs"]))
  header = ["task", "metric", *arms]
  for a, b in pairs:
    header += [f"p Welch ({a} vs {b})", f"p MWU ({a} vs {b})"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for task, entry in summary["tasks"].items():
    s = entry["scale"]
    row = [task, entry["metric"] + ("" if s == 1 else f" (x{s:g})")]
    for arm in arms:
      st = entry["arms"].get(arm)
      row.append("—" if st is None else
                 f"{st['mean'] * s:.2f} ± {st['std'] * s:.2f} (n={st['n']})")
    comps = {(c["arm"], c["vs"]): c for c in entry["comparisons"]}
    for pair in pairs:
      c = comps.get(pair)
      row += ["—", "—"] if c is None else [_fmt_p(c["welch_p"]), _fmt_p(c["mannwhitney_p"])]
    lines.append("| " + " | ".join(row) + " |")
  notes = [
      "# Results", "",
      f"Mean ± {summary['std']}, n independent trials per arm. "
      f"p Welch: {summary['tests']['welch']}; p MWU: {summary['tests']['mannwhitney']}; "
      "each arm against its task's baseline. n/a: test undefined (fewer than 2 trials or "
      "constant arms).", "", *lines, "", "## Trials", ""]
  for task, entry in summary["tasks"].items():
    for arm, st in entry["arms"].items():
      vals = ", ".join(f"{v * entry['scale']:.2f}" for v in st["trials"])
      notes.append(f"- {task} / {arm}: {vals}")
  return "\n".join(notes) + "\n"


# Chart geometry, pixels.
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T = 300, 380, 64, 48, 40
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def panel_layout(summary: dict):
  """(tasks, panel x starts, arm colours) shared by the charts: one panel per task, wide enough
  for each arm's label and "mean±std" line (~95 px per arm)."""
  tasks = list(summary["tasks"].items())
  widths = [max(PANEL_W, MARGIN_L + 12 + 95 * len(entry["arms"])) for _, entry in tasks]
  starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
  colour = {arm: COLOURS[i % len(COLOURS)] for i, arm in enumerate(summary["arms"])}
  return tasks, starts, colour


def draw_chart(summary: dict) -> Image.Image:
  """One panel per task: every trial as a dot, the mean as a bar, ± one std as a whisker."""
  tasks, starts, colour = panel_layout(summary)
  img = Image.new("RGB", (int(starts[-1]), PANEL_H), "white")
  d = ImageDraw.Draw(img)
  font, small = visualize.font(14), visualize.font(11)
  for p, (task, entry) in enumerate(tasks):
    s = entry["scale"]
    x0, x1 = int(starts[p]) + MARGIN_L, int(starts[p + 1]) - 12
    y0, y1 = MARGIN_T, PANEL_H - MARGIN_B
    lo = min(min(a["min"], a["mean"] - a["std"]) for a in entry["arms"].values()) * s
    hi = max(max(a["max"], a["mean"] + a["std"]) for a in entry["arms"].values()) * s
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1e-3)
    lo, hi = lo - pad, hi + pad
    to_y = lambda v: y1 - (v * s - lo) / (hi - lo) * (y1 - y0)
    d.text(((x0 + x1) / 2, 8), f"{task} ({entry['metric']})", fill="black", font=font, anchor="mt")
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for t in np.linspace(lo, hi, 6)[1:-1]:
      y = y1 - (t - lo) / (hi - lo) * (y1 - y0)
      d.line([(x0 - 4, y), (x0, y)], fill="black")
      d.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
      d.text((x0 - 6, y), f"{t:.4g}", fill="black", font=small, anchor="rm")
    arms = list(entry["arms"].items())
    slot = (x1 - x0) / len(arms)
    for i, (arm, st) in enumerate(arms):
      cx = x0 + slot * (i + 0.5)
      c = colour[arm]
      half = min(slot * 0.3, 40)
      d.line([(cx - half, to_y(st["mean"])), (cx + half, to_y(st["mean"]))], fill=c, width=3)
      ylo, yhi = to_y(st["mean"] - st["std"]), to_y(st["mean"] + st["std"])
      d.line([(cx, ylo), (cx, yhi)], fill=c, width=2)
      for yy in (ylo, yhi):
        d.line([(cx - half / 2, yy), (cx + half / 2, yy)], fill=c, width=2)
      n = len(st["trials"])
      for j, v in enumerate(st["trials"]):
        # Deterministic spread beside the whisker so coincident trials stay visible.
        dx = half * 0.8 * ((j + 0.5) / n - 0.5) * 2 if n > 1 else 0.0
        y = to_y(v)
        d.ellipse([cx + dx - 3, y - 3, cx + dx + 3, y + 3], outline=c, fill=(255, 255, 255))
      d.text((cx, y1 + 6), arm, fill="black", font=small, anchor="mt")
      d.text((cx, y1 + 22), f"{st['mean'] * s:.2f}±{st['std'] * s:.2f}", fill=c, font=small,
             anchor="mt")
  return img


# Significance marks of the bar chart: (p below, mark), the most significant first.
MARKS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


def significance_mark(p: float | None) -> str:
  """'***', '**', '*' for p < .001, .01, .05; '' otherwise or when the test is undefined."""
  if p is None:
    return ""
  return next((mark for level, mark in MARKS if p < level), "")


def draw_bars(summary: dict, test: str = "welch") -> Image.Image:
  """The poster's Result 2 style: one panel per task, a bar per arm at its mean, a whisker of
  ± one std, and above it the significance mark of the arm's first comparison (`test`: welch or
  mannwhitney p) against its baseline (experiment.compare, else the task's baseline arm). The
  footer names each arm's baseline. The value axis starts below the lowest mean - std, not at 0,
  so that differences of a few points stay visible, unless that is near 0 (within a quarter of
  the highest mean + std): then it starts at 0. Bars rise from 0 where the axis holds 0 (a mean
  of 0 is no bar), else from the axis' foot; the axis is labelled at the left."""
  tasks, starts, colour = panel_layout(summary)
  footer = 20 + 16 * len(tasks)
  img = Image.new("RGB", (int(starts[-1]), PANEL_H + footer), "white")
  d = ImageDraw.Draw(img)
  font, small = visualize.font(14), visualize.font(11)
  for p, (task, entry) in enumerate(tasks):
    s = entry["scale"]
    x0, x1 = int(starts[p]) + MARGIN_L, int(starts[p + 1]) - 12
    y0, y1 = MARGIN_T + 16, PANEL_H - MARGIN_B
    lo = min(a["mean"] - a["std"] for a in entry["arms"].values()) * s
    hi = max(a["mean"] + a["std"] for a in entry["arms"].values()) * s
    pad = (hi - lo) * 0.15 or max(abs(hi) * 0.05, 1e-3)
    lo, hi = (0.0 if 0 <= lo <= 0.25 * hi else lo - pad), hi + pad * 0.5
    to_y = lambda v: y1 - (v * s - lo) / (hi - lo) * (y1 - y0)
    foot = to_y(0.0) if lo <= 0 <= hi else y1 - 1  # Where bars start.
    d.text(((x0 + x1) / 2, 8), f"{task} ({entry['metric']})", fill="black", font=font, anchor="mt")
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for t in np.linspace(lo, hi, 6)[1:-1]:
      y = y1 - (t - lo) / (hi - lo) * (y1 - y0)
      d.line([(x0 - 4, y), (x0, y)], fill="black")
      d.text((x0 - 6, y), f"{t:.4g}", fill="black", font=small, anchor="rm")
    marks = {}
    for c in entry["comparisons"]:
      marks.setdefault(c["arm"], (significance_mark(c[f"{test}_p"]), c["vs"]))
    arms = list(entry["arms"].items())
    slot = (x1 - x0) / len(arms)
    for i, (arm, st) in enumerate(arms):
      cx = x0 + slot * (i + 0.5)
      half = min(slot * 0.3, 30)
      top = to_y(st["mean"])
      if abs(top - foot) >= 1:
        d.rectangle([cx - half, min(top, foot), cx + half, max(top, foot)], fill=colour[arm])
      ylo, yhi = to_y(st["mean"] - st["std"]), to_y(st["mean"] + st["std"])
      d.line([(cx, ylo), (cx, yhi)], fill="black", width=2)
      for yy in (ylo, yhi):
        d.line([(cx - half / 3, yy), (cx + half / 3, yy)], fill="black", width=2)
      mark = marks.get(arm, ("", ""))[0]
      if mark:
        d.text((cx, yhi - 4), mark, fill="black", font=font, anchor="mb")
      d.text((cx, y1 + 6), arm, fill="black", font=small, anchor="mt")
      d.text((cx, y1 + 22), f"{st['mean'] * s:.2f}±{st['std'] * s:.2f}", fill="black",
             font=small, anchor="mt")
  name = {"welch": "two-sided Welch's t-test", "mannwhitney": "two-sided Mann-Whitney U"}[test]
  d.text((8, PANEL_H + 2), f"* p < .05, ** p < .01, *** p < .001 ({name}, n trials per arm); "
         f"bars: mean, whiskers: ± 1 std", fill="black", font=small)
  for p, (task, entry) in enumerate(tasks):
    vs = ", ".join(f"{c['arm']} vs {c['vs']}" for c in entry["comparisons"]) or "none"
    d.text((8, PANEL_H + 18 + 16 * p), f"{task}: {vs}", fill="black", font=small)
  return img


def write_bar_chart(summary: dict, out_dir: str | os.PathLike, name: str = "results",
                    test: str = "welch") -> str:
  """Writes `draw_bars` to <out_dir>/<name>_bars.png; returns its path."""
  import io  # pylint: disable=import-outside-toplevel
  from genesis_jax.data import store  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}_bars.png")
  buf = io.BytesIO()
  draw_bars(summary, test).save(buf, format="PNG")
  store.write_bytes(path, buf.getvalue())  # Complete or absent.
  return path


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_json_safe(v) for v in x]
  return x


def write_report(summary: dict, out_dir: str | os.PathLike,
                 name: str = "results") -> tuple[str, str, str]:
  """Writes <name>.md, <name>.json and <name>.png into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  md = os.path.join(out_dir, f"{name}.md")
  js = os.path.join(out_dir, f"{name}.json")
  png = os.path.join(out_dir, f"{name}.png")
  with open(md, "w") as f:
    f.write(to_markdown(summary))
  with open(js, "w") as f:
    json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
  draw_chart(summary).save(png)
  return md, js, png
