"""2D target tasks on radiographs: multi-label classification and 2D segmentation of the built-in
DRRs end to end, the 2D image loader (letterbox, split by patient) and its bad inputs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config import validate
from genesis_jax.data.phantoms import drr, xray_dataset
from genesis_jax.data import tasks
from genesis_jax.data.tasks import images2d_tasks

SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def xrays(tmp_path_factory):
  root = tmp_path_factory.mktemp("xrays") / "xr"
  return xray_dataset.write_xray_dataset(root, 6, seed=1, shape=SHAPE)


def _config(kind, root):
  c = schema.finetune_config()
  c.task.kind = kind
  c.task.n_class = len(drr.FINDINGS) if kind == "multilabel" else 1
  c.model.spatial_dims = 2
  c.model.width = 4
  c.data.source = "phantom_xray"
  c.data.path = str(root)
  c.data.phantom_seed = 1
  c.data.phantom_shape = SHAPE
  c.data.crop = (32, 32)
  c.data.train_cases, c.data.val_cases, c.data.test_cases = 2, 2, 2
  c.train.batch_size = 4
  c.num_steps = 2
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 2
  return c


def test_multilabel_finetune_on_drrs_end_to_end(tmp_path, xrays):
  from genesis_jax.train import finetune
  config = _config("multilabel", xrays)
  config.train.monitor = "auc"
  validate.validate(config)
  summary = finetune.train(config, tmp_path)
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert ev["kind"] == "multilabel" and ev["n"] == 4  # 2 test subjects x 2 views.
  assert ev["classes"] == list(drr.FINDINGS) and len(ev["auc_per_class"]) == len(drr.FINDINGS)
  defined = [a for a in ev["auc_per_class"] if a is not None]
  assert defined and ev["auc"] == pytest.approx(np.mean(defined))
  assert summary["test"]["auc"] == ev["auc"] and summary["monitor"] == "auc"


def test_loader_labels_follow_the_csv_and_split_by_patient(xrays):
  config = _config("multilabel", xrays)
  data = images2d_tasks.load(config, xrays, tasks.split_ids)
  with open(xrays / "labels.csv", newline="") as f:
    rows = {r["Patient ID"] + r["View Position"]: r for r in csv.DictReader(f)}
  assert data["split"] == {"train": ["phantom_000", "phantom_001"],
                           "val": ["phantom_002", "phantom_003"],
                           "test": ["phantom_004", "phantom_005"]}
  for split in ("train", "val", "test"):
    x, y = data[split]
    assert x.shape == (len(y), 32, 32, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    for i, patient in enumerate(data["case_ids"][split]):
      view = ("PA", "LL")[i % 2]
      expected = drr.parse_finding_labels(rows[patient + view]["Finding Labels"])
      assert tuple(f for f, v in zip(drr.FINDINGS, y[i]) if v) == expected


def test_segment_finetune_on_projected_masks(tmp_path, xrays):
  from genesis_jax.train import finetune
  config = _config("segment", xrays)
  validate.validate(config)
  data = images2d_tasks.load(config, xrays, tasks.split_ids)
  x, y = data["train"]
  assert x.shape == y.shape == (4, 32, 32, 1) and set(np.unique(y)) <= {0, 1}
  # The letterboxed label is the DRR's projected mask shrunk to the crop (nearest neighbour);
  # samples come in sorted case order (phantom_000_lateral first).
  mask = np.asarray(Image.open(xrays / "labelsTr" / "phantom_000_lateral.png")).T
  expected, _ = images2d_tasks.letterbox(mask, (32, 32), order=0)
  np.testing.assert_array_equal(y[0, ..., 0], expected)
  finetune.train(config, tmp_path)
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert ev["n"] == 4 and len(ev["dice"]) == 4 and 0.0 <= ev["mean_dice"] <= 1.0


def test_letterbox_keeps_the_aspect_and_refuses_to_enlarge():
  image = np.ones((40, 80), np.float32)
  out, scale = images2d_tasks.letterbox(image, (32, 32), order=1)
  assert scale == pytest.approx(0.4) and out.shape == (32, 32)
  np.testing.assert_array_equal(out[8:24].min(), 1.0)
  assert out[:8].max() == 0.0 and out[24:].max() == 0.0
  with pytest.raises(images2d_tasks.ImageTooSmallError, match=r"tiny\.png: 16 x 20 pixels"):
    images2d_tasks.letterbox(np.ones((16, 20)), (32, 32), order=1, path="tiny.png")


def test_an_image_smaller_than_the_crop_is_a_named_error(tmp_path):
  root = tmp_path / "cxr"
  (root / "images").mkdir(parents=True)
  for i, size in enumerate([(64, 64), (64, 64), (64, 48), (16, 16)]):
    a = (np.arange(size[0] * size[1]).reshape(size) % 251).astype(np.uint8)
    Image.fromarray(a).save(root / "images" / f"img{i}.png")
  (root / "labels.csv").write_text("Image Index,Finding Labels,Patient ID\n"
                                   "img0.png,Nodule,p0\nimg1.png,No Finding,p1\n"
                                   "img2.png,Nodule|Mass,p2\nimg3.png,Mass,p3\n")
  c = _config("multilabel", root)
  c.data.source = "folder"
  c.task.n_class = 2  # Nodule, Mass: the CSV's findings, sorted.
  c.data.train_cases, c.data.val_cases, c.data.test_cases = 1, 2, 1
  validate.validate(c)
  assert images2d_tasks.is_image_task(c)
  with pytest.raises(images2d_tasks.ImageTooSmallError, match=r"img3\.png: 16 x 16 pixels"):
    images2d_tasks.load(c, tmp_path, tasks.split_ids)
  c.task.n_class = 3
  with pytest.raises(errors.ConfigError, match=r"n_class=3 but .* 2 findings \['Mass', 'Nodule'\]"):
    images2d_tasks.load(c, tmp_path, tasks.split_ids)


def test_config_errors_for_2d_tasks(tmp_path, xrays):
  c = _config("segment", xrays)
  c.eval.write_predictions = True
  with pytest.raises(errors.ConfigError, match="write_predictions"):
    images2d_tasks.load(c, xrays, tasks.split_ids)
  c = _config("multilabel", tmp_path)
  c.data.source = "phantom"
  with pytest.raises(errors.ConfigError, match="multilabel' reads 2D images"):
    validate.validate(c)
  c = _config("segment", tmp_path)
  c.model.spatial_dims = 3
  c.data.crop = (32, 32, 16)
  with pytest.raises(errors.ConfigError, match="phantom_xray' holds 2D radiographs"):
    validate.validate(c)
