"""Writes the config reference (docs/config.md) from the schema, so the two cannot drift.

  python -m genesis_jax.config.reference > docs/config.md

tests/config/test_reference.py checks that docs/config.md is this module's output.
"""
from __future__ import annotations

import sys

from genesis_jax.config import resume as resume_rules
from genesis_jax.config import schema
from genesis_jax.config.schema import EXP, FT, PRE

INTRO = """# Config reference

Generated from `genesis_jax/config/schema.py` by `python -m genesis_jax.config.reference >
docs/config.md`; do not edit by hand (tests/config/test_reference.py compares the two).

A config file (`configs/*.py`) defines `get_config(variant="")` and starts from one of the
schema's builders; any key below can be overridden on the command line,
`--config.<section>.<key>=<value>` (e.g. `--config.train.batch_size=8`). Each builder has the keys
of its family of modes only, and the run checks every key before it starts: a key of another
family is an error that names the family it belongs to.

| Family | Modes | Builder (in `genesis_jax.config.schema`) |
|---|---|---|
| pre-training | pretrain, prepare | `pretrain_config()` |
| fine-tuning | finetune, evaluate, predict, probe | `finetune_config()`, `phantom_task_config()` |
| experiment | experiment | `experiment_config()` |

Experiment arms and tasks are dicts (built with `schema.arm` and `schema.task` in config files).
Overrides are dicts keyed like the config; on the command line a dict is given whole, e.g.
`--config.experiment.overrides='{"num_steps": 200}'`, and its entries one by one once they
exist, e.g. `--config.experiment.arms.genesis.init=runs/pretrain`.

Environment variables are for process-level settings only: `GENESIS_COORDINATOR`,
`GENESIS_NUM_PROCESSES`, `GENESIS_PROCESS_ID`, `GENESIS_LOCAL_DEVICE_IDS` and
`GENESIS_DISTRIBUTED` (multi-process runs), `GENESIS_COMPILATION_CACHE` (the XLA compilation
cache) and `GENESIS_TRACEBACK` (tracebacks for every error). Nothing that changes the numbers
is read from the environment: it is a config key, recorded in `<workdir>/config.json`.

Rerunning a command on a workdir with a checkpoint resumes it. "On resume" says which keys may
then differ from the run's `config.json`: a `fixed` key (the model, data, seed, batch size,
corruption, task, optimizer, schedule kind, monitor) fixes what the checkpoints mean, and a
resume that changes one is refused before anything is written (set it back, or use a new
`--workdir`); a key that `may change` (steps, cadences, learning rate, patience, evaluation)
takes effect from the resumed step. `config.json` holds the latest start's config and
`<workdir>/config_history.jsonl` one line per start and resume: time, step, and each changed
key with its old and new value.
"""

SECTION_TITLES = {"": "Top level", "model": "model", "corruption": "corruption",
                  "data": "data", "train": "train", "task": "task", "finetune": "finetune",
                  "eval": "eval", "predict": "predict", "experiment": "experiment"}
SHORT = {PRE: "pre-training", FT: "fine-tuning", EXP: "experiment"}


def _value(v) -> str:
  if isinstance(v, dict):
    return "see below" if v else "`{}`"
  if isinstance(v, float) and v.is_integer() and abs(v) >= 1e6:
    return f"`{v:.0e}`".replace("e+0", "e")
  return f"`{v!r}`"


def _default(key: schema.Key) -> str:
  if isinstance(key.default, schema.PerFamily):
    return "<br>".join(f"{SHORT[f]}: {_value(v)}" for f, v in key.default.items()
                       if f in key.families)
  return _value(key.default)


def _allowed(key: schema.Key) -> str:
  if key.choices is not None:
    return ", ".join(f"`{c!r}`" for c in key.choices)
  parts = [{int: "integer", float: "number", str: "string", bool: "bool", tuple: "tuple",
            dict: "dict"}[key.type]]
  if key.type is tuple and key.item is not None:
    parts[0] = f"tuple of {key.item.__name__}"
  if key.length is not None:
    parts.append(f"{' or '.join(map(str, key.length))} entries")
  if key.range is not None:
    parts.append(str(key.range) if str(key.range)[0] in "<>" else f"in {key.range}")
  return ", ".join(parts)


def render() -> str:
  """The markdown reference: one table per section (key, default, allowed, families, meaning)."""
  out = [INTRO]
  for section, entries in schema.SECTIONS.items():
    out.append(f"\n## {SECTION_TITLES.get(section, section)}\n")
    out.append("| Key | Default | Allowed | Used by | On resume | Meaning |")
    out.append("|---|---|---|---|---|---|")
    for name, key in entries.items():
      path = f"{section}.{name}" if section else name
      used = ", ".join(SHORT[f] for f in key.families)
      doc = key.doc.replace("|", "\\|")
      resume = resume_rules.rule(path) if {PRE, FT} & set(key.families) else "-"
      out.append(f"| `{path}` | {_default(key)} | {_allowed(key)} | {used} | {resume} | {doc} |")
  exp = schema.SECTIONS["experiment"]
  out.append("\nDefault `experiment.tasks` and `experiment.arms`:\n")
  out.append("```python")
  out.append(f"tasks = {exp['tasks'].default!r}")
  out.append(f"arms = {exp['arms'].default!r}")
  out.append("```")
  out.append("\nThe old string forms of these keys and what to write instead:\n")
  for path, new in schema.LEGACY.items():
    out.append(f"- `{path}`: `{path} = {new}`")
  return "\n".join(out) + "\n"


def main() -> None:
  sys.stdout.write(render())


if __name__ == "__main__":
  main()
