"""mode=predict: a fine-tuned run's model on new scans, checked against the run's own test pass."""
from __future__ import annotations

import csv
import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from genesis_jax import predict, run as experiment
from genesis_jax.config import schema as defaults
from conftest import predict_config, tiny_task_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
  from genesis_jax.data import phantoms as phantoms_lib
  root = tmp_path_factory.mktemp("predict_phantoms") / "p"
  return phantoms_lib.write_phantom_dataset(root, 7, seed=1, shape=(64, 64, 48))


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, phantoms):
  """A tiny segmentation run whose test pass wrote NIfTI predictions of cases 5 and 6."""
  from genesis_jax.train import finetune
  workdir = tmp_path_factory.mktemp("seg_run")
  config = tiny_task_config("segment", phantoms)
  config.eval.write_predictions = True
  finetune.train(config, workdir)
  return workdir


def _test_scans(phantoms, tmp_path):
  """Cases 5 and 6 (the run's test split) in a folder of their own."""
  folder = tmp_path / "new_scans"
  folder.mkdir()
  for i in (5, 6):
    src = phantoms / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"
    os.symlink(src, folder / src.name)
  return folder


def test_segment_matches_the_runs_own_test_predictions(tmp_path, seg_run, phantoms):
  scans = _test_scans(phantoms, tmp_path)
  out = tmp_path / "out"
  result = experiment.run(predict_config(scans, output=str(out)), seg_run)
  assert [os.path.basename(e["scan"]) for e in result["written"]] == [
      "phantom_005_0000.nii.gz", "phantom_006_0000.nii.gz"]
  for entry in result["written"]:
    name = os.path.basename(entry["scan"]).split("_0000")[0]
    assert entry["output"] == str(out / f"{name}_pred.nii.gz")
    mine = nib.load(entry["output"])
    theirs = nib.load(seg_run / "test_predictions" / f"{name}_pred.nii.gz")  # finetune's test pass
    src = nib.as_closest_canonical(nib.load(entry["scan"]))
    assert mine.shape == src.shape and mine.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mine.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    counts = np.bincount(np.asarray(mine.dataobj).reshape(-1), minlength=2)
    assert entry["foreground_ml"]["1"] == pytest.approx(
        counts[1] * np.prod(src.header.get_zooms()) / 1000)
  saved = json.loads((out / "predictions.json").read_text())
  assert saved["checkpoint"] == "best" and len(saved["written"]) == 2 and not saved["failed"]
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
  umask = os.umask(0)
  os.umask(umask)
  assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}

  # A rerun keeps what is there; overwrite replaces it; probabilities are float32 in [0, 1].
  before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
  again = experiment.run(predict_config(scans, output=str(out)), seg_run)
  assert not again["written"] and len(again["kept"]) == 2
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before
  probs = experiment.run(predict_config(scans, output=str(out), overwrite=True,
                                         probabilities=True), seg_run)
  assert len(probs["written"]) == 2
  p = np.asarray(nib.load(probs["written"][0]["output"]).dataobj)
  assert p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0


def test_two_inputs_with_one_case_id_are_an_error(tmp_path, seg_run, phantoms):
  # Two files (links to one file are one scan: find_scans lists each real file once).
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "phantom_005_0000.nii.gz").write_bytes(
        (phantoms / "imagesTr" / "phantom_005_0000.nii.gz").read_bytes())
  with pytest.raises(predict.PredictError, match="two inputs have the scan id 'phantom_005'"):
    experiment.run(predict_config(tmp_path, output=str(tmp_path / "out")), seg_run)
  assert not (tmp_path / "out").exists()


