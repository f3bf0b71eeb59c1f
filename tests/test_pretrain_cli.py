"""The real CLI, as a subprocess, on the demo config shrunk to seconds."""
from __future__ import annotations

import json
import re

import numpy as np

from conftest import TINY_OVERRIDES, run_cli


def test_demo_cli_writes_outputs_and_loss_falls(tmp_path, tiny_dataset):
  workdir = tmp_path / "run"
  proc = run_cli(["--config", "configs/demo.py", "--workdir", str(workdir), *TINY_OVERRIDES,
                  "--config.data.source=prepared", f"--config.data.path={tiny_dataset}",
                  "--config.num_steps=40", "--config.log_every=5", "--config.eval_every=20",
                  "--config.checkpoint_every=20"])
  assert "steps/s" in proc.stdout and "ETA" in proc.stdout
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train][:2] == [5, 10]
  assert {"loss", "learning_rate", "cubes_per_s", "steps_per_s"} <= set(train[0])
  losses = [r["loss"] for r in train]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
  assert any("val_loss" in r for r in rows)
  assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()
                if p.name.isdigit()) == ["20", "40"]
  assert any((workdir / "checkpoints" / "best").iterdir())
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  pngs = sorted((workdir / "samples").glob("*.png"))
  assert len(pngs) == 2
  from PIL import Image
  assert Image.open(pngs[0]).size[0] > 32
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_step"] == 40 and np.isfinite(summary["best_val_loss"])


def test_unknown_config_key_is_an_error_with_suggestion(tmp_path):
  proc = run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path / "x"),
                  "--config.trian.batch_size=2"], check=False)
  assert proc.returncode != 0
  assert "trian" in proc.stderr
  assert re.search(r'Did you mean "?(config\.)?train', proc.stderr), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "x").exists()


def test_key_of_another_mode_is_an_error(tmp_path):
  """A pre-training key on a fine-tuning config is rejected, in one line naming its family,
  before anything runs."""
  proc = run_cli(["--config", "configs/finetune_ncc.py", "--workdir", str(tmp_path / "x"),
                  "--config.corruption.local_rate=0.1"], check=False)
  assert proc.returncode != 0
  assert "config.corruption.local_rate is a pre-training key" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "x").exists()


def test_bad_enum_value_is_an_error_naming_the_key(tmp_path):
  proc = run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path / "x"),
                  "--config.train.optimizer=sgdd"], check=False)
  assert proc.returncode != 0
  assert "config.train.optimizer" in proc.stderr and "'sgd'" in proc.stderr


def test_missing_data_path_is_an_error(tmp_path):
  proc = run_cli(["--config", "configs/demo.py", "--workdir", str(tmp_path / "x"),
                  "--config.data.source=folder", f"--config.data.path={tmp_path}/nope"],
                 check=False)
  assert proc.returncode != 0 and "nope" in proc.stderr and "does not exist" in proc.stderr


def test_genesis_2d_variant_runs(tmp_path):
  # Depth 1: the 2D convs, data and samples run end to end; a deeper net only adds compile time.
  workdir = tmp_path / "run2d"
  proc = run_cli(["--config", "configs/demo_2d.py", "--workdir", str(workdir),
                  "--config.model.width=4", "--config.model.depth=1", "--config.data.crop=(32,32)",
                  "--config.data.phantom_subjects=3", "--config.data.phantom_shape=(48,48,32)",
                  "--config.data.cubes_per_scan=8", "--config.train.batch_size=8",
                  "--config.corruption.local_blocks=500", "--config.num_steps=4",
                  "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint_every=4",
                  "--config.eval_batches=1"])
  assert "step 4/4" in proc.stdout
  from genesis_jax.weights import transfer
  variables, model_cfg = transfer.load_pretrained(str(workdir), which="latest")
  kernel = variables["params"]["encoder"]["down_0"]["conv_0"]["conv"]["kernel"]
  assert kernel.shape[:2] == (3, 3) and kernel.ndim == 4  # 2D convs: (3, 3, C_in, C_out).
  assert model_cfg["spatial_dims"] == 2
  assert len(list((workdir / "samples").glob("*.png"))) == 1
