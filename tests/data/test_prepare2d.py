"""prepare2d: folders of 2D images -> a prepared dataset (manifest, shards, split, skip report),
kill safety and resume, incremental re-runs, and config.data.source='images2d'."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config import validate as validate_lib
from genesis_jax.data import images2d
from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import pipeline
from genesis_jax.data import prepare as prepare_lib
from genesis_jax.data import prepare2d
from genesis_jax.data import radiograph
from genesis_jax.data import store


def _config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({
      "crop": (16, 16), "image_size": (24, 24), "cubes_per_scan": 2, "val_fraction": 0.3,
      "image_fit": "letterbox", "image_upscale": False, "image_norm": "percentile",
      "image_percentiles": (0.5, 99.5), "on_error": "skip", "num_workers": 0})
  cfg.update(overrides)
  return cfg


def _write_images(root: pathlib.Path, n: int = 7) -> pathlib.Path:
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  for i in range(n):
    rows = rng.integers(0, 4096, size=(30 + i, 40), dtype=np.uint16)  # (y, x)
    Image.fromarray(rows).save(root / ("sub" if i % 3 == 0 else "") / f"cxr_{i:02d}.png")
  (root / "labelsTr").mkdir()
  Image.fromarray(np.ones((30, 40), np.uint8)).save(root / "labelsTr" / "cxr_00.png")
  Image.fromarray(np.ones((30, 40), np.uint8)).save(root / ".hidden.png")
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
  return _write_images(tmp_path_factory.mktemp("cxr"))


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def _prepare(cfg, src, out, **kw):
  return prepare2d.prepare_images(cfg, src, out, seed=0, progress=False,
                                  images_per_shard=kw.pop("images_per_shard", 2), **kw)


def test_prepare_writes_a_dataset_the_pipeline_reads(folder, tmp_path):
  out = _prepare(_config(), folder, tmp_path / "ds")
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["source"]["kind"] == "images2d" and manifest["source"]["images"] == 7
  assert manifest["crop"] == [16, 16] and manifest["axes"] == "N, x, y" and not manifest["skipped"]
  counts = manifest["counts"]
  assert counts["train"]["images"] + counts["val"]["images"] == 7 and counts["val"]["images"] >= 1
  assert counts["train"]["cubes"] == 2 * counts["train"]["images"]  # cubes_per_scan crops each.
  train = pipeline.CubeSource(out, "train")
  sample = train[0]
  assert len(train) == counts["train"]["cubes"] and sample.shape == (16, 16, 1)
  assert 0.0 <= sample.min() and sample.max() <= 1.0 and sample.std() > 0.05
  records = prepare2d.image_records(out)
  assert sorted(r["source"] for r in records) == sorted(
      p.relative_to(folder).as_posix() for p in folder.rglob("cxr_*.png")
      if "labelsTr" not in p.parts)  # Label maps and hidden files are not images.
  rec = next(r for r in records if r["source"] == "cxr_01.png")
  t = radiograph.FitTransform.from_dict(rec["transform"])
  assert rec["shape"] == [40, 31] and t.original_shape == (40, 31) and t.shape == (24, 24)


def test_whole_image_samples_equal_preprocess(folder, tmp_path):
  out = _prepare(_config(image_size=(), crop=(32, 32)), folder, tmp_path / "ds")
  records = prepare2d.image_records(out)
  rec = records[0]
  assert rec["count"] == 1
  shard = store.open_cubes(out / "shards" / f"{rec['shard']}.npy")
  expected, _ = radiograph.preprocess(images2d.read_image(folder / rec["source"]), (32, 32))
  np.testing.assert_array_equal(shard[rec["first"]], expected)


def test_bad_images_are_skipped_with_a_report_or_raise(folder, tmp_path):
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  for p in sorted(folder.glob("cxr_0[12].png")):
    (mixed / p.name).write_bytes(p.read_bytes())
  raw = (folder / "cxr_01.png").read_bytes()
  (mixed / "cut.png").write_bytes(raw[: len(raw) // 2])
  rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(mixed / "pal.png")
  out = _prepare(_config(), mixed, tmp_path / "ds")
  manifest = json.loads((out / "manifest.json").read_text())
  reasons = {pathlib.Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
  assert set(reasons) == {"cut.png", "pal.png"}
  assert "truncated" in reasons["cut.png"] and "colour palette" in reasons["pal.png"]
  assert manifest["counts"]["train"]["images"] + manifest["counts"]["val"]["images"] == 2
  # on_error='raise': the known-bad image stops the run, naming it and the way out.
  with pytest.raises(prepare2d.PrepareImagesError, match=r"(cut|pal)\.png.*on_error='skip'"):
    _prepare(_config(on_error="raise"), mixed, tmp_path / "ds")
  with pytest.raises(prepare2d.PrepareImagesError, match=r"(cut|pal)\.png.*on_error='skip'"):
    _prepare(_config(on_error="raise"), mixed, tmp_path / "fresh")
  assert not (tmp_path / "fresh" / "manifest.json").exists()


def test_crop_fit_skips_images_smaller_than_image_size(folder, tmp_path):
  out = _prepare(_config(image_size=(34, 34), image_fit="crop", val_fraction=0.0), folder,
                 tmp_path / "ds")
  skipped = json.loads((out / "manifest.json").read_text())["skipped"]
  # Images are 40 x (30 + i): those under 34 rows cannot cover 34 x 34 without upscaling.
  assert sorted(pathlib.Path(s["path"]).name for s in skipped) == [
      f"cxr_{i:02d}.png" for i in range(4)]
  assert all("smaller than" in s["reason"] for s in skipped)


def test_interrupted_prepare_resumes_to_identical_dataset(folder, tmp_path, monkeypatch):
  reference = _prepare(_config(), folder, tmp_path / "ref")
  calls, real_write = [], store.write_npy

  def crash_mid_write(path, array):
    calls.append(path)
    if len(calls) == 2:  # Half a shard reaches its temp file, then the run dies.
      store.atomic_write(path, lambda f: (f.write(b"\x93NUMPY half"), 1 / 0))
    real_write(path, array)
  monkeypatch.setattr(store, "write_npy", crash_mid_write)
  out = tmp_path / "ds"
  with pytest.raises(ZeroDivisionError):
    _prepare(_config(), folder, out)
  assert not (out / "manifest.json").exists() and len(list(out.rglob("*.npy"))) == 1
  with pytest.raises(manifest_lib.DatasetIncompleteError, match="incomplete"):
    pipeline.CubeSource(out, "train")
  monkeypatch.setattr(store, "write_npy", real_write)
  _prepare(_config(), folder, out)
  assert _tree(out) == _tree(reference)


def test_killed_subprocess_then_rerun_matches_uninterrupted(folder, tmp_path):
  """SIGKILL in the middle of a shard write: no cleanup runs, a temp file is left behind."""
  reference = _prepare(_config(), folder, tmp_path / "ref")
  out = tmp_path / "ds"
  script = textwrap.dedent(f"""
      import os, signal, ml_collections
      from genesis_jax.data import prepare2d, store
      calls = []
      def dying_write(path, array):
        calls.append(1)
        if len(calls) == 2:
          path.with_name("." + path.name + ".tmp-" + str(os.getpid())).write_bytes(b"partial")
          os.kill(os.getpid(), signal.SIGKILL)
        store.atomic_write(path, lambda f: __import__("numpy").save(f, array))
      store.write_npy = dying_write
      prepare2d.prepare_images(ml_collections.ConfigDict({_config().to_dict()!r}), {str(folder)!r},
                               {str(out)!r}, seed=0, progress=False, images_per_shard=2)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -9, proc.stderr
  assert not (out / "manifest.json").exists() and list(out.rglob(".*tmp*"))
  _prepare(_config(), folder, out)
  assert _tree(out) == _tree(reference)


