"""Entry point: python -m genesis_jax.main --config configs/<file>.py[:variant] --workdir <dir>

Overrides: --config.<key>=<value> (e.g. --config.train.batch_size=8, --config.num_steps=100).
Unknown keys are an error that names the closest known keys. `config.mode` picks the job:
pretrain | finetune | evaluate | predict | prepare | experiment.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py or path.py:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])

# XLA:CPU runs the depth-unfolded 2D convolutions of the CPU path faster with Eigen than with
# YNNPACK (SPEC.md, measured anchors). CPU-only flag: harmless on GPU/TPU. Users' XLA_FLAGS win.
_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nUsage: {__doc__.splitlines()[0]}")
  except (KeyError, AttributeError) as e:  # ml_collections: unknown key, with "Did you mean".
    msg = e.args[0] if e.args else str(e)
    sys.exit(f"error: unknown config key {msg}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if "://" in _WORKDIR.value:
    sys.exit(f"error: --workdir {_WORKDIR.value!r}: URLs are not supported yet; mount the bucket "
             "(e.g. gcsfuse) and pass the local path.")
  # jax.distributed must be initialised before any other JAX call.
  from genesis_jax.train import distributed
  decision = distributed.initialize()
  _enable_compilation_cache()
  from genesis_jax import run as experiment
  try:
    if distributed.is_primary():
      print(f"runtime: {distributed.describe_runtime()} | distributed: {decision.get('source')}",
            flush=True)
    experiment.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError, MemoryError,
          OSError) as e:
    # Errors with a message meant for the user: no traceback. In a multi-process run the
    # process exits at once instead of waiting in JAX's shutdown barrier.
    if os.environ.get("GENESIS_TRACEBACK"):
      raise
    distributed.exit_with_error(f"error: {type(e).__name__}: {e}")


def _enable_compilation_cache() -> None:
  """Persistent XLA compilation cache (default ~/.cache/genesis_jax/xla; "off" disables).

  Compiling the train step takes tens of seconds on CPU; a resumed or repeated run reuses it.
  """
  path = os.environ.get("GENESIS_COMPILATION_CACHE", os.path.expanduser("~/.cache/genesis_jax/xla"))
  if path == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run() -> None:
  if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _CPU_XLA_FLAGS
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
