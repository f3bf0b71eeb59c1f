"""Shared test fixtures: a tiny prepared phantom dataset and tiny configs for the CLI."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA cache for the whole test session (subprocess CLI runs and in-process
# training): the same tiny train step is compiled once instead of in every run.
COMPILE_CACHE = pathlib.Path(os.environ.get("GENESIS_TEST_COMPILE_CACHE",
                                            "/tmp/genesis_jax_test_xla_cache"))


# The CLI's default XLA flags, so in-process runs share compiled programs with CLI runs.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")


def pytest_configure(config):
  import jax
  jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Small enough for a 2-core CPU: width-4 U-Net on 16x16x8 cubes.
TINY_OVERRIDES = [
    "--config.model.width=4",
    "--config.data.crop=(16,16,8)",
    "--config.data.phantom_subjects=4",
    "--config.data.phantom_shape=(48,48,32)",
    "--config.data.cubes_per_scan=8",
    "--config.data.val_fraction=0.25",
    "--config.train.batch_size=8",
    # SGD, not the demo's Adam: Adam turns the float noise of exactly-zero gradients (conv biases
    # before BatchNorm) into lr-sized steps, which would hide real differences between runs.
    "--config.train.optimizer=sgd",
    "--config.train.learning_rate=0.5",
    "--config.corruption.local_blocks=200",
    "--config.eval_batches=2",
]


def run_cli(args: list[str], *, env_extra: dict | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["GENESIS_COMPILATION_CACHE"] = str(COMPILE_CACHE)
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", "genesis_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"CLI failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                         f"STDERR:\n{proc.stderr[-6000:]}")
  return proc


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> pathlib.Path:
  """A prepared dataset of tiny phantom cubes (16x16x8), made once per test session/worker."""
  from genesis_jax.config import schema as defaults
  from genesis_jax.data import prepare
  root = tmp_path_factory.mktemp("tiny_data")
  c = defaults.pretrain_config()
  c.data.crop = (16, 16, 8)
  c.data.phantom_subjects = 4
  c.data.phantom_shape = (48, 48, 32)
  c.data.cubes_per_scan = 8
  c.data.val_fraction = 0.25
  return prepare.ensure_dataset(c.data, root, seed=0)


def tiny_task_config(kind, phantoms_root, init=""):
  """A width-4 fine-tuning config on tiny phantom cases (16x16x8 crops, 6 steps)."""
  from genesis_jax.config import schema as defaults
  c = defaults.finetune_config()
  c.task.kind = kind
  c.model.width = 4
  c.data.source = "phantom"
  c.data.path = str(phantoms_root)
  c.data.phantom_seed = 1
  c.data.phantom_shape = (64, 64, 48)
  c.data.crop = (16, 16, 8)
  c.data.train_cases, c.data.val_cases, c.data.test_cases = 3, 2, 2
  c.data.cubes_per_case = 8
  c.train.batch_size = 8
  c.num_steps = 6
  c.eval_every = 3
  c.checkpoint_every = 3
  c.log_every = 3
  c.finetune.init = str(init)
  return c


def tiny_pretrain_config(dataset, steps, *, eval_every=4, nonfinite="stop"):
  """A width-4 in-process pre-training on a prepared tiny dataset (16x16x8, SGD, checkpoints
  every 2 steps): the config the train, probe and lifecycle tests share."""
  from genesis_jax.config import schema
  c = schema.pretrain_config()
  c.model.width = 4
  c.data.source = "prepared"
  c.data.path = str(dataset)
  c.data.crop = (16, 16, 8)
  c.train.batch_size = 8
  c.train.optimizer = "sgd"
  c.train.learning_rate = 0.5
  c.train.schedule = "constant"
  c.train.nonfinite = nonfinite
  c.corruption.local_blocks = 200
  c.num_steps = steps
  c.log_every = 1
  c.eval_every = eval_every
  c.eval_batches = 1
  c.checkpoint_every = 2
  c.samples_every_eval = False
  return c
