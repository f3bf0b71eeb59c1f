"""Shared test fixtures: a tiny prepared phantom dataset and tiny configs for the CLI."""
from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
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
  if getattr(config.option, "loadscopereorder", None):  # pytest-xdist >= 3.7 (see HEAVY_FIRST)
    config.option.loadscopereorder = False


# The files that took longest in a cold -n 2 run (most XLA compile time) first. pyproject's
# --dist loadfile runs each file on one xdist worker (a module fixture is made once, not once per
# worker), in collection order (xdist >= 3.7 would sort the files by test count; pytest_configure
# turns that off): the long files start first and the short ones fill in at the end, instead of a
# long file running alone while the other worker idles.
HEAVY_FIRST = ("train/test_train_equivalence.py", "train/test_preemption.py", "test_corruptions.py",
               "test_predict.py", "train/test_finetune.py", "train/test_fault_tolerance.py",
               "models/test_models.py", "test_torch_control.py", "test_bench.py",
               "train/test_nnunet_pretrain.py", "test_pretrain_cli.py",
               "models/test_skip_mask_and_init.py", "train/test_nnunet_finetune.py",
               "train/test_finetune_2d.py", "train/test_pretrain_step.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

  def key(item):
    path = pathlib.Path(str(item.fspath))
    tests = REPO / "tests"
    return rank.get(path.relative_to(tests).as_posix() if path.is_relative_to(tests) else "",
                    len(rank))
  items.sort(key=key)  # Stable: the other files, and the tests within a file, keep their order.


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


def tiny_cli_args(workdir, dataset, steps, *extra) -> list[str]:
  """CLI arguments of a tiny demo pre-training on a prepared dataset (TINY_OVERRIDES, logs and
  checkpoints every 2 steps, validation every 4); `extra` overrides come last and win."""
  return ["--config", "configs/demo.py", "--workdir", str(workdir), *TINY_OVERRIDES,
          "--config.data.source=prepared", f"--config.data.path={dataset}",
          f"--config.num_steps={steps}", "--config.log_every=2", "--config.eval_every=4",
          "--config.checkpoint_every=2", *extra]


def final_params(workdir, step=None):
  """The variables of a run's latest checkpoint (or of checkpoint `step`)."""
  from genesis_jax.weights import transfer
  # A relative path on purpose: users pass relative workdirs (Orbax itself needs absolute ones).
  variables, _ = transfer.load_pretrained(os.path.relpath(workdir), which="latest", step=step)
  return variables


def assert_close(a, b, atol):
  """Same tree structure and every leaf within `atol` (0: bit for bit)."""
  import jax
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def shared_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """The folder `name`, filled by `make(folder)` once per test session, also across pytest-xdist
  workers (the first one makes it under a lock while the others wait, then all read it): for an
  expensive run that several tests only read."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The workers' base temps lie side by side in the session's.
  folder, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # What a failed attempt left.
      make(folder)
      done.touch()
  return folder


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, tiny_dataset) -> pathlib.Path:
  """An uninterrupted 12-step tiny CLI pre-training (`tiny_cli_args`), checkpoints at steps 4, 8
  and 12: the run the resume, pre-emption, kill and multi-process tests must reproduce (the
  cadence of logs, checkpoints and validation does not change the parameters)."""
  def make(folder):
    run_cli(tiny_cli_args(folder, tiny_dataset, 12, "--config.checkpoint_every=4",
                          "--config.log_every=4"))
  return shared_once(tmp_path_factory, "tiny_reference", make)


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


def predict_config(input_path, **predict_keys):
  """A mode=predict config reading `input_path`, with config.predict.<key> = value overrides."""
  from genesis_jax.config import schema
  c = schema.finetune_config()
  c.mode = "predict"
  c.predict.input = str(input_path)
  for k, v in predict_keys.items():
    setattr(c.predict, k, v)
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
