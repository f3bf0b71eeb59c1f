"""Orbax's harmless restore WARNING stays off the console unless library logs are asked for."""
from __future__ import annotations

import logging

import numpy as np
import orbax.checkpoint as ocp
import pytest

from genesis_jax.train import checkpoints


@pytest.fixture
def absl_level():
  logger = logging.getLogger("absl")
  before = logger.level
  yield logger
  logger.setLevel(before)


def _records(caplog, pattern):
  return [r for r in caplog.records if pattern in r.getMessage()]


def test_item_restore_warning_is_filtered_at_warning_level(tmp_path, caplog, absl_level):
  mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state",))
  mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(4.0)})))
  mgr.wait_until_finished()
  mgr.close()
  item = tmp_path / "ckpt" / "3" / "state"  # What weights/transfer.py reads.
  checkpoints.install_quiet_hooks()

  # --verbosity=0: library logs asked for (absl at INFO), nothing dropped.
  with caplog.at_level(logging.INFO, logger="absl"):
    ocp.StandardCheckpointer().metadata(item)
  if not _records(caplog, "Metadata file does not exist"):
    pytest.skip("this Orbax version does not warn on an item-directory restore")
  caplog.clear()

  # The CLI's default (main.quiet_library_logs): absl at WARNING.
  with caplog.at_level(logging.WARNING, logger="absl"):
    meta = ocp.StandardCheckpointer().metadata(item)
  assert meta is not None
  assert not _records(caplog, "Metadata file does not exist")


def test_filter_keeps_other_warnings_and_non_orbax_records(absl_level):
  absl_level.setLevel(logging.WARNING)

  def record(path, level, msg):
    return logging.LogRecord("absl", level, path, 1, msg, (), None)

  orbax_path = "/x/orbax/checkpoint/checkpoint.py"
  assert not checkpoints.quiet_orbax_errors(
      record(orbax_path, logging.WARNING, "Metadata file does not exist: %s"))
  assert checkpoints.quiet_orbax_errors(record(orbax_path, logging.WARNING, "Disk nearly full"))
  assert checkpoints.quiet_orbax_errors(
      record("/x/genesis_jax/run.py", logging.WARNING, "Metadata file does not exist: %s"))
  assert not checkpoints.quiet_orbax_errors(record(orbax_path, logging.ERROR, "save failed"))
  absl_level.setLevel(logging.INFO)
  assert checkpoints.quiet_orbax_errors(record(orbax_path, logging.ERROR, "save failed"))
