"""`mode=predict`: apply a fine-tuned model from a workdir to new scans.

  python -m genesis_jax.main --config configs/finetune_ncs.py --workdir runs/ncs \
      --config.mode=predict --config.predict.input=/data/new_scans

The model, task and preprocessing come from the run itself (`<workdir>/config.json` and its
best, or latest, checkpoint), so they cannot drift from what was trained; the given config only
supplies `predict.*` and the sliding-window settings `eval.overlap` / `eval.tta_flip`.

Segmentation: every scan (a file, a folder searched recursively, or a glob) is preprocessed as in
training, segmented by sliding windows (slice by slice for a 2D model), mapped back onto the
scan's own voxel grid (undoing resampling and body crop) and written to
`<output>/<scan id>_pred.nii.gz` (the file name without suffix; nnU-Net's channel suffix _0000
dropped) with the scan's canonical (RAS+) affine: a uint8 mask
(probability >= `predict.threshold`), a label map (argmax, several classes), or the float32
probabilities (`predict.probabilities`). Classification: every candidate of `predict.candidates`
(LUNA16 columns; `class` optional) gets a probability in `<output>/predictions.csv`.
`<output>/predictions.json` lists what was written (and, for classification with labels, AUC),
also when a run stops part-way (the reason under `stopped`).
A run fine-tuned on 2D images (radiographs; data/tasks/images2d_tasks.py) predicts on image files
instead, mapped back onto each original image: see predict2d.py.
Files are written under a temporary name and renamed, so an output is complete or absent; outputs
already there are kept (a rerun continues) unless `predict.overwrite`.
"""
from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from genesis_jax import errors
from genesis_jax import predict2d
from genesis_jax.eval import inference
from genesis_jax.data import preprocess as preprocess_lib
from genesis_jax.data import readers
from genesis_jax.data import store
from genesis_jax.data.volume import Volume


class PredictError(errors.ConfigError):
  """Predict mode cannot run as configured; the message says what to change."""