def test_rerun_reuses_shards_and_a_changed_image_redoes_only_its_shard(tmp_path, monkeypatch):
  src = _write_images(tmp_path / "src")
  out = _prepare(_config(), src, tmp_path / "ds")
  stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
  done = []
  real = prepare2d.image_samples
  monkeypatch.setattr(prepare2d, "image_samples", lambda *a: done.append(a[1]) or real(*a))
  _prepare(_config(), src, out)
  assert not done and stamps == {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
  Image.fromarray(np.full((30, 40), 9, np.uint16) + np.eye(30, 40, dtype=np.uint16)).save(
      src / "cxr_01.png")
  _prepare(_config(), src, out)
  assert 1 <= len(done) <= 2 and "cxr_01.png" in done  # Its shard: itself and one neighbour.
  # Changed settings make every shard stale.
  done.clear()
  _prepare(_config(image_norm="minmax"), src, out)
  assert len(done) == 7


def test_io_error_skips_the_image_for_this_run_only(tmp_path, monkeypatch):
  src = _write_images(tmp_path / "src")
  real = images2d.read_image

  def flaky(path, **kw):
    if pathlib.Path(path).name == "cxr_02.png":
      raise PermissionError(13, "Permission denied", str(path))
    return real(path, **kw)
  monkeypatch.setattr(images2d, "read_image", flaky)
  out = _prepare(_config(), src, tmp_path / "ds")
  skipped = json.loads((out / "manifest.json").read_text())["skipped"]
  assert [pathlib.Path(s["path"]).name for s in skipped] == ["cxr_02.png"]
  assert "Permission denied" in skipped[0]["reason"]
  monkeypatch.setattr(images2d, "read_image", real)
  out = _prepare(_config(), src, tmp_path / "ds")  # Retried, not remembered as bad.
  assert not json.loads((out / "manifest.json").read_text())["skipped"]


def test_split_is_per_image_and_stable_when_images_are_added():
  rels = [f"img_{i:04d}.png" for i in range(200)]
  split = prepare2d.split_images(rels, 0.2, seed=3)
  assert 20 < sum(v == "val" for v in split.values()) < 60
  more = prepare2d.split_images(rels + [f"new_{i}.png" for i in range(50)], 0.2, seed=3)
  assert all(more[r] == split[r] for r in rels)
  assert set(prepare2d.split_images(["a.png", "b.png"], 0.1, seed=0).values()) == {"train", "val"}


def test_config_source_images2d(folder, tmp_path):
  c = schema.pretrain_config()
  c.model.spatial_dims = 2
  c.model.width = 4
  c.data.crop = (16, 16)
  c.data.image_size = (24, 24)
  c.data.source = "images2d"
  c.data.path = str(folder)
  validate_lib.validate(c)
  out = prepare_lib.ensure_dataset(c.data, tmp_path / "work")
  assert out == tmp_path / "work" / "data_images2d" and (out / "manifest.json").exists()
  c.data.image_size = (8, 8)
  with pytest.raises(errors.ConfigError, match=r"image_size=\(8, 8\).*>= config.data.crop"):
    validate_lib.validate(c)
  c.data.image_size = ()
  c.data.scales = (1.0, 2.0)
  with pytest.raises(errors.ConfigError, match="scales"):
    validate_lib.validate(c)
  c.data.scales = (1.0,)
  c.model.spatial_dims, c.data.crop = 3, (16, 16, 8)
  with pytest.raises(errors.ConfigError, match="images2d' reads 2D images"):
    validate_lib.validate(c)
