"""mode=predict on 2D images: outputs mapped back onto each original image (genesis_jax/predict2d).

Tiny runs (width 4, depth 1, crop 16 x 16, 2 steps) fine-tuned on generated PNG folders; the
inputs have different sizes and aspects, so the letterbox and its inverse are exercised.
"""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from genesis_jax import errors, predict, predict2d, run as experiment
from conftest import predict_config
from genesis_jax.config import schema as defaults
from genesis_jax.data.tasks import images2d_tasks
from genesis_jax.eval import inference

CROP = (16, 16)
# (x, y) = (columns, rows) of the input images: square, wide, tall, exactly the crop, odd.
SIZES = {"square": (32, 32), "wide": (64, 32), "tall": (20, 50), "exact": (16, 16),
         "odd": (37, 23)}


def _picture(size, seed):
  """An 8-bit (x, y) picture with a bright rectangle (so it is not constant)."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 60, size).astype(np.uint8)
  w, h = size
  a[w // 4:w // 2, h // 3:2 * h // 3] = 200
  return a


def _save_png(path, array_xy):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.ascontiguousarray(array_xy.T)).save(path)
  return path


def _config(kind, root, n_class):
  c = defaults.finetune_config()
  c.task.kind, c.task.n_class = kind, n_class
  c.model.spatial_dims, c.model.width, c.model.depth = 2, 4, 1
  c.data.source, c.data.path, c.data.crop = "folder", str(root), CROP
  c.data.train_cases, c.data.val_cases, c.data.test_cases = 2, 1, 1
  c.train.batch_size = 2
  c.num_steps = c.eval_every = c.checkpoint_every = c.log_every = 2
  if kind == "multilabel":
    c.train.monitor = "auc"
  return c


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  from genesis_jax.train import finetune
  root = tmp_path_factory.mktemp("seg2d_data")
  for i in range(4):
    img = _picture((24 + 8 * i, 24), i)
    _save_png(root / "imagesTr" / f"case{i}_0000.png", img)
    _save_png(root / "labelsTr" / f"case{i}.png", (img > 100).astype(np.uint8))
  workdir = tmp_path_factory.mktemp("seg2d_run")
  finetune.train(_config("segment", root, 1), workdir)
  return workdir


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  from genesis_jax.train import finetune
  root = tmp_path_factory.mktemp("cls2d_data")
  rows = ["Image Index,Finding Labels,Patient ID"]
  for p in range(4):  # Two images per patient, one per finding: every split has both values.
    for j, finding in enumerate(("Nodule", "Mass")):
      _save_png(root / "images" / f"p{p}_{j}.png", _picture((20 + 4 * p, 24), 10 * p + j))
      rows.append(f"p{p}_{j}.png,{finding},p{p}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  workdir = tmp_path_factory.mktemp("cls2d_run")
  finetune.train(_config("multilabel", root, 2), workdir)
  return workdir


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("new_images")
  for k, (name, size) in enumerate(SIZES.items()):
    _save_png(folder / f"{name}.png", _picture(size, 100 + k))
  return folder


# ------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("shape", [(32, 32), (64, 32), (20, 50), (16, 16), (37, 23), (101, 17)])
def test_letterbox_box_is_where_the_training_letterbox_puts_the_image(shape):
  out, _ = images2d_tasks.letterbox(np.ones(shape, np.float32), CROP, order=0)
  (nw, nh), (ox, oy) = predict2d.letterbox_box(shape, CROP)
  xs, ys = np.nonzero(out)
  assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (ox, ox + nw, oy, oy + nh)


def test_a_rectangle_drawn_on_the_letterbox_maps_back_onto_the_original_pixels():
  # (64, 32) -> 16 x 8 at offset (0, 4): one letterbox pixel is 4 x 4 original pixels.
  pred = np.zeros(CROP, np.uint8)
  pred[4:8, 6:10] = 1  # Letterbox y 6..10 is the scaled image's y 2..6.
  expected = np.zeros((64, 32), np.uint8)
  expected[16:32, 8:24] = 1
  np.testing.assert_array_equal(predict2d.unletterbox(pred, (64, 32), order=0), expected)
  # Any aspect: the inverse has the original's shape, and letterbox(unletterbox(p)) = p inside
  # the image's box (nearest neighbour both ways).
  for shape in [(37, 23), (20, 50), (101, 17)]:
    (nw, nh), (ox, oy) = predict2d.letterbox_box(shape, CROP)
    pred = np.zeros(CROP, np.uint8)
    pred[ox + nw // 4:ox + 3 * nw // 4, oy + nh // 4:oy + 3 * nh // 4] = 1
    back = predict2d.unletterbox(pred, shape, order=0)
    assert back.shape == shape and back.dtype == np.uint8
    again, _ = images2d_tasks.letterbox(back, CROP, order=0)
    inside = (slice(ox, ox + nw), slice(oy, oy + nh))
    np.testing.assert_array_equal(again[inside], pred[inside])
  probs = np.full(CROP + (2,), 0.25, np.float32)
  assert predict2d.unletterbox(probs, (37, 23), order=1).shape == (37, 23, 2)


def test_preprocessing_is_the_training_runs(new_images):
  for name in SIZES:
    x, shape = predict2d.load_for_model(new_images / f"{name}.png", CROP)
    expected, _ = images2d_tasks.load_image(new_images / f"{name}.png", CROP)
    np.testing.assert_array_equal(x, expected)
    assert shape == SIZES[name]


# ---------------------------------------------------------------------------- end to end
def test_segment_writes_a_mask_per_image_at_its_original_size(tmp_path, seg_run, new_images):
  out = tmp_path / "out"
  result = experiment.run(predict_config(new_images, output=str(out), probabilities=True),
                          seg_run)
  assert sorted((e["scan"].rsplit("/", 1)[1], tuple(e["shape"])) for e in result["written"]) == (
      sorted((f"{n}.png", size) for n, size in SIZES.items()))
  run_cfg = predict.run_config(seg_run)
  apply = predict.apply_fn(run_cfg, seg_run, "best")
  for name, (w, h) in SIZES.items():
    mask = np.asarray(Image.open(out / f"{name}_pred.png"))
    prob = np.asarray(Image.open(out / f"{name}_prob.tif"))
    assert mask.shape == prob.shape == (h, w) and mask.dtype == np.uint8  # Rows are y.
    assert set(np.unique(mask)) <= {0, 1} and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    # The model's own output on the training preprocessing, thresholded and mapped back.
    x, _ = images2d_tasks.load_image(new_images / f"{name}.png", CROP)
    probs = inference.segment_volume(apply, x[..., None], CROP)[:, :, 0]
    on_crop = (probs[..., 0] >= 0.5).astype(np.uint8)
    np.testing.assert_array_equal(mask.T, predict2d.unletterbox(on_crop, (w, h), order=0))
    if (w, h) == CROP:  # No letterbox at all: the mask is the model's mask.
      np.testing.assert_array_equal(mask.T, on_crop)
  manifest = json.loads((out / "predictions.json").read_text())
  assert manifest["kind"] == "segment" and len(manifest["written"]) == len(SIZES)
  # A rerun keeps what is there.
  again = experiment.run(predict_config(new_images, output=str(out), probabilities=True), seg_run)
  assert len(again["kept"]) == len(SIZES) and not again["written"]


def test_a_dicom_radiograph_and_a_bad_image(tmp_path, seg_run):
  pydicom = pytest.importorskip("pydicom")
  from pydicom import uid
  folder = tmp_path / "in"
  folder.mkdir()
  rows = (_picture((30, 20), 7).T.astype(np.uint16) * 16)  # File order: (rows, columns).
  ds = pydicom.Dataset()
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
  ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
  ds.Rows, ds.Columns = rows.shape
  ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
  ds.PixelRepresentation = 0
  ds.PixelData = rows.astype("<u2").tobytes()
  ds.save_as(folder / "cxr.dcm", enforce_file_format=True)
  (folder / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(errors.DataError, match=r"broken\.png.*on_error='skip'"):
    experiment.run(predict_config(folder, output=str(tmp_path / "a")), seg_run)
  result = experiment.run(predict_config(folder, output=str(tmp_path / "b"), on_error="skip"),
                          seg_run)
  assert [f["scan"] for f in result["failed"]] == [str(folder / "broken.png")]
  assert np.asarray(Image.open(tmp_path / "b" / "cxr_pred.png")).shape == (20, 30)


def test_multilabel_writes_one_csv_row_per_image_with_the_runs_findings(tmp_path, cls_run,
                                                                         new_images):
  out = tmp_path / "out"
  result = experiment.run(predict_config(new_images, output=str(out)), cls_run)
  with open(out / "predictions.csv", newline="") as f:
    table = list(csv.reader(f))
  assert table[0] == ["image", "Mass", "Nodule"]  # The CSV's findings, sorted, as in training.
  assert sorted(r[0] for r in table[1:]) == sorted(f"{n}.png" for n in SIZES)
  assert result["n"] == len(SIZES)
  apply = predict.apply_fn(predict.run_config(cls_run), cls_run, "best")
  for r in table[1:]:
    x, _ = images2d_tasks.load_image(new_images / r[0], CROP)
    expected = np.asarray(apply(x[None, ..., None]))[0]
    np.testing.assert_allclose([float(v) for v in r[1:]], expected, atol=2e-6)
  with pytest.raises(errors.ConfigError, match="overwrite"):
    experiment.run(predict_config(new_images, output=str(out)), cls_run)


# --------------------------------------------------------------------------- mismatches
def test_a_2d_run_refuses_a_3d_volume_and_a_3d_run_refuses_images(tmp_path, seg_run, new_images):
  vol = tmp_path / "vols" / "scan.nii.gz"
  vol.parent.mkdir()
  nib.save(nib.Nifti1Image(np.zeros((20, 20, 6), np.float32), np.eye(4)), vol)
  with pytest.raises(predict2d.DimensionMismatchError, match=r"scan\.nii\.gz.*3D volume.*2D"):
    experiment.run(predict_config(vol.parent, output=str(tmp_path / "o")), seg_run)
  with pytest.raises(predict2d.DimensionMismatchError, match=r"scan\.nii\.gz"):
    experiment.run(predict_config(vol, output=str(tmp_path / "o")), seg_run)
  # A 3D run (its config.json is all predict reads before checking the inputs).
  run3d = tmp_path / "run3d"
  run3d.mkdir()
  c = defaults.finetune_config()
  c.task.kind = "segment"
  (run3d / "config.json").write_text(c.to_json())
  with pytest.raises(predict2d.DimensionMismatchError, match=r"\.png: a 2D image.*3D volumes"):
    experiment.run(predict_config(new_images, output=str(tmp_path / "o")), run3d)
  # A 2D run whose training folder is gone cannot be told from a slice-wise 2D run on CT: said so.
  moved = json.loads((seg_run / "config.json").read_text())
  moved["data"]["path"] = str(tmp_path / "moved_away")
  (run3d / "config.json").write_text(json.dumps(moved))
  with pytest.raises(predict2d.DimensionMismatchError, match=r"moved_away'? is gone"):
    experiment.run(predict_config(new_images, output=str(tmp_path / "o")), run3d)
  # A folder of scans may hold previews: the 3D path ignores them, so no error.
  (vol.parent / "preview.png").write_bytes((new_images / "square.png").read_bytes())
  predict2d.check_not_images(str(vol.parent))
  with pytest.raises(predict2d.DimensionMismatchError, match=r"preview\.png"):
    predict2d.check_not_images(str(vol.parent / "*.png"))
