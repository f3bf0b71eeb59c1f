"""mode=probe on a tiny pre-training: rows for a random init and each checkpoint, finite values,
the plot, folds grouped by subject, the new config keys, and clear errors for unusable input."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, shared_once, tiny_task_config, tiny_pretrain_config
from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config.validate import validate
from genesis_jax.experiments import probe
from genesis_jax.train import step as step_lib



def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory, tiny_dataset):
  """A width-4 pre-training of 4 steps on 16x16x8 cubes: checkpoints at steps 2 and 4, and in
  started.npz the variables its run initialised. Made once per session (across workers)."""
  from genesis_jax.train import pretrain

  def make(workdir):
    c = tiny_pretrain_config(tiny_dataset, 4)
    c.log_every = 2
    started = []  # The initial weights the pre-training used.
    with pytest.MonkeyPatch.context() as mp:
      real = step_lib.init_variables
      mp.setattr(step_lib, "init_variables", lambda *a: started.append(real(*a)) or started[-1])
      pretrain.train(c, workdir)
    (only,) = started
    np.savez(workdir / "started.npz", **_flat(only))
  return shared_once(tmp_path_factory, "probe_pretraining", make)


@pytest.fixture(scope="module")
def probe_phantoms(tmp_path_factory):
  from genesis_jax.data import phantoms
  root = tmp_path_factory.mktemp("probe_phantoms") / "p"
  return phantoms.write_phantom_dataset(root, 7, seed=1, shape=(64, 64, 48))


def probe_config(kind, phantoms_root, pretrain_dir, **probe_keys):
  c = tiny_task_config(kind, phantoms_root)
  c.mode = "probe"
  c.probe.pretrain_dir = str(pretrain_dir)
  c.probe.folds = 2
  for k, v in probe_keys.items():
    c.probe[k] = v
  return c


def test_probe_classify_rows_plot_and_dispatch(tmp_path, tiny_pretraining, probe_phantoms):
  from genesis_jax import run
  result = run.run(probe_config("classify", probe_phantoms, tiny_pretraining), tmp_path)
  written = json.loads((tmp_path / "probe.json").read_text())
  assert written["rows"] == json.loads(json.dumps(result["rows"]))
  rows = written["rows"]
  # A random init and both checkpoints, each with the 4 encoder levels of a depth-3 U-Net.
  assert [(r["step"], r["level"]) for r in rows] == [
      (s, lvl) for s in ("init", 2, 4) for lvl in range(4)]
  assert [r["channels"] for r in rows[:4]] == [8, 16, 32, 64]
  for r in rows:
    assert np.isfinite(r["effective_rank"]) and 1.0 <= r["effective_rank"] <= r["channels"]
    assert r["probe_metric"] == "auc" and 0.0 <= r["probe_mean"] <= 1.0
    assert np.isfinite(r["probe_std"]) and r["n"] == written["n"] > 0
  assert written["cases"] == 5 and len(written["classes"]) == 2  # 3 train + 2 val cases.
  with Image.open(tmp_path / "probe.png") as img:
    assert img.size[0] > img.size[1] > 100


def test_random_init_is_the_pretrainings_own(tiny_pretraining):
  with np.load(tiny_pretraining / "started.npz") as npz:
    started = dict(npz)
  pre = json.loads((tiny_pretraining / "config.json").read_text())
  _, init = probe.pretraining_init(pre, channels=1)
  assert _flat(init).keys() == started.keys()
  for k, v in started.items():
    np.testing.assert_array_equal(_flat(init)[k], v, err_msg=k)


def test_probe_segment_best_checkpoint(tmp_path, tiny_pretraining, probe_phantoms):
  config = probe_config("segment", probe_phantoms, tiny_pretraining, which="best",
                        report="seg")
  config.data.fg_fraction = 0.5  # Some cubes without foreground: two classes.
  result = probe.run(config, tmp_path)
  assert sorted({r["step"] for r in result["rows"]}, key=str) == [4, "init"]
  assert {r["checkpoint"] for r in result["rows"]} == {"init", "best"}
  assert (tmp_path / "seg.json").exists() and (tmp_path / "seg.png").exists()
  assert set(result["classes"]) == {0, 1}


def test_folds_are_grouped_by_subject():
  rng = np.random.default_rng(0)
  groups = np.repeat([f"case_{i}" for i in range(9)], rng.integers(3, 12, size=9))
  labels = rng.integers(0, 2, size=len(groups))
  splits = probe.probe_folds(labels, groups, 3, seed=0)
  assert len(splits) == 3
  tested = np.concatenate([test for _, test in splits])
  assert sorted(tested) == list(range(len(groups)))  # Every cube held out exactly once.
  for train, test in splits:
    assert not set(groups[train]) & set(groups[test])  # No subject on both sides of a fold.
  owner = {}
  for f, (_, test) in enumerate(splits):
    for g in set(groups[test]):
      assert owner.setdefault(g, f) == f  # A subject's cubes lie in one fold only.
  with pytest.raises(errors.DataError, match="9 cases, fewer than config.probe.folds=10"):
    probe.probe_folds(labels, groups, 10, seed=0)


def test_effective_rank_and_probe_score_on_known_features():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((200, 8)))
  assert probe.effective_rank(q - q.mean(0)) == pytest.approx(8.0, rel=0.05)
  assert probe.effective_rank(np.outer(rng.standard_normal(50), np.ones(6))) == pytest.approx(1.0)
  assert probe.effective_rank(np.ones((10, 4))) == 0.0
  groups = np.repeat(np.arange(10), 20)
  labels = rng.integers(0, 2, size=200)
  features = np.c_[labels + 0.1 * rng.standard_normal(200), rng.standard_normal((200, 3))]
  score = probe.probe_score(features, labels, probe.probe_folds(labels, groups, 5, 0), C=1.0)
  assert score["metric"] == "auc" and score["mean"] > 0.95 and len(score["folds"]) == 5
  noise = probe.probe_score(rng.standard_normal((200, 4)), labels,
                            probe.probe_folds(labels, groups, 5, 0), C=1.0)
  assert abs(noise["mean"] - 0.5) < 0.2


def test_probe_config_keys():
  c = probe_config("classify", "/tmp", "/tmp")
  validate(c)
  assert schema.family_of("probe") == schema.FT
  for key, bad, message in (("folds", 1, "must be >= 2"), ("C", 0.0, "must be > 0"),
                            ("which", "first", "is not one of"),
                            ("max_samples", -1, "must be >= 0")):
    c = probe_config("classify", "/tmp", "/tmp", **{key: bad})
    with pytest.raises(errors.ConfigError, match=rf"config\.probe\.{key}=.*{message}"):
      validate(c)
  pre = schema.pretrain_config()
  pre.probe = {"folds": 3}
  with pytest.raises(errors.ConfigError, match="config.probe.folds is a fine-tuning key"):
    validate(pre)
  from genesis_jax.config import loading
  config = loading.load_config_file(str(REPO / "configs" / "probe_phantom.py"))
  assert config.mode == "probe" and config.task.kind == "classify"
  validate(config)


def test_clear_errors(tmp_path, tiny_pretraining, probe_phantoms):
  # Candidates without a class column: no labels to probe.
  csv = tmp_path / "unlabelled.csv"
  rows = (probe_phantoms / "candidates.csv").read_text().splitlines()
  csv.write_text("\n".join(",".join(r.split(",")[:4]) for r in rows) + "\n")
  c = probe_config("classify", probe_phantoms, tiny_pretraining)
  c.data.source, c.data.candidates = "folder", str(csv)
  with pytest.raises(errors.DataError, match="lacks a class/label column"):
    probe.run(c, tmp_path / "out")
  assert not (tmp_path / "out" / "probe.json").exists()
  with pytest.raises(errors.DataError, match="all 12 cubes have label 0; the linear probe needs"):
    probe.check_labels(np.zeros(12, int), "task")
  with pytest.raises(errors.DataError, match="3 of 4 cubes have no label"):
    probe.check_labels(np.array([-1, -1, -1, 1]), "task")
  # A workdir without checkpoints, and one that does not exist.
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((tiny_pretraining / "config.json").read_text())
  with pytest.raises(errors.MissingPathError, match="holds no complete checkpoint"):
    probe.run(probe_config("classify", probe_phantoms, empty), tmp_path / "out")
  with pytest.raises(errors.MissingPathError, match="does not exist"):
    probe.run(probe_config("classify", probe_phantoms, tmp_path / "nope"), tmp_path / "out")
  # An nnU-Net pre-training: another network, named.
  other = tmp_path / "nnunet"
  other.mkdir()
  saved = json.loads((tiny_pretraining / "config.json").read_text())
  saved["model"]["kind"] = "nnunet"
  (other / "config.json").write_text(json.dumps(saved))
  with pytest.raises(errors.ConfigError, match="model.kind='nnunet'; mode=probe reads"):
    probe.run(probe_config("classify", probe_phantoms, other), tmp_path / "out")
