"""Entry point: python -m genesis_jax.main --config configs/<file>.py[:variant] --workdir <dir>

Overrides: --config.<key>=<value> (e.g. --config.train.batch_size=8, --config.num_steps=100).
Unknown keys are an error that names the closest known keys. `config.mode` picks the job:
pretrain | finetune | evaluate | predict | probe | prepare | experiment.

A user-facing error (`genesis_jax.errors.GenesisError`: a bad key, value, file or path) prints
one line, `error: <message>`, and exits non-zero; any other exception is a bug and prints its
traceback (GENESIS_TRACEBACK=1 prints one for user-facing errors too). Library INFO logs (orbax,
absl, jax) are hidden unless --verbosity=0 (or higher) asks for them.
"""
from __future__ import annotations

import ast
import logging
import os
import pathlib
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from genesis_jax.config import loading

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Config file (path.py or path.py:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = ("python -m genesis_jax.main --config configs/<file>.py[:variant] --workdir <dir> "
         "[--config.<key>=<value> ...] [--verbosity=0]")
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Keys most runs touch, shown by --help; docs/config.md lists every key.
MAIN_KEYS = (
    ("mode", "pretrain | finetune | evaluate | predict | probe | prepare | experiment"),
    ("num_steps", "training steps (an upper bound when early stopping is on)"),
    ("data.source, data.path", "where the scans come from (phantom | folder | prepared | npy)"),
    ("data.crop", "cube size (x, y, z), or (x, y) for 2D slices"),
    ("train.batch_size", "cubes per device per step"),
    ("train.learning_rate", "peak learning rate"),
    ("eval_every, checkpoint_every, log_every", "how often to validate, save and print"),
    ("seed", "the run's random seed"),
)
# Loggers of the libraries whose INFO records (checkpoint option dumps and the like) would drown
# the run's own progress lines.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "etils")

# XLA:CPU runs the depth-unfolded 2D convolutions of the CPU path faster with Eigen than with
# YNNPACK (docs/method.md). CPU-only flag: harmless on GPU/TPU. Users' XLA_FLAGS win.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def config_purpose(path: pathlib.Path) -> str:
  """The first line of a config file's module docstring (read, not executed)."""
  try:
    doc = ast.get_docstring(ast.parse(path.read_text()))
  except (OSError, SyntaxError, ValueError):
    doc = None
  return doc.strip().splitlines()[0] if doc else ""


def help_text() -> str:
  """What --help prints: usage, the configs in configs/ with their purpose, the main keys."""
  lines = [f"usage: {USAGE}", "", "Trains, fine-tunes, evaluates or applies a Models Genesis "
           "3D U-Net; config.mode picks the job.", "", "Configs (configs/):"]
  configs = sorted(CONFIGS_DIR.glob("*.py")) if CONFIGS_DIR.is_dir() else []
  width = max((len(p.name) for p in configs), default=0)
  lines += [f"  {p.name:<{width}}  {config_purpose(p)}" for p in configs]
  lines += ["", "Main keys (override with --config.<key>=<value>):"]
  width = max(len(k) for k, _ in MAIN_KEYS)
  lines += [f"  {k:<{width}}  {meaning}" for k, meaning in MAIN_KEYS]
  lines += ["", "Flags:",
            "  --config FILE[:variant]  the config file (and its variant, if it has any)",
            "  --workdir DIR            run directory: config.json, checkpoints, metrics, samples",
            "  --verbosity N            library logs: -1 warnings only (default), 0 INFO, 1 DEBUG",
            "", "Every key, its type, allowed values and meaning: docs/config.md.",
            "A bad key, value or path prints one line `error: ...`; GENESIS_TRACEBACK=1 adds the "
            "traceback."]
  return "\n".join(lines)


def _config_arg(argv: list[str]) -> str | None:
  """The value of --config in argv, if any (--config X or --config=X)."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("--config", "-config"):
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _check_config_file(spec: str) -> None:
  """Exits with one line when the config file does not exist (ml_collections defers the error)."""
  path = pathlib.Path(spec.split(":", 1)[0])
  if path.is_file():
    return
  configs = sorted(CONFIGS_DIR.glob("*.py")) if CONFIGS_DIR.is_dir() else []
  known = ", ".join(p.name for p in configs)
  sys.exit(f"error: --config {spec}: no such config file {str(path)!r}"
           + (f"; the configs in {CONFIGS_DIR.name}/ are {known}" if known else "")
           + " (see --help).")


def unknown_key_message(error: BaseException, argv: list[str]) -> str:
  """One line for an override naming an unknown key (ml_collections' KeyError/AttributeError).

  ml_collections wraps a KeyError in an AttributeError, and its text lists every field of the
  section and ends with 'Did you mean ...'; this keeps the key, the override that carried it and
  the suggestion.
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  found = re.search(r'Key "([^"]+)" does not exist', text)
  key = found.group(1) if found else text.splitlines()[0].strip().strip("'\"") if text else "?"
  hint = next((line.strip() for line in text.splitlines() if line.startswith("Did you mean")), "")
  override = next((a.split("=", 1)[0] for a in argv
                   if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")), None)
  where = f" in {override}" if override else ""
  return (f"unknown config key {key!r}{where}." + (f" {hint}" if hint else "")
          + " docs/config.md lists every key.")


def flag_error_message(error: BaseException) -> str:
  """One line for a flag error; a config file that failed to load gives its last error line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith(("Traceback", "File ")) for line in lines):
    where = lines[0].rstrip(":").replace(": Error whilst parsing config file", "")
    return f"{where}: {strip_class(lines[-1])}"
  return strip_class(" ".join(lines))


def strip_class(text: str) -> str:
  """Drops a `genesis_jax.errors.XError: ` prefix: the message itself names the problem."""
  return re.sub(r"(?:genesis_jax\.errors\.)?[A-Za-z]*Error: ", "", text, count=1)


def parse_flags(argv: list[str]) -> list[str]:
  if any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  spec = _config_arg(argv[1:])
  if spec is not None:
    _check_config_file(spec)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A bad override (an old string form, a key of another mode) is explained by the schema.
    explained = loading.explain_overrides(argv[1:])
    sys.exit(f"error: {explained or flag_error_message(e)} (usage: --help)")
  except (KeyError, AttributeError) as e:  # ml_collections: unknown key, with "Did you mean".
    sys.exit(f"error: {loading.explain_overrides(argv[1:]) or unknown_key_message(e, argv)}")


def quiet_library_logs() -> None:
  """Library INFO records off unless --verbosity was given (absl's flag: 0 = INFO, 1 = DEBUG)."""
  if flags.FLAGS["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)  # Root level too, under absl's handler.
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  from genesis_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.install_quiet_hooks()  # Orbax's harmless restore WARNINGs too (e.g. in predict).


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; overrides are --config.<key>=<value>.")
  if "://" in _WORKDIR.value:
    sys.exit(f"error: --workdir {_WORKDIR.value!r}: URLs are not supported yet; mount the bucket "
             "(e.g. gcsfuse) and pass the local path.")
  quiet_library_logs()
  # jax.distributed must be initialised before any other JAX call.
  from genesis_jax import errors
  from genesis_jax.train import distributed
  try:
    check_retired_environment()
    decision = distributed.initialize()
    _enable_compilation_cache()
    from genesis_jax import run as experiment
    if distributed.is_primary():
      print(f"runtime: {distributed.describe_runtime()} | distributed: {decision.get('source')}",
            flush=True)
    experiment.run(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    # Ctrl-C outside training (data preparation, compilation); training handles it itself.
    if os.environ.get("GENESIS_TRACEBACK"):
      raise
    distributed.exit_with_error("interrupted before training started; rerun the same command to "
                                "continue", code=130)
  except errors.GenesisError as e:
    # A message meant for the user: no traceback. In a multi-process run the process exits at
    # once instead of waiting in JAX's shutdown barrier.
    if os.environ.get("GENESIS_TRACEBACK"):
      raise
    distributed.exit_with_error(f"error: {e}")


# Environment variables that used to change the numerics; they are config keys now, recorded in
# config.json. Setting one is an error naming its key rather than a silently ignored setting.
RETIRED_ENVIRONMENT = {
    "GENESIS_WINOGRAD_MIN_MACS": "--config.model.winograd_min_macs=<multiply-adds>",
    "GENESIS_WINOGRAD_TILE": "--config.model.conv_impl=unfold:<0|2|4>",
}


def check_retired_environment(environ=None) -> None:
  from genesis_jax import errors
  environ = os.environ if environ is None else environ
  for name, key in RETIRED_ENVIRONMENT.items():
    if name in environ:
      raise errors.ConfigError(f"the environment variable {name} is no longer read; unset it and "
                               f"use {key} (a config key, recorded in config.json).")


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
    os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
