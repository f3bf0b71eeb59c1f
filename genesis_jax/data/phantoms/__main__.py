"""`python -m genesis_jax.data.phantoms --out data/phantoms --subjects 24 --seed 0`."""
from __future__ import annotations

from genesis_jax.data.phantoms.cli import main

if __name__ == "__main__":
  main()
