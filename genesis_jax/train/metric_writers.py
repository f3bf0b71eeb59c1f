"""Where metrics go: `<workdir>/metrics.jsonl`, TensorBoard events, and a progress line.

Only process 0 writes (every process computes the same global metrics). A run resumed from step
s drops the rows after s that an earlier attempt wrote (they are run again), so metrics.jsonl has
one row per step, and tells TensorBoard to discard its events after s.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax

from genesis_jax.data import store


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible as strings.
  return v


def drop_rows_after(path: pathlib.Path, step: int) -> int:
  """Rewrites the JSONL file `path` (atomically) without its rows after `step`, and without
  lines cut short by a kill; returns how many lines were dropped."""
  if not path.exists():
    return 0
  lines = path.read_bytes().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      row = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
      keep.append(line)
  if len(keep) < len(lines):
    store.write_bytes(path, b"".join(keep))
  return len(lines) - len(keep)


class MetricWriter:
  """Appends rows to `<workdir>/metrics.jsonl` and TensorBoard events; `resume_step` (the step
  the run starts from) drops what an earlier attempt wrote after it."""

  def __init__(self, workdir: pathlib.Path, *, enabled: bool | None = None,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      if resume_step is not None:
        drop_rows_after(workdir / "metrics.jsonl", resume_step)
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
      from tensorboardX import SummaryWriter  # Writes TensorBoard events without TensorFlow.
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _fmt_seconds(s: float) -> str:
  s = int(max(0, s))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """One concise console line per log step: step/total, loss, learning rate, speed and ETA.

    step  20/200 | loss 0.01234 | lr 1 | 2.1 steps/s, 12.6 cubes/s | ETA 1m25s

  The full metrics (gradient norm, skipped steps, ...) go to metrics.jsonl and TensorBoard.
  """

  def __init__(self, total_steps: int, start_step: int, cubes_per_step: int, *, stream=sys.stdout):
    self.total = total_steps
    self.cubes_per_step = cubes_per_step
    self.stream = stream
    self._t = time.perf_counter()
    self._step = start_step

  def update(self, step: int, metrics: dict) -> dict:
    """Prints the line (process 0) and returns the rates, for the metrics written with it."""
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    rate = (step - self._step) / dt
    self._t, self._step = now, step
    rates = {"steps_per_s": rate, "cubes_per_s": rate * self.cubes_per_step}
    if jax.process_index() == 0:
      print(self.line(step, metrics, rate), file=self.stream, flush=True)
    return rates

  def line(self, step: int, metrics: dict, rate: float) -> str:
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step:>{len(str(self.total))}}/{self.total}"]
    if "loss" in metrics:
      parts.append(f"loss {float(metrics['loss']):.5g}")
    if "learning_rate" in metrics:
      parts.append(f"lr {float(metrics['learning_rate']):.3g}")
    parts.append(f"{rate:.3g} steps/s, {rate * self.cubes_per_step:.3g} cubes/s")
    parts.append(f"ETA {_fmt_seconds(eta) if math.isfinite(eta) else '?'}")
    return " | ".join(parts)
