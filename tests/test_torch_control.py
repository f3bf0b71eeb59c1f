"""bench/torch_control.py at a tiny size: the torch reference net, started from our exported init
on our corrupted batches, gives our logits at step 0 and our losses after, and both arms are
probed on the same cubes. Skipped where torch is not installed (it is a bench extra, not a test
dependency)."""
from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import REPO

pytest.importorskip("torch")


def test_torch_control_tiny(tmp_path):
  sys.path.insert(0, str(REPO / "bench"))
  try:
    import torch_control
  finally:
    sys.path.remove(str(REPO / "bench"))
  result = torch_control.main([
      "--workdir", str(tmp_path), "--steps", "2", "--width", "2", "--checkpoint_every", "2",
      "--threads", "1",
      "--set", "data.crop=(16,16,8)", "data.phantom_subjects=2", "data.phantom_shape=(48,48,32)",
      "data.cubes_per_scan=8", "log_every=1", "eval_every=2", "eval_batches=1",
      "samples_every_eval=False",
      "--probe_set", "data.phantom_shape=(48,48,32)", "data.crop=(16,16,8)",
      "data.train_cases=3", "data.val_cases=2", "data.test_cases=1", "probe.folds=2"])
  assert max(result["sanity_max_abs_logit_diff"].values()) < 1e-4
  assert [s for s, _, _ in result["losses"]] == [1, 2]
  for _, loss_jax, loss_torch in result["losses"]:  # Same batches, same init, same optimizer.
    assert loss_torch == pytest.approx(loss_jax, rel=1e-3)
  arms = {(r["arm"], r["step"]) for r in result["rows"]}
  assert arms == {("init", "init"), ("jax", 2), ("torch", 2)}
  assert len(result["rows"]) == 3 * 4  # Four encoder levels each.
  assert all(math.isfinite(r["effective_rank"]) and math.isfinite(r["probe_mean"])
             for r in result["rows"])
  assert json.loads((tmp_path / "torch_control.json").read_text())["losses"]
