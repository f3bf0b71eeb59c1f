"""Hands a genesis_jax pre-training of an nnU-Net plans' network to nnU-Net.

  python -m genesis_jax.weights.nnunet_cli export --workdir runs/pretrain_nnunet \
      --out genesis_nnunet.pth [--which best|latest] [--step N] [--plans nnUNetPlans.json]
  nnUNetv2_train DATASET 3d_fullres FOLD -pretrained_weights genesis_nnunet.pth

The workdir is a `model.kind='nnunet'` pre-training (configs/pretrain_nnunet.py); its config.json
names the plans file and configuration the network was built from (`--plans` replaces the path,
e.g. when the run was started from another directory). The checkpoint is written by
`weights/nnunet.py` without torch: the state_dict of the same network in
dynamic_network_architectures, under the key nnU-Net's `load_pretrained_weights` reads; the
segmentation layers are left for nnU-Net to re-initialise. Pre-training writes
<workdir>/nnunet_pretrained.pth (the best checkpoint) at its end the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from genesis_jax import errors

EXPORT_NAME = "nnunet_pretrained.pth"


def run_plans(workdir: str | os.PathLike, plans: str | None = None):
  """The `NnUNetPlan` a pre-training workdir was built from (its config.json), `plans` replacing
  the plans path when given."""
  from genesis_jax.config import nnunet_plans  # pylint: disable=import-outside-toplevel
  cfg_file = pathlib.Path(workdir) / "config.json"
  if not cfg_file.is_file():
    raise errors.MissingPathError(f"{cfg_file} does not exist; give the workdir of a "
                                  f"model.kind='nnunet' pre-training.")
  model = json.loads(cfg_file.read_text()).get("model", {})
  if model.get("kind", "genesis") != "nnunet":
    raise errors.ConfigError(f"{workdir} is a pre-training of the Genesis U-Net "
                             f"(model.kind={model.get('kind', 'genesis')!r}), not of an nnU-Net "
                             f"plans' network; only model.kind='nnunet' runs export to nnU-Net.")
  path = plans or model.get("plans", "")
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"plans file {path!r} (model.plans of {cfg_file}) does not exist "
                                  f"from here; pass --plans PATH/nnUNetPlans.json.")
  return nnunet_plans.load_plans(path, model.get("configuration", "3d_fullres"))


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, which: str = "best",
           step: int | None = None, plans: str | None = None) -> pathlib.Path:
  """Writes the `which` (or `step`) checkpoint of a kind='nnunet' pre-training as an nnU-Net
  pretrained-weights file at `out`; returns its path."""
  from genesis_jax.weights import nnunet, transfer  # pylint: disable=import-outside-toplevel
  plan = run_plans(workdir, plans)
  variables, _ = transfer.load_pretrained(str(workdir), which=which, step=step)
  out = pathlib.Path(out)
  nnunet.write_nnunet_checkpoint(out, variables["params"], plan)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m genesis_jax.weights.nnunet_cli",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="write a pre-training's weights for nnUNetv2_train "
                      "-pretrained_weights")
  ex.add_argument("--workdir", required=True, help="a model.kind='nnunet' pre-training workdir")
  ex.add_argument("--out", required=True, help="the .pth file to write")
  ex.add_argument("--which", default="best", choices=("best", "latest"))
  ex.add_argument("--step", type=int, default=None, help="a given checkpoint step instead")
  ex.add_argument("--plans", default=None, help="the plans file, if config.json's path is stale")
  args = parser.parse_args(argv)
  try:
    out = export(args.workdir, args.out, which=args.which, step=args.step, plans=args.plans)
  except errors.GenesisError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {out}: nnUNetv2_train DATASET CONFIGURATION FOLD -pretrained_weights {out}")


if __name__ == "__main__":
  main()