def run(config, workdir: str | pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  p = config.predict
  if jax.process_count() > 1:
    raise PredictError("mode=predict runs in one process; start it without the multi-host "
                       "launcher.")
  if p.checkpoint:  # An nnU-Net checkpoint_final.pth with its plans, no run of ours.
    run_cfg, apply = nnunet_checkpoint_predictor(config)
  else:
    run_cfg = run_config(workdir)
  kind, n_class = str(run_cfg.task.kind), int(run_cfg.task.n_class)
  out_dir = pathlib.Path(p.output) if p.output else workdir / "predict"
  # Inputs are checked before loading or writing anything.
  image_run = not p.checkpoint and predict2d.is_image_run(run_cfg)
  if image_run:  # Fine-tuned on 2D images: outputs on each original image (predict2d).
    inputs = predict2d.by_stem(predict2d.find_images(str(p.input)))
  else:
    predict2d.check_not_images(str(p.input), run_cfg)
    inputs = by_scan_id(find_inputs(str(p.input)))
  if not p.checkpoint:
    apply = apply_fn(run_cfg, workdir, str(p.which))
  out_dir.mkdir(parents=True, exist_ok=True)
  result: dict[str, Any] = {"written": [], "kept": [], "failed": []}
  try:
    if image_run and kind == "segment":
      predict2d.segment_all(config, run_cfg, apply, inputs, out_dir, result)
    elif image_run:
      predict2d.classify_all(config, run_cfg, apply, inputs, workdir, out_dir, result)
    elif kind == "segment":
      _segment_all(config, run_cfg, apply, inputs, out_dir, result)
    else:
      result = _classify_all(config, run_cfg, apply, inputs, out_dir, n_class)
  except BaseException as e:
    if result["written"]:  # Stopped part-way: predictions.json lists what this run wrote.
      result.update(workdir=str(workdir), checkpoint=str(p.which), kind=kind,
                    stopped=f"{type(e).__name__}: {e}")
      store.write_bytes(out_dir / "predictions.json", json.dumps(result, indent=2).encode())
    raise
  result.update(workdir=str(workdir), checkpoint=str(p.checkpoint or p.which), kind=kind)
  store.write_bytes(out_dir / "predictions.json", json.dumps(result, indent=2).encode())
  print(f"predict: wrote {out_dir / 'predictions.json'}", flush=True)
  return result


def run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The fine-tuning run's own config (<workdir>/config.json)."""
  path = workdir / "config.json"
  if not path.is_file():
    raise PredictError(f"{workdir} holds no fine-tuning run (no config.json); --workdir must be "
                       f"the workdir of a finished `mode=finetune` run.")
  cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
  if cfg.get("mode") not in ("finetune", "evaluate") or "task" not in cfg:
    raise PredictError(f"{workdir} is a {cfg.get('mode')!r} run; predict needs a fine-tuned "
                       f"segmentation or classification model (a `mode=finetune` workdir).")
  return cfg


def apply_fn(run_cfg, workdir: pathlib.Path, which: str) -> Callable:
  """batch (B, *window, C) -> probabilities (B, *window, K) or (B, K), with the run's weights."""
  from genesis_jax.train import finetune
  from genesis_jax.weights import transfer
  n_class = int(run_cfg.task.n_class)
  model = finetune.build_task_model(run_cfg.model, str(run_cfg.task.kind), n_class,
                                    int(run_cfg.task.get("feature_level", -1)))
  variables, _ = transfer.load_pretrained(str(workdir), which=which)
  # The variables are an argument, not a closure constant, which jit would bake into the program.
  apply_jit = jax.jit(lambda v, x: finetune.probabilities(model.apply(v, x, train=False), n_class))
  return functools.partial(apply_jit, {"params": variables["params"],
                                       "batch_stats": variables.get("batch_stats", {})})


def nnunet_checkpoint_predictor(config) -> tuple[ml_collections.ConfigDict, Callable]:
  """(run config, apply) for `predict.checkpoint`, an nnU-Net checkpoint_final.pth of the network
  of `model.plans` [`model.configuration`]: task.n_class is the checkpoint's class count
  (softmax; the output is nnU-Net's label map), scans are resampled to the plans' spacing (set by
  resolve_nnunet) and windows are the plans' patch size. Intensities: nnU-Net's CTNormalization
  (clip to the plans' foreground 0.5 / 99.5 percentiles, subtract the mean, divide by the std),
  reproduced exactly as data.hu_window = those percentiles followed by the affine map from [0, 1]
  inside `apply`; other schemes are refused."""
  from genesis_jax.config import nnunet_plans
  from genesis_jax.train import finetune
  from genesis_jax.weights import transfer
  m = config.model
  plan = nnunet_plans.load_plans(m.plans, m.configuration)
  path = str(config.predict.checkpoint)
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"config.predict.checkpoint={path!r} does not exist; give "
                                  f"nnU-Net's fold_<k>/checkpoint_final.pth.")
  schemes = tuple(plan.normalization_schemes)
  if schemes != ("CTNormalization",) or plan.n_input_channels != 1:
    raise PredictError(f"{m.plans} [{m.configuration}]: input normalisation {list(schemes)}; "
                       f"predict with an nnU-Net checkpoint reproduces a single-channel "
                       f"CTNormalization only.")
  props = plan.plans.get("foreground_intensity_properties_per_channel", {}).get("0")
  if not props:
    raise PredictError(f"{m.plans}: no foreground_intensity_properties_per_channel['0'], which "
                       f"CTNormalization needs.")
  lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
  mean, std = float(props["mean"]), max(float(props["std"]), 1e-8)
  loaded, info = transfer.load_nnunet_checkpoint(path, plan)
  run_cfg = ml_collections.ConfigDict(config.to_dict())
  run_cfg.task.kind, run_cfg.task.n_class = "segment", int(info["classes"])
  run_cfg.data.modality, run_cfg.data.hu_window = "ct", (lo, hi)
  model = finetune.build_task_model(run_cfg.model, "segment", int(info["classes"]))
  n_class = int(info["classes"])
  scale, shift = (hi - lo) / std, (lo - mean) / std  # [0, 1] of the window -> nnU-Net's z.
  apply_jit = jax.jit(lambda v, x: finetune.probabilities(
      model.apply(v, x * scale + shift, train=False), n_class))
  print(f"predict: {path} ({n_class} classes) on {plan.network} of {m.plans} "
        f"[{m.configuration}]", flush=True)
  return run_cfg, functools.partial(apply_jit, {"params": loaded["params"]})


def find_inputs(spec: str) -> list[pathlib.Path]:
  """A scan file or DICOM folder, a folder of scans (recursive), or a glob of either."""
  if not spec:
    raise PredictError("config.predict.input is empty: give a scan, a folder of scans or a glob.")
  path = pathlib.Path(spec).expanduser()
  if path.is_dir() and not readers.is_dicom_dir(path):
    return readers.find_scans(path)
  if path.exists():
    return [path]
  matches = sorted(pathlib.Path(m) for m in glob.glob(os.path.expanduser(spec)))
  if not matches:
    raise errors.MissingPathError(f"config.predict.input={spec!r}: no such file, folder or glob "
                                  f"match; give a scan, a folder of scans or a glob.")
  return matches


