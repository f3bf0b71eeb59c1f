"""The vocabulary of the config schema: config families and modes, `Key` (one declared key),
`Range`, per-family defaults and the resume rules. `schema.py` declares the keys with these.

This module imports nothing else from the package but `errors`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from genesis_jax import errors

PRE, FT, EXP = "pretrain", "finetune", "experiment"
FAMILIES = {PRE: ("pretrain", "prepare"), FT: ("finetune", "evaluate", "predict", "probe"),
            EXP: ("experiment",)}
MODES = ("pretrain", "finetune", "evaluate", "predict", "probe", "prepare", "experiment")
BUILDERS = {PRE: "pretrain_config()", FT: "finetune_config()", EXP: "experiment_config()"}
FAMILY_NAMES = {PRE: "pre-training", FT: "fine-tuning", EXP: "experiment"}


def family_of(mode: str) -> str:
  """The config family (PRE, FT or EXP) whose keys a mode reads."""
  for family, modes in FAMILIES.items():
    if mode in modes:
      return family
  raise errors.ConfigError(f"config.mode={mode!r} is not one of {MODES}.")


@dataclasses.dataclass(frozen=True)
class Range:
  """A closed (or half-open) interval; None leaves that side unbounded."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False

  def __contains__(self, v) -> bool:
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

  def __str__(self) -> str:
    if self.hi is None:
      return f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
    return (f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
            f"{')' if self.hi_open else ']'}")


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  default: the value, or {family: value} where the families' defaults differ.
  type: int, float, str, bool, tuple (items of `item`), or dict (a nested structure).
  choices: the allowed values (None: any of the type). range: for numbers and tuple items.
  length: allowed tuple lengths. families: the config families that have this key.
  resume: whether resuming a run may change the key (MAY) or not (FIXED: it changes what the
  run's checkpoints mean); None takes its section's rule (config/resume.py).
  """
  default: Any
  doc: str
  type: type = str
  choices: tuple | None = None
  range: Range | None = None
  item: type | None = None
  length: tuple[int, ...] | None = None
  families: tuple[str, ...] = (PRE, FT)
  resume: str | None = None

  def default_for(self, family: str) -> Any:
    d = self.default
    return copy.deepcopy(d[family] if isinstance(d, PerFamily) else d)


class PerFamily(dict):
  """A default that differs between config families: {family: value}."""


def per(pretrain, finetune) -> PerFamily:
  """A default that differs between pre-training and fine-tuning."""
  return PerFamily({PRE: pretrain, FT: finetune})


FIXED, MAY = "fixed", "may change"  # Key.resume: a resumed run keeps the key, or may change it.

POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0.0, 1.0)


def declare(default, doc, type_=None, **kw) -> Key:
  """A Key whose type, unless given, is its default's (the pre-training default's if per family)."""
  if type_ is None:
    type_ = type(next(iter(default.values())) if isinstance(default, PerFamily) else default)
  return Key(default, doc, type_, **kw)
