"""Config files and overrides: load a config file, set keys on it, explain a bad override.

A config file is a Python file with `get_config(variant="")` returning a schema-built ConfigDict
(configs/*.py). Overrides are nested dicts keyed like the config ({"train": {"monitor": "auc"}});
`apply_overrides` sets them on a locked config, so a misspelt key or a key of another mode fails
with the message `validate.unknown_key_message` writes.
"""
from __future__ import annotations

import json
import pathlib
import runpy
from typing import Any, Mapping

import ml_collections

from genesis_jax import errors
from genesis_jax.config import schema
from genesis_jax.config import validate as validate_lib


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """path.py or path.py:variant -> the locked ConfigDict its get_config returns."""
  spec, _, variant = str(path).partition(":")
  if not pathlib.Path(spec).exists():
    raise errors.MissingPathError(f"config file {spec!r} does not exist.")
  get_config = runpy.run_path(spec).get("get_config")
  if get_config is None:
    raise errors.ConfigError(f"config file {spec!r} defines no get_config(variant='').")
  config = get_config(variant) if variant else get_config()
  config.lock()
  return config


def flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
  """Nested overrides -> {dotted key: value}; dotted keys in the mapping stay dotted."""
  out = {}
  for key in mapping.keys():
    value = mapping[key]
    path = f"{prefix}{key}"
    if hasattr(value, "keys"):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def set_key(config, path: str, value: Any) -> None:
  """Sets one dotted key of a (locked) config; an unknown key or a wrong type is a ConfigError."""
  family = validate_lib.config_family(config)
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    if p not in node or not hasattr(node[p], "keys"):
      raise errors.ConfigError(validate_lib.unknown_key_message(path, family))
    node = node[p]
  if leaf not in node:
    raise errors.ConfigError(validate_lib.unknown_key_message(path, family))
  if isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError:
    key = schema.lookup(path)
    if key is not None:
      validate_lib.check_value(path, value, key)  # Raises with the key's type.
    raise errors.ConfigError(f"config.{path}={value!r}: expected a value like "
                             f"{node[leaf]!r}.") from None


def apply_overrides(config, overrides: Mapping | None):
  """Sets nested (or dotted) overrides on a locked config; returns the config."""
  for path, value in flatten(overrides or {}).items():
    set_key(config, path, value)
  return config


def ordered_names(mapping) -> list[str]:
  """The keys of an arms/tasks dict in the order written (ConfigDict.keys() sorts them)."""
  if isinstance(mapping, ml_collections.ConfigDict):  # to_json keeps the order keys() sorts.
    return list(json.loads(mapping.to_json_best_effort()))
  return list(mapping)


def _argv_config_file(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _argv_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      path, eq, value = arg[len("--config."):].partition("=")
      if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
      out.append((path, value if (eq or value) else None))
  return out


def explain_overrides(argv: list[str]) -> str | None:
  """One line for the first bad `--config.<key>=<value>` in argv, or None if none is found.

  For the CLI, when ml_collections rejects an override: says which family a key of another mode
  belongs to, the closest key to a misspelt one, or the new form of an old string value.
  """
  path = _argv_config_file(argv)
  try:
    config = load_config_file(path) if path else None
  except Exception:  # pylint: disable=broad-except  # The file's own error is reported apart.
    config = None
  for key, value in _argv_overrides(argv):
    if key in schema.LEGACY and value is not None and not value.lstrip().startswith(("{", "(")):
      return (f"--config.{key}={value!r}: the old string form is gone; give a "
              f"{'tuple' if key.endswith('compare') else 'dict'}, e.g. "
              f"--config.{key}=\"{schema.LEGACY[key]}\" (see docs/config.md).")
    if config is None:
      continue
    node, family = config, validate_lib.config_family(config)
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        return _missing_entry(key, parts[:i], family)
      node = node[part]
  return None


def _missing_entry(key: str, found: list[str], family: str) -> str:
  """The message for an override path that stops existing after `found`."""
  for i in range(len(found), 0, -1):
    declared = schema.lookup(".".join(found[:i]))
    if declared is not None and declared.type is dict:
      holder = ".".join(found)
      return (f"config.{key}: config.{holder} has no entry {key.split('.')[len(found)]!r}; "
              f"set the dict whole, e.g. --config.{holder}='{{\"name\": ...}}' "
              f"(see docs/config.md).")
  return validate_lib.unknown_key_message(key, family)
