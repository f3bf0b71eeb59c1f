"""The README's user-code example runs as written (with a tiny released-format checkpoint)."""
from __future__ import annotations

import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_import_does_not_start_jax():
  import subprocess
  code = "import genesis_jax, sys; genesis_jax.__all__; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_readme_flax_example_runs(capsys):
  readme = (REPO / "README.md").read_text()
  block = re.search(r"### In your own Flax code\s+```python\n(.*?)```", readme, re.S).group(1)
  fixture = REPO / "tests" / "fixtures" / "genesis_tiny_zip.pt"
  # Same code; only the weights file and the cube size (the fixture net is tiny) change.
  code = block.replace('"Genesis_Chest_CT.pt"', repr(str(fixture)))
  code = code.replace("(8, 64, 64, 32, 1)", "(8, 16, 16, 8, 1)")
  exec(compile(code, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "loaded" in out and "fresh" in out
  losses = [float(l.split()[1]) for l in out.splitlines() if re.match(r"^\d+ ", l)]
  assert len(losses) == 3 and all(l == l for l in losses)


def test_unknown_attribute():
  import genesis_jax
  with pytest.raises(AttributeError):
    genesis_jax.nope


def test_every_export_resolves():
  import genesis_jax
  for name in genesis_jax.__all__:
    assert getattr(genesis_jax, name) is not None, name
