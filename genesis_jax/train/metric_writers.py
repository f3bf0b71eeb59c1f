"""Where metrics go: `<workdir>/metrics.jsonl`, TensorBoard events, and a progress line.

Only process 0 writes (every process computes the same global metrics).
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible as strings.
  return v


class MetricWriter:

  def __init__(self, workdir: pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
      from tensorboardX import SummaryWriter  # Writes TensorBoard events without TensorFlow.
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

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
  """One line per log step: step, loss, steps/s, cubes/s, ETA."""

  def __init__(self, total_steps: int, start_step: int, cubes_per_step: int, *, stream=sys.stdout):
    self.total = total_steps
    self.cubes_per_step = cubes_per_step
    self.stream = stream
    self._t = time.perf_counter()
    self._step = start_step

  def update(self, step: int, metrics: dict) -> dict:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    rate = (step - self._step) / dt
    self._t, self._step = now, step
    rates = {"steps_per_s": rate, "cubes_per_s": rate * self.cubes_per_step}
    if jax.process_index() == 0:
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      parts = [f"step {step}/{self.total}"]
      parts += [f"{k} {v:.5g}" for k, v in metrics.items() if isinstance(v, float)]
      parts += [f"{rate:.3g} steps/s", f"{rates['cubes_per_s']:.3g} cubes/s",
                f"ETA {_fmt_seconds(eta) if math.isfinite(eta) else '?'}"]
      print(" | ".join(parts), file=self.stream, flush=True)
    return rates
