"""Transfer of pre-trained weights into a fine-tuning model, reported path by path.

`load_pretrained(init)` reads any of: a pre-training workdir (its best or latest Orbax
checkpoint), a converted release (`python -m genesis_jax.weights.convert`), or a released PyTorch
(.pt/.pth/.tar) or Keras (.h5) file. `merge_params` then copies every matching leaf into the
freshly initialised tree and says what it did; a shape mismatch on a leaf that is not excluded by
`dont_load` is an error naming the paths, never a silent fallback to random init.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from genesis_jax import errors


class TransferError(errors.ConfigError):
  """Pre-trained weights do not fit the model; the message names the paths and the config key."""


def _flat(tree) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree) if tree else {}).items()}


def _unflat(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


@dataclasses.dataclass
class TransferReport:
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)
  adapted: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    def groups(paths):  # Collapse to the first two path components for a readable log.
      out: dict[str, int] = {}
      for p in paths:
        g = "/".join(p.split("/")[:3])
        out[g] = out.get(g, 0) + 1
      return ", ".join(f"{g} ({n})" for g, n in sorted(out.items())) or "-"
    return (f"transfer from {self.source}:\n"
            f"  loaded  {len(self.loaded)} arrays: {groups(self.loaded)}\n"
            f"  fresh   {len(self.fresh)} arrays: {groups(self.fresh)}\n"
            f"  ignored {len(self.ignored)} arrays: {groups(self.ignored)}"
            + (f"\n  adapted {self.adapted}" if self.adapted else ""))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _adapt_first_conv(src: np.ndarray, dst_shape: tuple[int, ...]) -> np.ndarray | None:
  """First conv kernel (*k, C_in, C_out) with C_in=1 -> C_in=n: replicate / n (keeps the response
  to an image repeated over channels). None when this is not such a case."""
  if src.ndim < 3 or src.shape[:-2] != dst_shape[:-2] or src.shape[-1] != dst_shape[-1]:
    return None
  if src.shape[-2] != 1:
    return None
  n = dst_shape[-2]
  return np.repeat(src, n, axis=-2) / n


def _params_first(item: tuple[str, Any]) -> tuple[bool, str]:
  """Sort key: parameters first, so the first paths an error names are the ones users know."""
  return not item[0].startswith("params/"), item[0]


FIRST_CONV = "params/encoder/down_0/conv_0/conv/kernel"
_ENCODER_LEVEL = re.compile(r"params/encoder/down_(\d+)/")


def architecture(flat: dict[str, Any]) -> dict[str, int]:
  """What flat parameter shapes say about a U-Net: the config.model keys width (the first conv's
  output channels), spatial_dims and depth (the deepest encoder level); the keys it cannot tell
  are left out."""
  out = {}
  first = flat.get(FIRST_CONV)
  if first is not None and len(np.shape(first)) >= 3:
    out["width"] = int(np.shape(first)[-1])
    out["spatial_dims"] = len(np.shape(first)) - 2
  levels = [int(m.group(1)) for m in map(_ENCODER_LEVEL.match, flat) if m]
  if levels:
    out["depth"] = max(levels)
  return out


def check_architecture(target: dict[str, Any], src: dict[str, Any], source: str) -> None:
  """Raises TransferError when the checkpoint is another network (width, depth or 2D/3D) than
  the model: one line naming the checkpoint's values and the config keys, not every array."""
  model, ckpt = architecture(target), architecture(src)
  keys = [k for k in ("width", "depth", "spatial_dims") if k in model and k in ckpt
          and model[k] != ckpt[k]]
  if not keys:
    return
  have = ", ".join(f"{ckpt[k]}D" if k == "spatial_dims" else f"{k} {ckpt[k]}" for k in keys)
  want = ", ".join(f"config.model.{k}={model[k]}" for k in keys)
  fix = " ".join(f"--config.model.{k}={ckpt[k]}" for k in keys)
  raise TransferError(f"{source}: the checkpoint is {have} ({want}); fine-tune with {fix} to use "
                      f"it, or set config.finetune.init to a checkpoint of the model's size.")