def by_scan_id(inputs: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """scan id (file name without suffix, nnU-Net's _0000 channel suffix dropped) -> path.

  Two inputs with one id (the same name in two folders) would write one output: an error.
  """
  out: dict[str, pathlib.Path] = {}
  for path in inputs:
    sid = readers.case_id(path)
    if sid in out:
      raise PredictError(f"two inputs have the scan id {sid!r}: {out[sid]} and {path}; their "
                         f"outputs would collide. Predict them in separate runs (predict.output).")
    out[sid] = path
  return out


# ---------------------------------------------------------------------------------- segment
def _segment_all(config, run_cfg, apply, inputs: dict[str, pathlib.Path],
                 out_dir: pathlib.Path, result: dict) -> None:
  """Segments every input into out_dir, recording each output in `result` as it is written."""
  p = config.predict
  n_class = int(run_cfg.task.n_class)
  written, kept, failed = result["written"], result["kept"], result["failed"]
  for sid, path in inputs.items():
    out = out_dir / f"{sid}_pred.nii.gz"
    if out.exists() and not p.overwrite:
      kept.append(str(out))
      continue
    try:
      src = readers.load_volume(path)
      readers.check_volume(src)
      pre = preprocess_lib.preprocess(src, run_cfg.data)
    except ValueError as e:  # VolumeReadError and the other DataErrors
      predict2d.skip_or_raise(path, e, p, failed, "scans")
      continue
    try:
      probs = inference.segment_volume(
          apply, pre.data, tuple(int(c) for c in run_cfg.data.crop),
          overlap=float(config.eval.overlap), tta_flip=bool(config.eval.tta_flip),
          batch_size=int(p.batch_size))
    except Exception as e:  # noqa: BLE001 - only an out-of-memory error is rewrapped
      from genesis_jax.train.step import is_out_of_memory
      if not is_out_of_memory(e):
        raise
      raise PredictError(
          f"{path}: sliding-window inference ran out of device memory "
          f"({str(e).strip().splitlines()[0][:300]}); lower config.predict.batch_size (now "
          f"{p.batch_size} windows per call). Outputs written so far are complete.") from e
    result = inference.write_segmentation(out, probs, pre, src,
                                          threshold=None if p.probabilities else float(p.threshold))
    entry = {"scan": str(path), "output": str(out), "shape": list(result.shape)}
    if not p.probabilities:
      voxel_ml = float(np.prod(src.spacing)) / 1000.0
      counts = np.bincount(result.reshape(-1), minlength=max(2, n_class))
      entry["foreground_ml"] = {str(k): float(counts[k] * voxel_ml) for k in range(1, len(counts))}
    written.append(entry)
    print(f"predict: {path} -> {out}", flush=True)


# --------------------------------------------------------------------------------- classify
def _classify_all(config, run_cfg, apply, inputs: dict[str, pathlib.Path],
                  out_dir: pathlib.Path, n_class: int) -> dict:
  from genesis_jax.eval import metrics as metrics_lib
  from genesis_jax.data import tasks
  p = config.predict
  out = out_dir / "predictions.csv"
  if out.exists() and not p.overwrite:
    raise PredictError(f"{out} exists; set config.predict.overwrite=True to replace it, or "
                       f"choose another config.predict.output.")
  if not p.candidates:
    raise PredictError("classification needs config.predict.candidates: a CSV of seriesuid, "
                       "coordX, coordY, coordZ (LUNA16 columns, LPS mm; class optional).")
  candidates = tasks.read_candidates_csv(p.candidates, labels=False)
  missing = sorted({c.scan_id for c in candidates} - set(inputs))
  if missing:
    raise PredictError(f"{p.candidates}: {len(missing)} scan id(s) have no scan in "
                       f"{p.input}, e.g. {missing[:3]}.")
  # One scan at a time (a LUNA16-size candidate list does not fit in memory as cubes at once).
  by_scan: dict[str, list[int]] = {}
  for i, c in enumerate(candidates):
    by_scan.setdefault(c.scan_id, []).append(i)
  batch = int(p.batch_size)
  probs = np.zeros((len(candidates), n_class), np.float32)
  for sid, rows_of_scan in by_scan.items():
    x, _ = tasks.classification_cubes(tasks.LazyScans({sid: inputs[sid]}),
                                      [candidates[i] for i in rows_of_scan],
                                      run_cfg.data.crop, run_cfg.data)
    scan_probs = [np.asarray(apply(x[i:i + batch])) for i in range(0, len(x), batch)]
    probs[rows_of_scan] = np.concatenate(scan_probs).reshape(len(rows_of_scan), n_class)
  rows = io.StringIO()
  w = csv.writer(rows)
  names = ["probability"] if n_class == 1 else [f"p_{k}" for k in range(n_class)]
  w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class", *names])
  for c, pr in zip(candidates, probs.reshape(len(candidates), -1)):
    lps = (-c.world_xyz_mm[0], -c.world_xyz_mm[1], c.world_xyz_mm[2])
    w.writerow([c.scan_id, *(f"{v:.6g}" for v in lps), "" if c.label < 0 else c.label,
                *(f"{v:.6f}" for v in pr)])
  store.write_bytes(out, rows.getvalue().encode())
  print(f"predict: {len(candidates)} candidates -> {out}", flush=True)
  result: dict[str, Any] = {"written": [str(out)], "n": len(candidates)}
  labels = np.array([c.label for c in candidates])
  if n_class == 1 and (labels >= 0).all() and len(np.unique(labels)) == 2:
    result["auc"] = float(metrics_lib.auc(labels, probs.reshape(-1)))
  return result
