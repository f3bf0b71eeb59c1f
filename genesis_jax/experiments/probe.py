"""Did pre-training learn transferable features? The probe of a pre-training run (mode=probe).

For every saved checkpoint of a pre-training workdir, and for a random init of the same network
(the pre-training's own initial weights: the model and seed of its config.json), the encoder runs
in inference mode (batch norm with its running statistics) on the labelled cubes of a target
task, and the output of each encoder level is average-pooled over space: an (N, C_level) feature
matrix per level. For each matrix:

- effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007): exp of the Shannon entropy of the singular values of the centred feature
  matrix, normalised to sum to one. 1 means every cube maps to one line; min(N, C) means all
  directions carry equal variance. A level whose rank falls during pre-training while the
  random init's stays high has collapsed: its features no longer tell cubes apart.
- linear probe: scikit-learn logistic regression on standardised features, cross-validated with
  folds grouped by case (no subject has cubes in both the training and the test part of a
  fold); AUC for two classes, accuracy otherwise; mean and std over the folds.

The labelled task is described exactly like a fine-tuning task (config.task, config.data): its
training and validation cases are read (the test cases stay unseen); classify takes the
candidate cubes and their classes, segment labels a cube 1 when it holds any foreground voxel.
Writes <workdir>/<probe.report>.json (one row per checkpoint and level) and .png (both measures
over the pre-training steps, the random init marked at step 0).
"""
from __future__ import annotations

import json
import math
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from genesis_jax import errors
from genesis_jax.data import store
from genesis_jax.data import tasks as task_data
from genesis_jax.eval import visualize
from genesis_jax.experiments.report import COLOURS
from genesis_jax.models import heads
from genesis_jax.train import step as step_lib
from genesis_jax.weights import transfer

INIT = "init"  # The `step` of the random-init rows.


# ------------------------------------------------------------------------------ the measures
def effective_rank(features: np.ndarray) -> float:
  """Roy & Vetterli's effective rank of (N, C) features: exp(entropy of normalised singular
  values) of the column-centred matrix; 0.0 when every row is the same."""
  f = np.asarray(features, np.float64)
  s = np.linalg.svd(f - f.mean(axis=0), compute_uv=False)
  total = s.sum()
  if not total > 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def probe_folds(labels: np.ndarray, groups: np.ndarray, folds: int,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) index pairs of `folds` folds, stratified by label and grouped by case: each
  case's cubes fall in the test part of exactly one fold."""
  from sklearn.model_selection import StratifiedGroupKFold
  n_groups = len(np.unique(groups))
  if n_groups < folds:
    raise errors.DataError(
        f"the probe task has {n_groups} cases, fewer than config.probe.folds={folds}; lower "
        f"config.probe.folds or add cases (config.data.train_cases, val_cases).")
  splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
  return list(splitter.split(np.zeros(len(labels)), labels, groups))


def check_labels(labels: np.ndarray, what: str) -> None:
  """Raises DataError unless `labels` hold at least two classes and no unlabelled (< 0) entry."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise errors.DataError(f"{what}: no labelled cubes; the probe needs a labelled task "
                           f"(candidates with a class column, or segmentation masks).")
  if (labels < 0).any():
    raise errors.DataError(f"{what}: {int((labels < 0).sum())} of {len(labels)} cubes have no "
                           f"label; the probe needs the class of every candidate.")
  classes = np.unique(labels)
  if len(classes) < 2:
    raise errors.DataError(
        f"{what}: all {len(labels)} cubes have label {classes[0]}; the linear probe needs at "
        f"least two classes (classify: the candidates' class column; segment: lower "
        f"config.data.fg_fraction so that some cubes hold no foreground).")


def probe_score(features: np.ndarray, labels: np.ndarray,
                splits: list[tuple[np.ndarray, np.ndarray]], C: float) -> dict:
  """Logistic regression on standardised features, scored on each fold's held-out cases.

  Returns {"metric": "auc" | "accuracy", "mean", "std" (over folds, ddof 1), "folds"}; a fold
  whose test part holds one class only has no AUC and is left out ("skipped" counts them).
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  binary = len(np.unique(labels)) == 2
  scores, skipped = [], 0
  for train, test in splits:
    if (binary and len(np.unique(labels[test])) < 2) or len(np.unique(labels[train])) < 2:
      skipped += 1
      continue
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      clf.fit(features[train], labels[train])
    if binary:
      scores.append(roc_auc_score(labels[test], clf.decision_function(features[test])))
    else:
      scores.append(float(np.mean(clf.predict(features[test]) == labels[test])))
  if not scores:
    raise errors.DataError("no probe fold has both classes in its held-out cases; lower "
                           "config.probe.folds or add cases.")
  return {"metric": "auc" if binary else "accuracy", "mean": float(np.mean(scores)),
          "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
          "folds": [float(s) for s in scores], "skipped": skipped}


