"""Report on fake trial numbers: right arms, N trials each, p-values in [0, 1], files written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from genesis_jax.experiments import report


def _fake_results(n: int = 10) -> dict:
  rng = np.random.default_rng(0)
  return {
      "NCC": {"scratch": (0.9425 + 0.0507 * rng.standard_normal(n)).clip(0, 1).tolist(),
              "genesis": (0.9820 + 0.0051 * rng.standard_normal(n)).tolist()},
      "NCS": {"scratch": (0.7405 + 0.0197 * rng.standard_normal(n)).tolist(),
              "genesis": (0.7762 + 0.0064 * rng.standard_normal(n)).tolist(),
              "genesis_2d": (0.75 + 0.01 * rng.standard_normal(n)).tolist()},
  }


def test_summary_arms_counts_and_pvalues():
  res = _fake_results()
  s = report.summarize_trials(res, {"NCC": "AUC", "NCS": "IoU"})
  assert s["arms"] == ["scratch", "genesis", "genesis_2d"]
  for task, arms in res.items():
    entry = s["tasks"][task]
    assert entry["baseline"] == "scratch"
    assert set(entry["arms"]) == set(arms)
    for arm, trials in arms.items():
      st = entry["arms"][arm]
      assert st["n"] == 10 and st["trials"] == pytest.approx(trials)
      assert st["mean"] == pytest.approx(np.mean(trials))
      assert st["std"] == pytest.approx(np.std(trials, ddof=1))
    assert [c["arm"] for c in entry["comparisons"]] == [a for a in arms if a != "scratch"]
    for c in entry["comparisons"]:
      assert 0.0 <= c["welch_p"] <= 1.0 and 0.0 <= c["mannwhitney_p"] <= 1.0
      a, b = arms[c["arm"]], arms["scratch"]
      assert c["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
      assert c["mannwhitney_p"] == pytest.approx(
          stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
  # Genesis is far better on NCS in this fake data: the test must say so.
  assert s["tasks"]["NCS"]["comparisons"][0]["welch_p"] < 1e-3


def test_hand_values_and_table_format():
  # mean 3, sample std 1 (ddof=1); mean 5, std 1. Welch t = -2 / sqrt(2/3), df = 4.
  s = report.summarize_trials({"T": {"scratch": [0.02, 0.03, 0.04], "genesis": [0.04, 0.05, 0.06]}},
                              {"T": "AUC"})
  g = s["tasks"]["T"]["arms"]["genesis"]
  assert g["mean"] == pytest.approx(0.05) and g["std"] == pytest.approx(0.01)
  t = -0.02 / np.sqrt(2 * 0.01**2 / 3)
  c = s["tasks"]["T"]["comparisons"][0]
  assert c["welch_t"] == pytest.approx(-t)
  assert c["welch_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=4))
  md = report.to_markdown(s)
  assert "| T | AUC (x100) | 3.00 ± 1.00 (n=3) | 5.00 ± 1.00 (n=3) |" in md
  assert "p Welch (genesis vs scratch)" in md


def test_undefined_tests_and_baseline_choice():
  s = report.summarize_trials({"T": {"a": [0.5], "b": [0.6, 0.7], "c": [0.5, 0.5]}},
                              {"T": "Dice"}, baseline="c")
  comps = {c["arm"]: c for c in s["tasks"]["T"]["comparisons"]}
  assert s["tasks"]["T"]["baseline"] == "c"
  assert comps["a"]["welch_p"] is None  # One trial: Welch undefined.
  assert 0.0 <= comps["a"]["mannwhitney_p"] <= 1.0
  assert 0.0 <= comps["b"]["welch_p"] <= 1.0
  s2 = report.summarize_trials({"T": {"x": [0.5, 0.5], "y": [0.5, 0.5]}}, {"T": "AUC"})
  assert s2["tasks"]["T"]["baseline"] == "x"  # No "scratch": the first arm.
  assert s2["tasks"]["T"]["comparisons"][0]["welch_p"] is None  # Both constant.


def test_explicit_pairs():
  res = _fake_results()
  s = report.summarize_trials(res, {"NCC": "AUC", "NCS": "IoU"},
                              pairs=[("genesis_2d", "genesis"), ("genesis", "scratch")])
  assert [(c["arm"], c["vs"]) for c in s["tasks"]["NCS"]["comparisons"]] == [
      ("genesis_2d", "genesis"), ("genesis", "scratch")]
  # NCC lacks genesis_2d: only the pair it has.
  assert [(c["arm"], c["vs"]) for c in s["tasks"]["NCC"]["comparisons"]] == [("genesis", "scratch")]
  c = s["tasks"]["NCS"]["comparisons"][0]
  assert c["welch_p"] == pytest.approx(
      stats.ttest_ind(res["NCS"]["genesis_2d"], res["NCS"]["genesis"], equal_var=False).pvalue)
  assert "p Welch (genesis_2d vs genesis)" in report.to_markdown(s)
  with pytest.raises(ValueError, match=r"\['genesys'\]"):
    report.summarize_trials(res, {"NCC": "AUC", "NCS": "IoU"}, pairs=[("genesys", "scratch")])


@pytest.mark.parametrize("results,names,match", [
    ({}, {}, "empty"),
    ({"T": {"a": [0.1]}}, {}, "metric_names"),
    ({"T": {"a": []}}, {"T": "AUC"}, "no trials"),
    ({"T": {"a": [0.1, float("nan")]}}, {"T": "AUC"}, "NaN"),
])
def test_bad_results_raise(results, names, match):
  with pytest.raises(ValueError, match=match):
    report.summarize_trials(results, names)
  with pytest.raises(ValueError, match="baseline"):
    report.summarize_trials({"T": {"a": [0.1]}}, {"T": "AUC"}, baseline="scratch")


def test_write_report_files(tmp_path):
  s = report.summarize_trials(_fake_results(5), {"NCC": "AUC", "NCS": "IoU"},
                              scale={"NCC": 100, "NCS": 1})
  md, js, png = report.write_report(s, tmp_path / "out")
  with open(md) as f:
    text = f.read()
  header = next(l for l in text.splitlines() if l.startswith("| task |"))
  assert header.startswith("| task | metric | scratch | genesis | genesis_2d |")
  assert text.count("(n=5)") == 5  # 2 arms for NCC + 3 for NCS.
  table_rows = [l for l in text.splitlines() if l.startswith("| NC")]
  assert len(table_rows) == 2 and "—" in table_rows[0]  # NCC has no genesis_2d arm.
  with open(js) as f:
    loaded = json.load(f)
  assert loaded["tasks"]["NCC"]["arms"]["genesis"]["n"] == 5
  assert loaded["tasks"]["NCS"]["scale"] == 1
  img = Image.open(png)
  # One panel per task, each widened to fit its arms' labels (NCS has 3 arms).
  assert img.size[1] == report.PANEL_H and img.size[0] > 2 * report.PANEL_W
  pix = np.asarray(img.convert("RGB")).reshape(-1, 3)
  for colour in report.COLOURS[:3]:  # Every arm was drawn in its colour.
    assert np.any(np.all(pix == colour, axis=1)), colour


def test_bars_rise_from_zero_and_a_zero_mean_is_no_bar():
  """A task whose values reach 0 (an IoU of 0 in every trial) gets an axis from 0: the 0 arm draws
  no bar, the other arm's bar ends at the axis line; values far from 0 keep a cut axis."""
  results = {"NCS": {"scratch": [0.02, 0.10, 0.08, 0.10, 0.03], "genesis": [0.0] * 5}}
  summary = report.summarize_trials(results, {"NCS": "IoU"}, scale={"NCS": 100})
  img = np.asarray(report.draw_bars(summary).convert("RGB"))
  area = img[:report.PANEL_H]
  for i, colour in enumerate(report.COLOURS[:2]):
    hit = np.all(area == colour, axis=-1)
    if i == 0:  # scratch: a bar whose foot sits on the axis line (y1 = PANEL_H - MARGIN_B).
      ys = np.nonzero(hit.any(axis=1))[0]
      assert ys.size and ys.max() >= report.PANEL_H - report.MARGIN_B - 2
    else:  # genesis, mean 0: nothing drawn in its colour above the labels.
      assert not hit[:report.PANEL_H - report.MARGIN_B].any()
  far = report.summarize_trials({"NCC": {"a": [0.80, 0.82, 0.81], "b": [0.70, 0.71, 0.69]}},
                                {"NCC": "AUC"}, scale={"NCC": 100})
  img = np.asarray(report.draw_bars(far).convert("RGB"))[:report.PANEL_H]
  b = np.nonzero(np.all(img == report.COLOURS[1], axis=-1).any(axis=1))[0]
  a = np.nonzero(np.all(img == report.COLOURS[0], axis=-1).any(axis=1))[0]
  # A cut axis: the 0.70 bar is far shorter than 70/81 of the 0.81 bar.
  assert (b.max() - b.min()) < 0.5 * (a.max() - a.min())
