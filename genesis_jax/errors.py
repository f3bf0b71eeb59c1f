"""The errors a user can cause and fix: one base class, so the CLI knows what to print.

`python -m genesis_jax.main` prints a `GenesisError` as one line (`error: <message>`) and exits
non-zero; any other exception is a bug and prints its traceback. A message names the problem (the
key, file or value) and the way out. Each class also derives from the builtin error it refines, so
`except ValueError` (or FileNotFoundError, ...) keeps catching it.

This module imports nothing from the package: every layer may raise these.
"""
from __future__ import annotations


class GenesisError(Exception):
  """A problem with the config, the data, a path or the environment that the user can fix."""


class ConfigError(GenesisError, ValueError):
  """A config key or value is unknown, out of range or not allowed in this mode."""


class DataError(GenesisError, ValueError):
  """Input data (scans, labels, candidates, prepared cubes) cannot be used as it is."""


class MissingPathError(GenesisError, FileNotFoundError):
  """A file or folder the config names does not exist."""


class CheckpointError(GenesisError, RuntimeError):
  """A checkpoint cannot be written or read (no space, permission, damaged files)."""


class NonFiniteError(GenesisError, FloatingPointError):
  """Training produced a NaN or Inf loss or gradient and was told to stop."""


class DeviceMemoryError(GenesisError, MemoryError):
  """A step did not fit in device memory; the message says which keys shrink it."""


class EnvironmentSetupError(GenesisError, RuntimeError):
  """The process environment (distributed settings, devices, a missing extra) is not usable."""