def merge_params(init_vars: dict, loaded_vars: dict, *, source: str, dont_load=(),
                 adapt_input_channels: bool = False) -> tuple[dict, TransferReport]:
  """Copies `loaded_vars` leaves into `init_vars` where the paths match.

  Paths are "collection/module/.../leaf" (e.g. "params/encoder/down_0/conv_0/conv/kernel");
  `dont_load` holds fnmatch patterns of target paths to keep fresh (e.g. "params/out/*" for a new
  head). A checkpoint of another width, depth or dimensionality is refused in one line naming
  them (`check_architecture`).
  """
  report = TransferReport(source=source)
  target = _flat({c: init_vars.get(c, {}) for c in init_vars})
  src = _flat({c: loaded_vars.get(c, {}) for c in loaded_vars})
  check_architecture(target, src, source)
  mismatched = []
  out = {}
  for path, init_leaf in sorted(target.items(), key=_params_first):
    if any(fnmatch.fnmatch(path, pat) for pat in dont_load) or path not in src:
      out[path] = init_leaf
      report.fresh.append(path)
      continue
    value = np.asarray(src[path])
    if value.shape != tuple(init_leaf.shape):
      adapted = _adapt_first_conv(value, tuple(init_leaf.shape)) if adapt_input_channels else None
      if adapted is None:
        mismatched.append(f"{path}: checkpoint {value.shape} vs model {tuple(init_leaf.shape)}")
        continue
      value = adapted
      report.adapted.append(path)
    out[path] = value.astype(init_leaf.dtype)
    report.loaded.append(path)
  if mismatched:
    hint = ("" if adapt_input_channels else
            " For more input channels than the checkpoint has, set "
            "config.finetune.adapt_input_channels=True.")
    raise TransferError(f"shape mismatch between {source} and the model for {len(mismatched)} "
                        f"array(s): " + "; ".join(mismatched[:10]) +
                        (" ..." if len(mismatched) > 10 else "") +
                        ". Add a config.finetune.dont_load pattern to re-initialise them." + hint)
  report.ignored = sorted(p for p in src if p not in target)
  if not report.loaded:
    raise TransferError(f"nothing in {source} matches the model's parameter paths "
                        f"(e.g. checkpoint has {sorted(src)[:3]}, model has {sorted(target)[:3]}); "
                        "is it a Genesis checkpoint of the same network?")
  return _unflat(out), report


def load_pretrained(init: str, *, which: str = "best",
                    step: int | None = None) -> tuple[dict, dict | None]:
  """Reads pre-trained variables {"params", "batch_stats"} and, when known, their model config.

  `init`: a pre-training workdir (or its checkpoints/ dir), a converted checkpoint dir, or a
  released .pt/.pth/.tar/.h5 file. `which`: "best" or "latest" checkpoint of a workdir; `step`
  picks a given step instead.
  """
  path = pathlib.Path(init).expanduser().absolute()  # Orbax (OCDBT) needs absolute paths.
  if not path.exists():
    raise errors.MissingPathError(
        f"pre-trained init {init!r} does not exist; give a pre-training workdir, a converted "
        "checkpoint or a released .pt/.h5 file (config.finetune.init when fine-tuning).")
  suffix = path.suffix.lower()
  if path.is_file():
    from genesis_jax.weights import release
    if suffix not in release.RELEASE_SUFFIXES:
      raise TransferError(f"{path}: not a known weights file (expected .pt/.pth/.tar or .h5).")
    variables = release.import_release(path)
    return variables, release.model_config_of(variables)
  if (path / "genesis_model.json").exists():
    from genesis_jax.weights import convert
    variables, model_cfg = convert.load_converted(path)
    return variables, model_cfg
  ckdir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  if not (ckdir / "latest").is_dir():
    raise TransferError(
        f"{path} is neither a pre-training workdir (no checkpoints/latest), a converted "
        "checkpoint (no genesis_model.json), nor a .pt/.h5 file.")
  return _restore_run_checkpoint(ckdir, path, which, step)