def test_bad_scan_raises_or_is_skipped(tmp_path, seg_run, phantoms):
  scans = _test_scans(phantoms, tmp_path)
  good = (phantoms / "imagesTr" / "phantom_005_0000.nii.gz").read_bytes()
  (scans / "broken.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="broken.nii.gz"):
    experiment.run(predict_config(scans, output=str(out)), seg_run)
  assert not (out / "broken_pred.nii.gz").exists()
  result = experiment.run(predict_config(scans, output=str(out), on_error="skip"), seg_run)
  assert [os.path.basename(f["scan"]) for f in result["failed"]] == ["broken.nii.gz"]
  assert len(result["written"]) + len(result["kept"]) == 2


def test_a_nan_scan_names_on_error_skip_and_predictions_json_lists_what_was_written(
    tmp_path, seg_run, phantoms):
  scans = _test_scans(phantoms, tmp_path)
  img = nib.load(scans / "phantom_005_0000.nii.gz")
  data = img.get_fdata(dtype=np.float32)
  data[0, 0, :3] = np.nan
  nib.save(nib.Nifti1Image(data, img.affine), str(scans / "zz_nan.nii.gz"))  # sorted last
  out = tmp_path / "out"
  with pytest.raises(ValueError) as e:
    experiment.run(predict_config(scans, output=str(out)), seg_run)
  msg = str(e.value)
  assert "zz_nan.nii.gz: 3 of" in msg and "NaN or Inf" in msg
  assert "config.predict.on_error='skip'" in msg and "\n" not in msg
  saved = json.loads((out / "predictions.json").read_text())  # the two outputs written first
  assert [os.path.basename(w["output"]) for w in saved["written"]] == [
      "phantom_005_pred.nii.gz", "phantom_006_pred.nii.gz"]
  assert "zz_nan.nii.gz" in saved["stopped"]
  result = experiment.run(predict_config(scans, output=str(out), on_error="skip"), seg_run)
  assert [os.path.basename(f["scan"]) for f in result["failed"]] == ["zz_nan.nii.gz"]
  assert len(result["kept"]) == 2 and "stopped" not in result


def test_out_of_device_memory_stops_with_the_setting_to_lower(tmp_path, seg_run, phantoms,
                                                              monkeypatch):
  from genesis_jax.eval import inference

  def oom(*a, **k):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
  monkeypatch.setattr(inference, "segment_volume", oom)
  out = tmp_path / "out"
  # Not a bad scan: even with on_error=skip it stops, instead of skipping every scan.
  with pytest.raises(predict.PredictError,
                     match=r"ran out of device memory .*config.predict.batch_size \(now 4 "):
    experiment.run(predict_config(_test_scans(phantoms, tmp_path), output=str(out),
                                   on_error="skip", batch_size=4), seg_run)
  assert not list(out.glob("*_pred.nii.gz"))


def test_classify_probabilities_match_the_runs_test_auc(tmp_path, phantoms):
  from genesis_jax.train import finetune
  run = tmp_path / "cls_run"
  finetune.train(tiny_task_config("classify", phantoms), run)
  test_auc = json.loads((run / "eval.json").read_text())["auc"]
  rows = list(csv.reader((phantoms / "candidates.csv").read_text().splitlines()))
  test_rows = [r for r in rows[1:] if r[0] in ("phantom_005", "phantom_006")]
  cands = tmp_path / "cands.csv"
  cands.write_text("\n".join(",".join(r) for r in [rows[0], *test_rows]) + "\n")
  out = tmp_path / "out"
  result = experiment.run(predict_config(phantoms / "imagesTr", output=str(out),
                                          candidates=str(cands)), run)
  assert result["n"] == len(test_rows) and result["auc"] == pytest.approx(test_auc, abs=1e-6)
  written = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
  assert [r["seriesuid"] for r in written] == [r[0] for r in test_rows]
  assert all(0.0 <= float(r["probability"]) <= 1.0 for r in written)
  assert float(written[0]["coordX"]) == pytest.approx(float(test_rows[0][1]), abs=1e-3)
  # New candidates come without a class column; the existing CSV is not replaced silently.
  (tmp_path / "new.csv").write_text("seriesuid,coordX,coordY,coordZ\n" + "\n".join(
      ",".join(r[:4]) for r in test_rows[:3]) + "\n")
  with pytest.raises(predict.PredictError, match="overwrite"):
    experiment.run(predict_config(phantoms / "imagesTr", output=str(out),
                                   candidates=str(tmp_path / "new.csv")), run)
  result = experiment.run(predict_config(phantoms / "imagesTr", output=str(out), overwrite=True,
                                          candidates=str(tmp_path / "new.csv")), run)
  assert result["n"] == 3 and "auc" not in result
  written = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
  assert [r["class"] for r in written] == ["", "", ""]


def test_predict_errors_name_the_problem(tmp_path, phantoms):
  with pytest.raises(ValueError, match="config.predict.input"):
    experiment.run(predict_config(""), tmp_path)
  with pytest.raises(ValueError, match="no config.json"):
    experiment.run(predict_config(phantoms), tmp_path)
  (tmp_path / "config.json").write_text(defaults.pretrain_config().to_json())
  with pytest.raises(ValueError, match="'pretrain' run"):
    experiment.run(predict_config(phantoms), tmp_path)
  with pytest.raises(ValueError, match="config.predict.which='bset'"):
    experiment.run(predict_config(phantoms, which="bset"), tmp_path)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    predict.find_inputs(str(tmp_path / "nowhere" / "*.nii.gz"))


def test_2d_segmentation_runs_its_test_pass_and_predicts_slice_by_slice(tmp_path, phantoms):
  # A 2D model segments a volume one axial slice at a time, in fine-tuning's test pass and here.
  from genesis_jax.train import finetune
  run = tmp_path / "seg2d"
  config = tiny_task_config("segment", phantoms)
  config.model.spatial_dims = 2
  config.model.depth = 1  # Slice by slice is the point here, not the depth (less to compile).
  config.data.crop = (32, 32)
  config.num_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
  config.eval.write_predictions = True
  finetune.train(config, run)
  assert len(json.loads((run / "eval.json").read_text())["iou"]) == 2
  scans = _test_scans(phantoms, tmp_path)
  result = experiment.run(predict_config(scans, batch_size=16), run)
  for entry in result["written"]:
    name = os.path.basename(entry["scan"]).split("_0000")[0]
    np.testing.assert_array_equal(
        np.asarray(nib.load(entry["output"]).dataobj),
        np.asarray(nib.load(run / "test_predictions" / f"{name}_pred.nii.gz").dataobj))


def test_cli_predict_uses_the_runs_model_not_the_given_config(tmp_path, seg_run, phantoms):
  # configs/finetune_ncs.py describes a width-8 model; the run is width 4: predict must take the
  # run's own config.json, so this works and gives the in-process result.
  from conftest import run_cli
  scans = _test_scans(phantoms, tmp_path)
  args = ["--config", "configs/finetune_ncs.py", "--workdir", str(seg_run),
          "--config.mode=predict", f"--config.predict.input={scans}",
          f"--config.predict.output={tmp_path / 'cli'}"]
  run_cli(args)
  for name in ("phantom_005", "phantom_006"):
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "cli" / f"{name}_pred.nii.gz").dataobj),
        np.asarray(nib.load(seg_run / "test_predictions" / f"{name}_pred.nii.gz").dataobj))
  bad = run_cli(args[:4] + ["--config.mode=predict", "--config.predict.input=/no/such/scans"],
                check=False)
  assert bad.returncode != 0 and "/no/such/scans" in bad.stderr
  assert "Traceback" not in bad.stderr
