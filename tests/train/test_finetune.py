"""Transfer into fine-tuning models, fine-tuning runs, and the experiment runner."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from genesis_jax.config import schema as defaults
from genesis_jax.models import heads
from conftest import tiny_task_config
from genesis_jax.weights import transfer


def _model_cfg(width=4):
  c = defaults.pretrain_config().model
  c.width = width
  return c


def _init(model, shape=(16, 16, 8, 1), seed=0):
  x = np.zeros((1, *shape), np.float32)
  return jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(seed)))


def _flat(tree):
  from flax import traverse_util
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_classifier_takes_encoder_and_keeps_fresh_head():
  pre = _init(heads.build_model(_model_cfg(), task="restore"), seed=1)
  cls_model = heads.build_model(_model_cfg(), task="classify", n_class=1)
  fresh = _init(cls_model, seed=2)
  merged, report = transfer.merge_params(fresh, pre, source="pre")
  m, p, f = _flat(merged), _flat(pre), _flat(fresh)
  enc = [k for k in m if k.startswith(("params/encoder/", "batch_stats/encoder/"))]
  assert enc and all(np.array_equal(m[k], p[k]) for k in enc)
  head = [k for k in m if k.startswith("params/classifier/")]
  assert head and all(np.array_equal(m[k], f[k]) for k in head)
  assert sorted(report.loaded) == sorted(enc)
  assert sorted(report.fresh) == sorted(head)
  assert all(k.startswith(("params/decoder", "params/out", "batch_stats/decoder"))
             for k in report.ignored) and report.ignored


def test_segmentation_head_reinitialised_by_pattern():
  pre = _init(heads.build_model(_model_cfg(), task="restore"), seed=1)
  seg = _init(heads.build_model(_model_cfg(), task="segment", n_class=3), seed=2)
  with pytest.raises(transfer.TransferError, match="params/out/kernel"):
    transfer.merge_params(seg, pre, source="pre")
  merged, report = transfer.merge_params(seg, pre, source="pre", dont_load=["*/out/*"])
  assert "params/out/kernel" in report.fresh
  assert any(k.startswith("params/decoder/") for k in report.loaded)


def test_width_mismatch_is_an_error_naming_paths():
  pre = _init(heads.build_model(_model_cfg(4), task="restore"))
  other = _init(heads.build_model(_model_cfg(8), task="classify", n_class=1))
  with pytest.raises(transfer.TransferError) as e:
    transfer.merge_params(other, pre, source="ckpt-w4")
  assert "ckpt-w4: the checkpoint is width 4 (config.model.width=8)" in str(e.value)


def test_input_channel_adaptation_is_opt_in():
  pre = _init(heads.build_model(_model_cfg(), task="restore"))
  two = _init(heads.build_model(_model_cfg(), task="restore"), shape=(16, 16, 8, 2))
  with pytest.raises(transfer.TransferError, match="adapt_input_channels"):
    transfer.merge_params(two, pre, source="pre")
  merged, report = transfer.merge_params(two, pre, source="pre", adapt_input_channels=True)
  assert len(report.adapted) == 1
  k = report.adapted[0]
  np.testing.assert_allclose(_flat(merged)[k].sum(-2), _flat(pre)[k].sum(-2), rtol=1e-6)


def test_not_a_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    transfer.load_pretrained(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(transfer.TransferError, match="neither a pre-training workdir"):
    transfer.load_pretrained(str(tmp_path / "empty"))
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(transfer.TransferError, match="not a known weights file"):
    transfer.load_pretrained(str(tmp_path / "w.txt"))


def test_evaluate_without_a_fine_tuning_checkpoint_is_refused_before_writing_anything(tmp_path):
  from genesis_jax import errors, run as run_lib
  config = defaults.finetune_config()
  config.mode = "evaluate"  # Phantom data by default: it would be generated into the workdir.
  with pytest.raises(errors.MissingPathError) as e:
    run_lib.run(config, tmp_path)
  msg = str(e.value)
  assert f"--workdir {tmp_path} holds no checkpoint of a fine-tuning run" in msg
  assert "config.mode=finetune" in msg and "\n" not in msg
  assert not list(tmp_path.iterdir())
  (tmp_path / "checkpoints" / "latest" / "5").mkdir(parents=True)
  (tmp_path / "config.json").write_text(defaults.pretrain_config().to_json())
  with pytest.raises(errors.ConfigError, match="is a 'pretrain' run; mode=evaluate needs"):
    run_lib.run(config, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json"]


# ---------------------------------------------------------------------- runs (slower)
@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory, tiny_dataset):
  from conftest import tiny_pretrain_config
  from genesis_jax.train import pretrain
  workdir = tmp_path_factory.mktemp("pre")
  pretrain.train(tiny_pretrain_config(tiny_dataset, 4), workdir)
  return workdir


@pytest.fixture(scope="module")
def task_phantoms(tmp_path_factory):
  from genesis_jax.data import phantoms
  root = tmp_path_factory.mktemp("task_phantoms") / "p"
  return phantoms.write_phantom_dataset(root, 7, seed=1, shape=(64, 64, 48))


def test_finetune_classify_from_pretraining(tmp_path, pretrained_workdir, task_phantoms, capsys):
  from genesis_jax.train import finetune
  config = tiny_task_config("classify", task_phantoms, pretrained_workdir)
  config.finetune.freeze_encoder = True
  summary = finetune.train(config, tmp_path)
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert 0.0 <= ev["auc"] <= 1.0 and ev["n"] > 0 and summary["test"]["auc"] == ev["auc"]
  # One summary.json, with the test results; one closing line on the console.
  assert json.loads((tmp_path / "summary.json").read_text())["test"]["auc"] == ev["auc"]
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith(f"done: step 6, best val_loss {summary['best_value']:.6g} @ step ")
  assert f"test auc {ev['auc']:.4g}" in last and last.endswith(f"outputs in {tmp_path}")
  report = json.loads((tmp_path / "transfer_report.json").read_text())
  assert report["loaded"] and all("encoder" in p for p in report["loaded"])
  # Frozen encoder: the best checkpoint's encoder equals the pre-trained one.
  pre, _ = transfer.load_pretrained(str(pretrained_workdir), which="best")
  best, _ = transfer.load_pretrained(str(tmp_path), which="best")
  for k, v in _flat(pre["params"]["encoder"]).items():
    np.testing.assert_array_equal(_flat(best["params"]["encoder"])[k], v, err_msg=k)
  # mode=evaluate on the finished run tests the same best checkpoint again.
  config.mode = "evaluate"
  assert finetune.evaluate(config, tmp_path)["auc"] == pytest.approx(ev["auc"], abs=1e-6)


def test_finetune_segment_writes_eval_and_predictions(tmp_path, pretrained_workdir, task_phantoms):
  import nibabel as nib
  from genesis_jax.train import finetune
  config = tiny_task_config("segment", task_phantoms, pretrained_workdir)
  config.eval.write_predictions = True
  finetune.train(config, tmp_path)
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert ev["n"] == 2 and len(ev["iou"]) == 2 and 0 <= ev["mean_iou"] <= 1
  preds = sorted((tmp_path / "test_predictions").glob("*.nii.gz"))
  assert len(preds) == 2
  img = nib.load(preds[0])
  src = nib.load(sorted((task_phantoms / "imagesTr").glob("*.nii.gz"))[5])
  np.testing.assert_allclose(img.affine, nib.as_closest_canonical(src).affine, atol=1e-4)


def test_experiment_runner_table(tmp_path, pretrained_workdir, task_phantoms, monkeypatch):
  from genesis_jax.experiments import trials
  from genesis_jax.train import finetune
  c = tiny_task_config("classify", task_phantoms)
  c.data.path = ""  # Built-in phantoms: written once into <workdir>/phantom_data, shared.
  monkeypatch.setattr(trials, "load_config_file", lambda path: _locked(c))
  exp = defaults.experiment_config()
  exp.experiment.tasks = {"tiny_ncc": defaults.task("tiny_ncc.py",
                                                   {"eval_every": 2, "checkpoint_every": 2})}
  # A per-arm override: a linear probe on random features, best checkpoint by validation AUC.
  exp.experiment.arms = {
      "scratch": defaults.arm(""), "genesis": defaults.arm(str(pretrained_workdir)),
      "probe": defaults.arm("", {"finetune.freeze_encoder": True, "train.monitor": "auc"})}
  exp.experiment.trials = 2
  exp.experiment.overrides = {"num_steps": 4}
  summary = trials.run(exp, tmp_path)
  task = summary["tasks"]["tiny_ncc"]
  assert set(task["arms"]) == {"scratch", "genesis", "probe"}
  assert all(a["n"] == 2 for a in task["arms"].values())
  for comp in task["comparisons"]:
    for key in ("welch_p", "mannwhitney_p"):
      assert comp[key] is None or 0.0 <= comp[key] <= 1.0
  assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
  assert (tmp_path / "tiny_ncc" / "genesis" / "trial_1" / "eval.json").exists()
  # One phantom data set for all 6 trials, the one the task config describes.
  shared = tmp_path / "phantom_data" / "seed1_7cases_64x64x48"
  assert [p.name for p in (tmp_path / "phantom_data").iterdir()] == [shared.name]
  assert (shared / "dataset.json").exists() and not list(tmp_path.glob("tiny_ncc/*/*/phantoms"))
  assert json.loads((tmp_path / "tiny_ncc/probe/trial_1/config.json").read_text())[
      "data"]["path"] == str(shared)
  # Overrides reached the trial configs: task (eval_every), arm (monitor, frozen encoder).
  probe = tmp_path / "tiny_ncc" / "probe" / "trial_0"
  cfg = json.loads((probe / "config.json").read_text())
  assert cfg["eval_every"] == 2 and cfg["train"]["monitor"] == "auc"
  assert json.loads((tmp_path / "tiny_ncc/scratch/trial_0/config.json").read_text())[
      "train"]["monitor"] == "val_loss"
  run = json.loads((probe / "summary.json").read_text())
  evals = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
  aucs = {e["step"]: e["auc"] for e in evals if "auc" in e}
  assert run["monitor"] == "auc" and sorted(aucs) == [2, 4]
  assert run["best_value"] == max(aucs.values()) and aucs[run["best_step"]] == run["best_value"]
  # Frozen random encoder: the best checkpoint's encoder equals its initialisation.
  model = heads.build_model(c.model, task="classify", n_class=1)
  best, _ = transfer.load_pretrained(str(probe), which="best")
  key = jax.random.split(jax.random.PRNGKey(0))[0]
  x = np.zeros((1, *c.data.crop, 1), np.float32)
  init = jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(key))
  for k, v in _flat(init["params"]["encoder"]).items():
    np.testing.assert_array_equal(_flat(best["params"]["encoder"])[k], v, err_msg=k)
  # Resuming a trial with another monitor is refused before anything is overwritten.
  import copy
  other = copy.deepcopy(c)
  other.num_steps, other.eval_every, other.checkpoint_every = 4, 2, 2
  other.finetune.freeze_encoder = True
  before = (probe / "config.json").read_text()
  with pytest.raises(ValueError, match="selected its best checkpoint by 'auc'"):
    finetune.train(other, probe)
  assert (probe / "config.json").read_text() == before
  # A rerun reuses finished trials (no training), also those that wrote their own phantoms
  # (data.path "", before the shared folder) ...
  old_style = tmp_path / "tiny_ncc/scratch/trial_0/config.json"
  saved = json.loads(old_style.read_text())
  saved["data"]["path"] = ""
  saved["eval_batches"] = 0  # A key older fine-tuning configs had: no longer one, ignored.
  old_style.write_text(json.dumps(saved))
  monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trial was rerun"))
  again = trials.run(exp, tmp_path)
  assert again["tasks"]["tiny_ncc"]["arms"]["probe"] == task["arms"]["probe"]
  # ... but not with a different config: the error names the trial and the key.
  exp.experiment.overrides = {"num_steps": 5}
  with pytest.raises(ValueError, match=r"scratch/trial_0 ran with a different config \(num_steps"):
    trials.run(exp, tmp_path)


def test_monitor_must_fit_the_task():
  from genesis_jax import run as experiment
  c = defaults.finetune_config()
  c.train.monitor = "dice"
  with pytest.raises(ValueError, match=r"config.train.monitor='dice' is not one of \('val_loss', 'auc'\)"):
    experiment.validate(c)
  c.task.kind = "segment"
  experiment.validate(c)
  p = defaults.pretrain_config()
  p.train.monitor = "auc"
  with pytest.raises(ValueError, match="monitor"):
    experiment.validate(p)


def _locked(c):
  import copy
  c2 = copy.deepcopy(c)
  c2.lock()
  return c2


def test_feature_level_is_checked_up_front():
  from genesis_jax import run as experiment
  c = defaults.finetune_config()
  c.task.feature_level = 1
  experiment.validate(c)  # classify, level 1 of depth 3
  c.task.feature_level = 5
  with pytest.raises(ValueError, match=r"feature_level=5 must be in \[-1, config.model.depth=3\]"):
    experiment.validate(c)
  c.task.kind, c.task.feature_level = "segment", 0
  with pytest.raises(ValueError, match="classification only"):
    experiment.validate(c)


def _old_host_val_loss(kind, loss_name, n_class, probs, labels):
  """The validation loss as fine-tuning computed it before evaluation moved on the device:
  probabilities to the host, clipped, BCE recomputed in float64 (classify) or the task loss
  re-run on log(p/(1-p)) logits (segment)."""
  import jax.numpy as jnp
  from genesis_jax.train import finetune
  p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
  if kind == "classify":
    y = labels.reshape(-1)
    if n_class == 1:
      s = p.reshape(-1)
      return float(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(int)])))
  logits = np.log(p / (1 - p)) if n_class == 1 else np.log(p)
  loss_fn = finetune.task_loss(kind, loss_name, n_class)
  return float(loss_fn(jnp.asarray(logits), jnp.asarray(labels)))


@pytest.mark.parametrize("kind,loss_name,n_class", [
    ("classify", "dice", 1), ("classify", "dice", 2), ("segment", "dice+ce", 1),
    ("segment", "dice", 3)])
def test_on_device_val_loss_matches_the_old_host_formula(kind, loss_name, n_class):
  from genesis_jax.eval import metrics as metrics_lib
  from genesis_jax.train import finetune, sharding
  from genesis_jax.train import step as step_lib
  c = defaults.finetune_config()
  c.task.kind, c.task.loss, c.task.n_class = kind, loss_name, n_class
  c.model.width = 4
  model = heads.build_model(c.model, task=kind, n_class=n_class)
  shape = (16, 16, 8, 1)
  variables = step_lib.init_variables(model, shape, seed=3)
  rng = np.random.default_rng(0)
  n = 11  # Not a multiple of the batch: the last batch is padded with weight-0 rows.
  images = rng.uniform(size=(n, *shape)).astype(np.float32)
  if kind == "classify":
    labels = (np.arange(n) % 2).astype(np.int32)
  else:
    labels = rng.integers(0, max(n_class, 2), size=(n, *shape[:-1], 1)).astype(np.uint8)
  mesh = sharding.make_mesh()
  eval_step = finetune.jit_eval_step(model.apply, c, mesh)
  new = finetune.evaluate_split(variables, eval_step, images, labels, c, mesh, per_process=4)
  probs = np.asarray(finetune.probabilities(model.apply(variables, images, train=False), n_class))
  old = _old_host_val_loss(kind, loss_name, n_class, probs, labels)
  # The new loss sums float32 terms on the device per batch (float64 across batches); the old
  # one clipped probabilities to [1e-7, 1 - 1e-7] and (segment) went back to logits through
  # log(p / (1 - p)). Away from saturated outputs they agree to float32 rounding: rtol 1e-5.
  np.testing.assert_allclose(new["val_loss"], old, rtol=1e-5)
  if kind == "classify":
    scores = probs.reshape(-1) if n_class == 1 else probs[:, 1]
    assert new["auc"] == metrics_lib.auc(labels, scores)
  else:
    pred, target = metrics_lib.foreground(probs), labels[..., 0] > 0
    assert new["dice"] == metrics_lib.dice(pred, target)
    assert new["iou"] == metrics_lib.iou(pred, target)
