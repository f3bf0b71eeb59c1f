"""What a resumed run may change: each config key's rule, from its declaration in schema.py.

A key declares `resume=schema.MAY` (it may change on resume: step counts, cadences, learning
rate, patience) or `resume=schema.FIXED`; a key that declares neither follows its section: the
sections only evaluation, prediction and probing read may change, any other key (model, data,
seed, batch size, corruption, task, ...) is fixed. train/workdir.py enforces the rules;
config/reference.py shows them in docs/config.md ("On resume").
"""
from __future__ import annotations

from genesis_jax.config import schema

MAY_CHANGE_SECTIONS = ("eval", "predict", "probe")


def rule(path: str) -> str:
  """schema.FIXED or schema.MAY: whether a resumed run may change the key at a dotted path."""
  key = schema.lookup(path)
  if key is not None and key.resume is not None:
    return key.resume
  return schema.MAY if path.rpartition(".")[0] in MAY_CHANGE_SECTIONS else schema.FIXED
