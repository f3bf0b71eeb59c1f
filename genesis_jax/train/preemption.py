"""Graceful pre-emption: SIGTERM or SIGINT ends training with a checkpoint, not a loss of work.

SLURM, Kubernetes and Cloud TPU announce a pre-emption (or the end of a job's time) with SIGTERM
and kill the process some seconds later; Ctrl-C sends SIGINT. While `StopSignals` is active (the
training loop only), the first of these signals only sets a flag: the loop finishes its current
step, saves a checkpoint, waits for it, prints one line and raises `Preempted`, which exits the
process with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the code a shell and the
schedulers report for a process ended by that signal. Rerunning the same command resumes.

The first signal also puts back the default action of both signals, so a second one ends the
process at once, wherever it is (a partial checkpoint is never taken as complete: Orbax commits
by renaming a finished temporary directory).

In a multi-process run every process must stop after the same step, whichever of them got the
signal: every `AGREE_EVERY` steps each process contributes its flag to a small all-reduce over
the mesh, dispatched asynchronously and read `AGREE_EVERY` steps later (so it never stalls the
step pipeline); all processes read the same value at the same step and stop there. A single
process just reads its flag after every step.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from genesis_jax.train import sharding

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Steps between the multi-process agreements: a stop comes at most 2 * AGREE_EVERY steps after
# the signal; reading each result AGREE_EVERY steps after dispatching it keeps it off the
# critical path.
AGREE_EVERY = 8


def exit_code(signum: int) -> int:
  """128 + the signal number: what a process ended by that signal reports (SIGTERM: 143)."""
  return 128 + int(signum)


class Preempted(SystemExit):
  """Training stopped after a SIGTERM/SIGINT, with its checkpoint saved: rerun to resume.

  A SystemExit (code `exit_code(signum)`), so `except Exception` handlers (an experiment's trial
  loop, for instance) let it through and the process ends with that code.
  """

  def __init__(self, signum: int, step: int, checkpoint: str):
    super().__init__(exit_code(signum))
    self.signal_name = signal.Signals(signum).name
    self.step = step
    self.checkpoint = checkpoint

  def __str__(self) -> str:
    return (f"stopped at step {self.step} by {self.signal_name}, checkpoint saved "
            f"({self.checkpoint}); rerun the same command to resume")


class StopSignals:
  """While active: SIGTERM/SIGINT request a stop at a step boundary instead of killing.

  Handlers are installed only from the main thread (Python delivers signals there), and the
  previous handlers are restored on exit. A signal whose handler is SIG_IGN (e.g. SIGINT of a
  background process started by a shell script) stays ignored.
  """

  def __init__(self, mesh: jax.sharding.Mesh | None = None):
    self.mesh = mesh
    self.signum: int | None = None  # The first signal received by this process.
    self._previous: dict[int, object] = {}
    self._pending = None  # The all-reduce dispatched at the last agreement step.
    self._max = None

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if previous == signal.SIG_IGN:
          continue
        self._previous[sig] = previous
        signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # None: a handler installed outside Python (e.g. by a C++ runtime); it cannot be put back,
      # the default action is the closest.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
    for sig in self._previous:
      signal.signal(sig, signal.SIG_DFL)  # A second signal ends the process at once.
    # os.write, not print: the signal may have interrupted a print to the same stream.
    name = signal.Signals(signum).name
    os.write(2, (f"{name} received: finishing this step and saving a checkpoint; send "
                 f"{name} again to exit at once without saving.\n").encode())

  def requested(self, step: int) -> int | None:
    """After `step`: the signal to stop with now, or None. Every process gets the same answer."""
    if jax.process_count() == 1:
      return self.signum
    if step % AGREE_EVERY:
      return None
    agreed = self._read(self._pending) if self._pending is not None else None
    self._pending = self._dispatch()
    return agreed

  def final(self) -> int | None:
    """At the end of training: the signal any process received so far (blocking), or None."""
    if jax.process_count() == 1:
      return self.signum
    return self._read(self._dispatch())

  def _dispatch(self) -> jax.Array:
    """The maximum over all processes of their signal numbers (0: none), as a device array."""
    if self._max is None:
      self._max = jax.jit(jnp.max, out_shardings=sharding.replicated(self.mesh))
    local = np.full((jax.local_device_count(),), self.signum or 0, np.int32)
    return self._max(jax.make_array_from_process_local_data(
        sharding.batch_sharded(self.mesh), local))

  @staticmethod
  def _read(value: jax.Array) -> int | None:
    signum = int(np.asarray(value.addressable_data(0)))
    return signum or None