def checkpoint_steps(ckdir: pathlib.Path, which: str = "best",
                     step: int | None = None) -> tuple[pathlib.Path, list[int]]:
  """(folder, its saved steps) of a run's checkpoints/ dir: best/ (latest/ while best/ is empty,
  i.e. before the first evaluation) or latest/; no steps when there is no checkpoint."""
  sub = ckdir / ("best" if which == "best" and step is None else "latest")
  steps = sorted(int(p.name) for p in sub.iterdir() if p.name.isdigit()) if sub.is_dir() else []
  if which == "best" and not steps:  # No evaluation yet: fall back to the latest.
    sub = ckdir / "latest"
    steps = (sorted(int(p.name) for p in sub.iterdir() if p.name.isdigit()) if sub.is_dir()
             else [])
  return sub, steps


def _restore_run_checkpoint(ckdir: pathlib.Path, workdir: pathlib.Path, which: str,
                            step: int | None) -> tuple[dict, dict | None]:
  import orbax.checkpoint as ocp
  sub, steps = checkpoint_steps(ckdir, which, step)
  if not steps:
    raise TransferError(f"{ckdir} holds no complete checkpoint.")
  if step is not None and step not in steps:
    raise TransferError(f"{sub} has no checkpoint at step {step}; it has {steps}.")
  chosen = step if step is not None else steps[-1]
  state_dir = sub / str(chosen) / "state"
  meta = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
  wanted = {k: v for k, v in dict(tree).items() if k in ("params", "batch_stats")}
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
  ckptr = ocp.PyTreeCheckpointer()
  restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
      partial_restore=True))
  model_cfg = None
  cfg_file = workdir / "config.json"
  if cfg_file.exists():
    model_cfg = json.loads(cfg_file.read_text()).get("model")
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
  return variables, model_cfg


# ------------------------------------------------------------- nnU-Net networks (kind=nnunet)
SEG_PATTERN = "params/decoder/seg_*"  # The segmentation outputs of an nnU-Net network.


def load_nnunet_checkpoint(path: str | pathlib.Path, plan,
                           n_class: int | None = None) -> tuple[dict, dict]:
  """Variables of the plans' network from an nnU-Net checkpoint (.pth: `checkpoint_final.pth`,
  or a genesis_jax pre-training export), and what its segmentation layers are.

  The seg layers are read when they are a segmentation head of `n_class` outputs (None: the
  checkpoint's own count); otherwise, and for a genesis_jax export (whose seg layers are the
  1-channel restoration head), they are left out for the caller to re-initialise. Returns
  (variables, info): info["classes"] is the checkpoint's seg output count (None without seg
  layers), info["seg_loaded"] whether they were read, info["genesis_export"] whether the file was
  written by genesis_jax's pre-training. A checkpoint whose shapes do not fit the plans is a
  CheckpointError naming the first key that differs.
  """
  from genesis_jax.weights import nnunet, torch_pickle  # pylint: disable=import-outside-toplevel
  path = str(path)
  try:
    obj = torch_pickle.load(path)
  except torch_pickle.TorchFileError as e:
    raise errors.CheckpointError(str(e)) from e
  meta = obj.get("genesis_jax") if isinstance(obj, dict) else None
  sd = obj
  for key in ("network_weights", "state_dict"):
    if isinstance(sd, dict) and key in sd:
      sd = sd[key]
      break
  if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in sd.values()):
    raise errors.CheckpointError(f"{path}: no 'network_weights' state_dict in this checkpoint; "
                                 f"give nnU-Net's checkpoint_final.pth (or a genesis_jax export).")
  sd = nnunet.strip_prefixes(sd)
  seg = sd.get(f"decoder.seg_layers.{int(plan.arch['n_stages']) - 2}.weight")
  classes = None if seg is None else int(np.shape(seg)[0])
  genesis_export = isinstance(meta, dict) and meta.get("writer") == "genesis_jax"
  if n_class is None:
    if classes is None or genesis_export:
      what = ("a genesis_jax pre-training export has no segmentation head" if genesis_export
              else "no decoder.seg_layers in the checkpoint")
      raise errors.CheckpointError(f"{path}: {what}; give an nnU-Net checkpoint trained for "
                                   f"segmentation (checkpoint_final.pth).")
    n_class = classes
  seg_loaded = classes == n_class and not genesis_export
  params = nnunet.load_state_dict(sd, plan, n_class if seg_loaded else None, source=path,
                                  seg_layers=seg_loaded)
  return ({"params": params, "batch_stats": {}},
          {"classes": classes, "seg_loaded": seg_loaded, "genesis_export": genesis_export})