# ------------------------------------------------------------------------- the pre-training
def pretraining_config(pretrain_dir: pathlib.Path) -> dict:
  """The config.json of a pre-training workdir (its model and seed make the random init)."""
  if not pretrain_dir.is_dir():
    raise errors.MissingPathError(f"config.probe.pretrain_dir={str(pretrain_dir)!r} does not "
                                  f"exist; give the workdir of a pre-training run.")
  path = pretrain_dir / "config.json"
  if not path.is_file():
    raise errors.MissingPathError(f"{pretrain_dir} has no config.json: not a pre-training "
                                  f"workdir (config.probe.pretrain_dir).")
  return json.loads(path.read_text())


def saved_steps(pretrain_dir: pathlib.Path, sub: str) -> list[int]:
  """The complete checkpoint steps under <pretrain_dir>/checkpoints/<sub> (latest or best)."""
  folder = pretrain_dir / "checkpoints" / sub
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def checkpoints_to_probe(pretrain_dir: pathlib.Path, which: str) -> list[tuple[int, str]]:
  """(step, "latest" | "best") of the checkpoints `which` (all, best, latest) names, by step."""
  latest, best = saved_steps(pretrain_dir, "latest"), saved_steps(pretrain_dir, "best")
  if not latest and not best:
    raise errors.MissingPathError(f"{pretrain_dir}/checkpoints holds no complete checkpoint; "
                                 f"has the pre-training saved one yet (config.checkpoint_every)?")
  if which == "best" and best:
    return [(best[-1], "best")]
  if which in ("best", "latest"):  # No evaluation yet: the latest stands in for the best.
    return [(latest[-1], "latest")] if latest else [(best[-1], "best")]
  found = {s: "latest" for s in latest}
  found.update({s: "best" for s in best if s not in found})
  return sorted(found.items())


def load_checkpoint(pretrain_dir: pathlib.Path, step: int, sub: str) -> dict:
  """Variables {"params", "batch_stats"} of one checkpoint of the pre-training."""
  if sub == "best":  # The best manager keeps one checkpoint: the one `which="best"` restores.
    variables, _ = transfer.load_pretrained(str(pretrain_dir), which="best")
  else:
    variables, _ = transfer.load_pretrained(str(pretrain_dir), which="latest", step=step)
  return variables


def pretraining_init(pre: dict, channels: int) -> tuple[Any, dict]:
  """The restoration U-Net of a pre-training's config.json and the weights it started from
  (the same model, seed and cube shape as `train.pretrain.train`)."""
  model = heads.build_model(pre["model"], task="restore", n_class=channels)
  sample_shape = (*pre["data"]["crop"], channels)
  return model, step_lib.init_variables(model, sample_shape, int(pre["seed"]))


