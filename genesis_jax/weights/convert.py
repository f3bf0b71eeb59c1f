"""Converts released Models Genesis weights into an Orbax checkpoint that fine-tuning loads.

  python -m genesis_jax.weights.convert Genesis_Chest_CT.pt runs/genesis_pt     # PyTorch
  python -m genesis_jax.weights.convert Genesis_Chest_CT.h5 runs/genesis_keras  # Keras

Both PyTorch serializations (zip and legacy) are read.

DST becomes a standalone Orbax checkpoint of {'params', 'batch_stats'} (the tree of `unet.UNet`)
plus DST/genesis_model.json: the model fields (variant, width, depth, spatial_dims, in/out
channels) and the source file. `load_converted(DST)` returns both. Needs neither torch nor TF.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from genesis_jax import errors
from genesis_jax.weights import release

MODEL_JSON = "genesis_model.json"


class DestinationExistsError(errors.ConfigError, FileExistsError):
  """The output directory of a conversion exists and --force was not given."""


def convert(src: str, dst: str, *, force: bool = False) -> dict:
  """Writes DST (Orbax checkpoint + genesis_model.json); returns the model config dict."""
  import orbax.checkpoint as ocp
  variables = release.import_release(src)
  cfg = release.model_config_of(variables)
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not force:
    raise DestinationExistsError(f"{dst} exists; pass --force to overwrite.")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(dst, variables, force=force)
    ckptr.wait_until_finished()
  with open(os.path.join(dst, MODEL_JSON), "w") as f:
    json.dump(dict(cfg, source=os.path.abspath(src)), f, indent=2)
  return cfg


def load_converted(dst: str) -> tuple[dict, dict]:
  """(variables {'params', 'batch_stats'} as numpy trees, model config dict) from `convert`."""
  import orbax.checkpoint as ocp
  dst = os.path.abspath(dst)
  json_path = os.path.join(dst, MODEL_JSON)
  if not os.path.isfile(json_path):
    raise release.WeightImportError(f"{dst}: no {MODEL_JSON}; not a directory written by "
                     "`python -m genesis_jax.weights.convert`.")
  with open(json_path) as f:
    cfg = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(dst)
  variables = {k: _to_numpy(restored[k]) for k in ("params", "batch_stats")}
  return variables, cfg


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="released .pt (PyTorch) or .h5 (Keras) weight file")
  parser.add_argument("dst", help="output directory (Orbax checkpoint)")
  parser.add_argument("--force", action="store_true", help="overwrite DST")
  args = parser.parse_args(argv)
  try:
    cfg = convert(args.src, args.dst, force=args.force)
  except errors.GenesisError as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {args.dst}: {cfg}")


if __name__ == "__main__":
  main()
