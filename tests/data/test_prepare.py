"""prepare: cube extraction, manifest, split by scan, skip/raise on bad input, kill safety."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from genesis_jax.data import pipeline
from genesis_jax.data import manifest as manifest_lib
from genesis_jax.data import prepare as prepare_lib
from genesis_jax.data import sampling
from genesis_jax.data import store

CROP = (8, 8, 4)
SHAPE = (24, 20, 12)


def _config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({
      "crop": CROP, "cubes_per_scan": 3, "val_fraction": 0.34, "modality": "ct",
      "hu_window": (-1000.0, 1000.0), "mri_norm": "percentile", "mri_percentiles": (0.5, 99.5),
      "spacing": (), "body_crop": False, "lung_filter": False, "on_error": "skip",
  })
  cfg.update(overrides)
  return cfg


def _write_scan(path: pathlib.Path, seed: int, shape=SHAPE) -> None:
  """A chest-like CT in HU: the low-x half is lung/air (~ -900), the rest soft tissue (~ 40)."""
  rng = np.random.default_rng(seed)
  data = rng.normal(40.0, 20.0, shape)
  data[: shape[0] // 2] = rng.normal(-900.0, 30.0, (shape[0] // 2, *shape[1:]))
  nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), str(path))


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("scans")
  for i in range(6):
    _write_scan(root / f"case_{i:02d}.nii.gz", seed=i)
  return root


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_prepare_writes_shards_manifest_and_splits_by_scan(scans, tmp_path):
  out = prepare_lib.prepare(_config(), scans, tmp_path / "ds", seed=0, progress=False)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["counts"]["train"] == {"scans": 4, "cubes": 12}
  assert manifest["counts"]["val"] == {"scans": 2, "cubes": 6}
  assert manifest["crop"] == list(CROP) and manifest["skipped"] == []
  assert {"numpy", "grain", "nibabel", "python"} <= set(manifest["versions"])
  assert manifest["settings"]["hu_window"] == [-1000.0, 1000.0]
  for shard in manifest["shards"]:
    assert shard["spacing"] == pytest.approx([0.8, 0.8, 2.0]) and shard["shape"] == list(SHAPE)
    cubes = np.load(out / shard["file"], mmap_mode="r")
    assert cubes.shape == (3, *CROP) and cubes.dtype == np.float32
    assert 0.0 <= cubes.min() and cubes.max() <= 1.0
  # Split by scan: every cube of a scan sits in one split, and the sources are disjoint.
  by_split = {s: {x["source"] for x in manifest["shards"] if x["split"] == s} for s in ("train", "val")}
  assert not by_split["train"] & by_split["val"] and len(by_split["train"] | by_split["val"]) == 6
  assert len(pipeline.CubeSource(out, "train")) == 12 and len(pipeline.CubeSource(out, "val")) == 6


def test_prepare_is_deterministic_and_incremental(scans, tmp_path, monkeypatch):
  a = prepare_lib.prepare(_config(), scans, tmp_path / "a", seed=1, progress=False)
  b = prepare_lib.prepare(_config(), scans, tmp_path / "b", seed=1, progress=False)
  assert _tree(a) == _tree(b)
  c = prepare_lib.prepare(_config(), scans, tmp_path / "c", seed=2, progress=False)
  assert _tree(c)["manifest.json"] != _tree(a)["manifest.json"]

  def fail(*args, **kwargs):
    raise AssertionError("a complete dataset must not be recomputed")
  monkeypatch.setattr(prepare_lib, "process_scan", fail)
  before = _tree(a)
  prepare_lib.prepare(_config(), scans, a, seed=1, progress=False)
  assert _tree(a) == before


def test_worker_processes_give_the_same_dataset(scans, tmp_path):
  serial = prepare_lib.prepare(_config(), scans, tmp_path / "serial", seed=0, progress=False)
  parallel = prepare_lib.prepare(_config(num_workers=2), scans, tmp_path / "parallel", seed=0,
                                 progress=False)
  assert _tree(parallel) == _tree(serial)
  with pytest.raises(ValueError, match="broken.nii.gz"):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"junk")
    (bad / "case_00.nii.gz").write_bytes((scans / "case_00.nii.gz").read_bytes())
    prepare_lib.prepare(_config(num_workers=2, on_error="raise"), bad, tmp_path / "ds", seed=0,
                        progress=False)


def test_changed_settings_recompute_and_drop_the_old_manifest_first(scans, tmp_path, monkeypatch):
  out = prepare_lib.prepare(_config(), scans, tmp_path / "ds", seed=0, progress=False)
  calls = []
  real = prepare_lib.process_scan

  def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)
  monkeypatch.setattr(prepare_lib, "process_scan", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(_config(cubes_per_scan=2), scans, out, seed=0, progress=False)
  # One shard already changed: the old manifest (3 cubes per scan) must not load as complete.
  with pytest.raises(manifest_lib.DatasetIncompleteError):
    pipeline.CubeSource(out, "train")


def test_truncated_shard_is_detected(scans, tmp_path):
  out = prepare_lib.prepare(_config(), scans, tmp_path / "ds", seed=0, progress=False)
  shard = sorted((out / "shards").glob("*.npy"))[0]
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(manifest_lib.DatasetIncompleteError, match="file size"):
    pipeline.CubeSource(out, "val")


def test_interrupted_prepare_resumes_to_identical_dataset(scans, tmp_path, monkeypatch):
  reference = prepare_lib.prepare(_config(), scans, tmp_path / "ref", seed=0, progress=False)
  calls = []
  real_write = store.write_npy

  def crash_mid_write(path, array):
    calls.append(path)
    if len(calls) == 4:  # Half a shard reaches its temp file, then the run dies.
      store.atomic_write(path, lambda f: (f.write(b"\x93NUMPY half"), 1 / 0))
    real_write(path, array)
  monkeypatch.setattr(store, "write_npy", crash_mid_write)
  out = tmp_path / "ds"
  with pytest.raises(ZeroDivisionError):
    prepare_lib.prepare(_config(), scans, out, seed=0, progress=False)
  assert not (out / "manifest.json").exists() and len(list(out.rglob("*.npy"))) == 3
  assert not list(out.rglob(".*tmp*"))
  with pytest.raises(manifest_lib.DatasetIncompleteError, match="incomplete"):
    pipeline.CubeSource(out, "train")
  monkeypatch.setattr(store, "write_npy", real_write)
  prepare_lib.prepare(_config(), scans, out, seed=0, progress=False)
  assert _tree(out) == _tree(reference)


def test_killed_subprocess_then_rerun_matches_uninterrupted(scans, tmp_path):
  """SIGKILL in the middle of a shard write: no cleanup runs, a temp file is left behind."""
  reference = prepare_lib.prepare(_config(), scans, tmp_path / "ref", seed=0, progress=False)
  out = tmp_path / "ds"
  script = textwrap.dedent(f"""
      import os, signal, ml_collections
      from genesis_jax.data import prepare as p
      from genesis_jax.data import store
      calls = []
      def dying_write(path, array):
        calls.append(1)
        if len(calls) == 3:
          tmp = path.with_name("." + path.name + ".tmp-" + str(os.getpid()))
          tmp.write_bytes(b"partial")
          os.kill(os.getpid(), signal.SIGKILL)
        store.atomic_write(path, lambda f: __import__("numpy").save(f, array))
      store.write_npy = dying_write
      p.prepare(ml_collections.ConfigDict({_config().to_dict()!r}), {str(scans)!r}, {str(out)!r},
                seed=0, progress=False)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -9, proc.stderr
  assert not (out / "manifest.json").exists() and list(out.rglob(".*tmp*"))
  prepare_lib.prepare(_config(), scans, out, seed=0, progress=False)
  assert _tree(out) == _tree(reference)