# ------------------------------------------------------------------------------ features
def labelled_cubes(config, workdir: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(cubes, labels, case ids) of the task's training and validation cases, at most
  config.probe.max_samples of them (a random subset, seeded by config.seed)."""
  data = task_data.load(config, workdir)
  x = np.concatenate([data[k][0] for k in ("train", "val")])
  y = np.concatenate([data[k][1] for k in ("train", "val")])
  groups = np.concatenate([data["case_ids"][k] for k in ("train", "val")])
  if config.task.kind == "segment":  # A cube's label: does it hold any foreground?
    y = (y.reshape(len(y), -1) > 0).any(axis=1).astype(np.int32)
  check_labels(y, f"the probe task ({config.task.kind}, {len(np.unique(groups))} train/val "
                  f"cases)")
  limit = int(config.probe.max_samples)
  if limit and len(x) > limit:
    keep = np.sort(np.random.default_rng(config.seed).choice(len(x), limit, replace=False))
    x, y, groups = x[keep], y[keep], groups[keep]
  return x, np.asarray(y, np.int64), groups


def pooled_encoder(model):
  """jitted (variables, cubes) -> [(N, C_level) pooled features of levels 0..depth]."""

  def pooled(variables, x):
    bottom, skips = model.apply(variables, x, False, method=lambda m, x, t: m.encoder(x, t))
    return [f.astype(jnp.float32).mean(axis=tuple(range(1, f.ndim - 1)))
            for f in (*skips, bottom)]

  return jax.jit(pooled)


def encoder_features(pooled, variables: dict, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """The pooled features of every encoder level for all cubes `x`, in batches."""
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  parts = [pooled(variables, jnp.asarray(x[i:i + batch_size]))
           for i in range(0, len(x), batch_size)]
  return [np.concatenate([np.asarray(p[level]) for p in parts]) for level in range(len(parts[0]))]


def check_input_channels(variables: dict, channels: int, pretrain_dir: pathlib.Path) -> None:
  """Raises ConfigError unless the network's first conv takes `channels` input channels."""
  kernel = variables["params"]["encoder"]["down_0"]["conv_0"]["conv"]["kernel"]
  if kernel.shape[-2] != channels:
    raise errors.ConfigError(f"the pre-training in {pretrain_dir} takes {kernel.shape[-2]} input "
                             f"channel(s), the probe task's cubes have {channels}.")


# ------------------------------------------------------------------------------------ the run
def run(config, workdir: str | pathlib.Path) -> dict:
  """Probes every checkpoint `config.probe.which` names and a random init; writes the report."""
  workdir = pathlib.Path(workdir)
  p = config.probe
  if not p.report or "/" in p.report:
    raise errors.ConfigError(f"config.probe.report={p.report!r} must be a file name, e.g. "
                             f"'probe'.")
  pretrain_dir = pathlib.Path(p.pretrain_dir or workdir).expanduser().absolute()
  pre = pretraining_config(pretrain_dir)
  kind = pre.get("model", {}).get("kind", "genesis")
  if kind != "genesis":
    raise errors.ConfigError(f"{pretrain_dir} pre-trained model.kind={kind!r}; mode=probe reads "
                             f"the encoder levels of the Models Genesis U-Net (model.kind="
                             f"'genesis') only.")
  steps = checkpoints_to_probe(pretrain_dir, p.which)
  lacking = [k for k in ("model", "data", "seed") if k not in pre]
  if lacking or "crop" not in pre["data"]:
    raise errors.DataError(f"{pretrain_dir}/config.json lacks {lacking or ['data.crop']}: not the "
                           f"config of a pre-training (config.probe.pretrain_dir).")
  model_cfg = pre["model"]
  depth = int(model_cfg.get("depth", 3))
  crop = tuple(config.data.crop)
  if len(crop) != int(model_cfg.get("spatial_dims", 3)) or any(s % 2 ** depth for s in crop):
    raise errors.ConfigError(
        f"config.data.crop={crop} does not fit the pre-trained network (spatial_dims "
        f"{model_cfg.get('spatial_dims', 3)}, depth {depth}: one size per axis, each divisible "
        f"by {2 ** depth}).")
  workdir.mkdir(parents=True, exist_ok=True)
  x, y, groups = labelled_cubes(config, workdir)
  splits = probe_folds(y, groups, int(p.folds), int(config.seed))
  classes = {int(k): int(v) for k, v in zip(*np.unique(y, return_counts=True))}
  print(f"probe: {len(x)} cubes of {len(np.unique(groups))} cases, classes {classes}; "
        f"{len(steps)} checkpoint(s) of {pretrain_dir} and a random init", flush=True)

  model, init = pretraining_init(pre, x.shape[-1])
  pooled = pooled_encoder(model)
  rows = []
  for step, sub in [(INIT, "")] + steps:
    variables = init if step == INIT else load_checkpoint(pretrain_dir, step, sub)
    check_input_channels(variables, x.shape[-1], pretrain_dir)
    for level, f in enumerate(encoder_features(pooled, variables, x, int(p.batch_size))):
      if not np.isfinite(f).all():
        raise errors.NonFiniteError(f"{pretrain_dir} step {step}: non-finite encoder features at "
                                    f"level {level}.")
      score = probe_score(f, y, splits, float(p.C))
      rows.append({"step": step, "checkpoint": sub or INIT, "level": level,
                   "channels": int(f.shape[1]), "effective_rank": effective_rank(f),
                   "probe_metric": score["metric"], "probe_mean": score["mean"],
                   "probe_std": score["std"], "probe_folds": score["folds"],
                   "folds_skipped": score["skipped"], "n": int(len(f))})
    print(f"  {'random init' if step == INIT else f'step {step}'}: " + " | ".join(
        f"L{r['level']} rank {r['effective_rank']:.1f} {r['probe_metric']} "
        f"{r['probe_mean']:.3f}" for r in rows if r["step"] == step), flush=True)

  result = {"pretrain_dir": str(pretrain_dir), "task": config.task.kind, "n": int(len(x)),
            "cases": int(len(np.unique(groups))), "folds": int(p.folds), "C": float(p.C),
            "classes": classes,
            "rows": rows, "config": json.loads(config.to_json_best_effort())}
  json_path, png_path = workdir / f"{p.report}.json", workdir / f"{p.report}.png"
  store.write_json(json_path, result)
  image = draw_probe_chart(rows, title=pretrain_dir.name)
  store.atomic_write(png_path, lambda f: image.save(f, format="PNG"))
  print(f"done: probe of {len(steps)} checkpoint(s) and a random init; outputs in {json_path} "
        f"and {png_path}", flush=True)
  return result


# ---------------------------------------------------------------------------------- the plot
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 420, 350, 64, 16, 44, 64


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / n))
  step *= min((m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n), default=10)
  return [float(t) for t in np.arange(math.ceil(lo / step) * step, hi + step / 2, step)
          if t <= hi]


