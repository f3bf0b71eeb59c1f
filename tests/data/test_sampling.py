"""sampling: the lung-centred sampler (`data.sampler`) draws lung cubes; the default is unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from genesis_jax import errors
from genesis_jax.data import sampling
from genesis_jax.data.phantoms import subject

CROP = (16, 16, 8)
HU_WINDOW = (-1000.0, 1000.0)


def _settings(**overrides) -> sampling.CubeSettings:
  cfg = {"crop": CROP, "cubes_per_scan": 16, "modality": "ct", "hu_window": HU_WINDOW,
         "mri_norm": "percentile", "mri_percentiles": (0.5, 99.5), "spacing": (),
         "body_crop": False, "lung_filter": False}
  cfg.update(overrides)
  return sampling.CubeSettings.from_config(cfg)


def _unit(hu) -> np.ndarray:
  lo, hi = HU_WINDOW
  return (np.clip(hu, lo, hi) - lo) / (hi - lo)


@pytest.fixture(scope="module")
def volumes() -> list[np.ndarray]:
  """Two tiny phantom chests on the [0, 1] scale of the default CT window."""
  return [_unit(subject.make_phantom(subject.subject_seed(1, i), (64, 64, 48)).volume.data)
          for i in range(2)]


def _shares(volumes, settings) -> tuple[np.ndarray, np.ndarray]:
  """(air share, lung share) per cube: voxels below -900 HU, voxels in LUNG_WINDOW_HU."""
  cubes = np.concatenate([sampling.extract_cubes(v, settings, sampling.scan_rng(0, str(i)))
                          for i, v in enumerate(volumes)])
  flat = cubes.reshape(len(cubes), -1)
  lo, hi = _unit(np.array(sampling.LUNG_WINDOW_HU))
  return np.mean(flat < _unit(-900.0), axis=1), np.mean((flat >= lo) & (flat <= hi), axis=1)


def test_lung_centred_cubes_are_lung_not_air(volumes):
  # Band from bench/cube_statistics.py on these sizes: lung-centred median lung share about 0.4
  # and median air share about 0.01, where uniform sampling gives a lung share about 0.1.
  air, lung = _shares(volumes, _settings(sampler="lung_centred"))
  assert len(air) == 32
  assert np.median(lung) >= 0.3 and np.median(air) <= 0.1
  air, lung = _shares(volumes, _settings())
  assert np.median(lung) < 0.3  # The band separates the samplers.


def test_lung_centred_cube_centres_lie_in_the_lung_window(volumes):
  settings = _settings(sampler="lung_centred", scales=(1.0, 0.5))
  lo, hi = settings.lung_window()
  for size in {sampling.window_size(CROP, s) for s in settings.scales}:
    centres = sampling.lung_centres(volumes[0], size, (lo, hi))
    assert centres.size
    ijk = np.stack(np.unravel_index(centres, volumes[0].shape), axis=1)
    values = volumes[0][tuple(ijk.T)]
    assert ((values >= lo) & (values <= hi)).all()
    half = np.array(size) // 2
    assert (ijk >= half).all() and (ijk - half + np.array(size) <= volumes[0].shape).all()
  cubes = sampling.extract_cubes(volumes[0], settings, sampling.scan_rng(0, "a"))
  assert cubes.shape == (16, *CROP)
  np.testing.assert_array_equal(
      cubes, sampling.extract_cubes(volumes[0], settings, sampling.scan_rng(0, "a")))


def test_lung_centred_without_lung_yields_no_cubes():
  air = np.zeros((32, 32, 16), np.float32)
  cubes = sampling.extract_cubes(air, _settings(sampler="lung_centred"), sampling.scan_rng(0, "a"))
  assert cubes.shape == (0, *CROP)


def test_default_sampler_keeps_the_fingerprint_of_earlier_shards():
  # The value the settings had before `sampler` existed: shards prepared then stay valid.
  assert _settings().fingerprint() == "696084f00c69ce7d"
  assert _settings(sampler="anywhere").fingerprint() == "696084f00c69ce7d"
  assert _settings(sampler="lung_centred").fingerprint() != "696084f00c69ce7d"


@pytest.mark.parametrize("overrides,match", [
    ({"sampler": "lung"}, "config.data.sampler must be one of"),
    ({"sampler": "lung_centred", "modality": "mri"}, "needs modality 'ct'"),
    ({"sampler": "lung_centred", "hu_window": (-400.0, 400.0)}, "inside hu_window"),
])
def test_bad_sampler_settings_are_config_errors(overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    _settings(**overrides)