def test_bad_scans_are_skipped_with_a_report_or_raise(scans, tmp_path, monkeypatch):
  folder = tmp_path / "mixed"
  folder.mkdir()
  for name in ("case_00.nii.gz", "case_01.nii.gz", "case_02.nii.gz"):
    (folder / name).write_bytes((scans / name).read_bytes())
  (folder / "broken.nii.gz").write_bytes(b"not a nifti file at all")
  _write_scan(folder / "tiny.nii.gz", seed=9, shape=(6, 20, 12))  # Smaller than the 8-voxel crop.
  out = prepare_lib.prepare(_config(), folder, tmp_path / "ds", seed=0, progress=False)
  manifest = json.loads((out / "manifest.json").read_text())
  skipped = {pathlib.Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
  assert set(skipped) == {"broken.nii.gz", "tiny.nii.gz"}
  assert "VolumeTooSmallError" in skipped["tiny.nii.gz"] and "smaller" in skipped["tiny.nii.gz"]
  assert len(manifest["shards"]) == 3
  with pytest.raises(ValueError, match="broken.nii.gz"):
    prepare_lib.prepare(_config(on_error="raise"), folder, tmp_path / "raise", seed=0, progress=False)
  # Known-bad files are remembered until they change: a re-run reads nothing and stays complete.
  before = _tree(out)
  monkeypatch.setattr(prepare_lib, "process_scan", lambda *a, **k: 1 / 0)
  prepare_lib.prepare(_config(), folder, out, seed=0, progress=False)
  assert _tree(out) == before
  with pytest.raises(ValueError, match="broken.nii.gz"):
    prepare_lib.prepare(_config(on_error="raise"), folder, out, seed=0, progress=False)
  monkeypatch.undo()
  only_bad = tmp_path / "bad"
  only_bad.mkdir()
  (only_bad / "broken.nii.gz").write_bytes(b"junk")
  with pytest.raises(prepare_lib.PrepareError, match="no scan yielded any cube"):
    prepare_lib.prepare(_config(), only_bad, tmp_path / "ds_bad", seed=0, progress=False)


def test_a_symlink_loop_gives_one_scan_and_a_dangling_link_is_skipped_and_reported(scans, tmp_path):
  loop = tmp_path / "d" / "loop"
  loop.mkdir(parents=True)
  (loop / "good.nii.gz").write_bytes((scans / "case_00.nii.gz").read_bytes())
  os.symlink(".", loop / "self")
  out = prepare_lib.prepare(_config(), loop, tmp_path / "ds", seed=0, progress=False)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["source"]["scans"] == 1 and len(manifest["shards"]) == 1
  assert manifest["counts"]["train"]["scans"] == 1 and manifest["counts"]["val"]["scans"] == 0

  os.symlink(tmp_path / "moved_away.nii.gz", loop / "gone.nii.gz")
  out = prepare_lib.prepare(_config(), loop, tmp_path / "ds2", seed=0, progress=False)
  manifest = json.loads((out / "manifest.json").read_text())
  assert len(manifest["shards"]) == 1
  (skipped,) = manifest["skipped"]
  assert skipped["path"] == str(loop / "gone.nii.gz")
  assert "broken symbolic link" in skipped["reason"]
  with pytest.raises(prepare_lib.PrepareError) as e:
    prepare_lib.prepare(_config(on_error="raise"), loop, tmp_path / "ds3", seed=0, progress=False)
  msg = str(e.value)
  assert "gone.nii.gz: broken symbolic link" in msg and "config.data.on_error='skip'" in msg
  assert not (tmp_path / "ds3" / "manifest.json").exists()


def test_lung_filter_keeps_mostly_air_crops_and_zero_cubes_is_an_error(scans, tmp_path):
  out = prepare_lib.prepare(_config(lung_filter=True), scans, tmp_path / "ds", seed=0,
                            progress=False)
  threshold = (-150.0 + 1000.0) / 2000.0
  for shard in json.loads((out / "manifest.json").read_text())["shards"]:
    cubes = np.load(out / shard["file"])
    assert len(cubes) == 3
    assert all(np.mean(c >= threshold) < 0.15 for c in cubes)
  tissue = tmp_path / "tissue"
  tissue.mkdir()
  rng = np.random.default_rng(0)
  nib.save(nib.Nifti1Image(rng.normal(40, 20, SHAPE).astype(np.int16), np.eye(4)),
           str(tissue / "abdomen.nii.gz"))
  with pytest.raises(prepare_lib.PrepareError, match="no cube passed the filters"):
    prepare_lib.prepare(_config(lung_filter=True), tissue, tmp_path / "ds2", seed=0, progress=False)
  with pytest.raises(ValueError, match="modality 'ct'"):
    sampling.CubeSettings.from_config(_config(lung_filter=True, modality="mri"))


def test_scales_and_2d_slices(scans, tmp_path):
  settings = sampling.CubeSettings.from_config(_config(scales=(1.0, 2.0), cubes_per_scan=4))
  data = np.random.default_rng(0).random((20, 20, 6), dtype=np.float32)
  cubes = sampling.extract_cubes(data, settings, sampling.scan_rng(0, "x"))
  assert cubes.shape == (4, *CROP) and 0.0 <= cubes.min() and cubes.max() <= 1.0
  np.testing.assert_array_equal(
      cubes, sampling.extract_cubes(data, settings, sampling.scan_rng(0, "x")))
  with pytest.raises(sampling.VolumeTooSmallError, match="crop window"):
    sampling.extract_cubes(data[:12], settings, sampling.scan_rng(0, "x"))
  out = prepare_lib.prepare(_config(crop=(16, 12)), scans, tmp_path / "ds2d", seed=0,
                            progress=False)
  source = pipeline.CubeSource(out, "train")
  assert source[0].shape == (16, 12, 1)


def test_npy_view_over_released_cubes(tmp_path):
  for k in range(3):
    np.save(tmp_path / f"bat_4_s_8x8x4_{k}.npy", np.full((4, *CROP), k / 4, np.float64))
  cfg = _config(source="npy", path=str(tmp_path / "bat_*.npy"), prepared_dir="")
  out = prepare_lib.ensure_dataset(cfg, tmp_path / "work", seed=0)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["counts"] == {"train": {"scans": 2, "cubes": 8}, "val": {"scans": 1, "cubes": 4}}
  assert pipeline.CubeSource(out, "val")[0].dtype == np.float32
  np.save(tmp_path / "bat_4_s_8x8x4_3.npy", np.zeros((4, 8, 8, 8)))
  with pytest.raises(prepare_lib.PrepareError, match=r"bat_4_s_8x8x4_3.npy: shape"):
    prepare_lib.ensure_dataset(cfg, tmp_path / "work2", seed=0)


def test_ensure_dataset_folder_and_prepared(scans, tmp_path):
  cfg = _config(source="folder", path=str(scans), prepared_dir="")
  out = prepare_lib.ensure_dataset(cfg, tmp_path, seed=0)
  assert out == tmp_path / "data"
  again = prepare_lib.ensure_dataset(_config(source="prepared", path=str(out)), tmp_path / "x")
  assert again == out
  (out / "manifest.json").unlink()
  with pytest.raises(manifest_lib.DatasetIncompleteError):
    prepare_lib.ensure_dataset(_config(source="prepared", path=str(out)), tmp_path / "x")


def test_ensure_dataset_phantom_uses_images_only_and_is_reused(tmp_path, monkeypatch):
  cfg = _config(source="phantom", path="", prepared_dir="", phantom_subjects=3,
                phantom_shape=(48, 48, 32), crop=(16, 16, 8), cubes_per_scan=2)
  out = prepare_lib.ensure_dataset(cfg, tmp_path, seed=0)
  manifest = json.loads((out / "manifest.json").read_text())
  assert [pathlib.Path(s["source"]).parent.name for s in manifest["shards"]] == ["imagesTr"] * 3
  assert manifest["counts"]["train"]["cubes"] + manifest["counts"]["val"]["cubes"] == 6

  def fail(*args, **kwargs):
    raise AssertionError("phantoms and their cubes must be reused")
  monkeypatch.setattr(prepare_lib, "process_scan", fail)
  assert prepare_lib.ensure_dataset(cfg, tmp_path, seed=0) == out


def test_other_processes_wait_for_process_zero(scans, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare_lib, "process_info", lambda: (1, 2))
  cfg = _config(source="folder", path=str(scans), prepared_dir=str(tmp_path / "ds"))
  with pytest.raises(TimeoutError, match="process 0"):
    prepare_lib.ensure_dataset(cfg, tmp_path, seed=0, wait_timeout_s=0.0)
  assert not (tmp_path / "ds").exists()  # Process 1 never writes.
  prepare_lib.prepare(cfg, scans, tmp_path / "ds", seed=0, progress=False)
  assert prepare_lib.ensure_dataset(cfg, tmp_path, seed=0, wait_timeout_s=0.0) == tmp_path / "ds"