def draw_probe_chart(rows: list[dict], title: str = "") -> Image.Image:
  """Two panels over pre-training steps, one line per encoder level: the effective rank of the
  pooled features and the probe score; the random init is a hollow marker at step 0."""
  levels = sorted({r["level"] for r in rows})
  steps = sorted({r["step"] for r in rows if r["step"] != INIT})
  metric = rows[0]["probe_metric"] if rows else "auc"
  img = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
  d = ImageDraw.Draw(img)
  font, small = visualize.font(14), visualize.font(11)
  x_hi = max(steps, default=1) or 1
  for panel, (key, name) in enumerate((("effective_rank", "effective rank (log scale)"),
                                       ("probe_mean", f"linear probe {metric} (grouped CV)"))):
    x0, x1 = panel * PANEL_W + MARGIN_L, (panel + 1) * PANEL_W - MARGIN_R
    y0, y1 = MARGIN_T, PANEL_H - MARGIN_B
    values = [r[key] for r in rows]
    if panel == 0:  # Ranks span 1 to C: a log axis (a rank below 1, i.e. 0, sits at 1).
      lo, hi = 0.0, math.log10(max(values + [2.0]) * 1.3)
      scale, ticks = lambda v: math.log10(max(v, 1.0)), [
          t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if math.log10(t) <= hi]
    else:
      lo, hi = min(values + [0.5]) - 0.02, max(values + [0.5]) + 0.02
      scale, ticks = lambda v: v, _ticks(lo, hi)
    to_x = lambda s: x0 + 12 + (0 if s == INIT else s / x_hi) * (x1 - x0 - 24)
    to_y = lambda v: y1 - (scale(v) - lo) / (hi - lo) * (y1 - y0)
    d.text(((x0 + x1) / 2, 8), f"{name}{' - ' + title if title else ''}", fill="black",
           font=font, anchor="mt")
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for t in ticks:
      d.line([(x0 - 4, to_y(t)), (x0, to_y(t))], fill="black")
      d.line([(x0 + 1, to_y(t)), (x1, to_y(t))], fill=(230, 230, 230))
      d.text((x0 - 6, to_y(t)), f"{t:.4g}", fill="black", font=small, anchor="rm")
    if panel == 1 and metric == "auc":  # Chance level.
      for xa in range(x0 + 1, x1, 8):
        d.line([(xa, to_y(0.5)), (min(xa + 4, x1), to_y(0.5))], fill=(120, 120, 120))
    for s in [INIT] + steps:
      d.line([(to_x(s), y1), (to_x(s), y1 + 4)], fill="black")
      d.text((to_x(s), y1 + 6), "init" if s == INIT else str(s), fill="black", font=small,
             anchor="mt")
    d.text(((x0 + x1) / 2, y1 + 22), "pre-training step", fill="black", font=small, anchor="mt")
    for i, level in enumerate(levels):
      c = COLOURS[i % len(COLOURS)]
      mine = {r["step"]: r for r in rows if r["level"] == level}
      pts = [(to_x(s), to_y(mine[s][key])) for s in steps if s in mine]
      if len(pts) > 1:
        d.line(pts, fill=c, width=2)
      for px, py in pts:
        d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
      if INIT in mine:
        px, py = to_x(INIT), to_y(mine[INIT][key])
        d.ellipse([px - 4, py - 4, px + 4, py + 4], outline=c, width=2)
      if panel == 0:
        channels = next(iter(mine.values()))["channels"]
        d.text((x0 + 8 + 90 * i, y1 + 40), f"level {level} ({channels} ch)", fill=c, font=small)
  return img
