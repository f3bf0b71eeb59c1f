"""nnU-Net checkpoints without torch: our nnU-Net networks' params <-> PyTorch state_dicts.

`export_state_dict(params, plan)` gives the exact state_dict (keys, order, shapes) of the same
network in dynamic_network_architectures, as nnU-Net builds it from the plans; `load_state_dict`
is the inverse. `write_nnunet_checkpoint` writes it as a `.pth` that
`nnUNetv2_train DATASET CONFIG FOLD -pretrained_weights FILE` accepts, and
`import_nnunet_checkpoint` reads nnU-Net's own `checkpoint_final.pth` (or such a file) back.

What nnU-Net's loader (nnunetv2/run/load_pretrained_weights.py) does with the file: it reads
`torch.load(FILE)['network_weights']`; for every key of its own network except those containing
'.seg_layers.' it asserts the key is there with the same shape, then copies all matching keys but
the seg layers. So the file must hold every key of the network (the state_dict lists modules under
all their names: a ConvDropoutNormReLU's conv and norm again as `all_modules.{i}`, and the whole
encoder again under `decoder.encoder.`), without the 'module.' (DDP) or '_orig_mod.'
(torch.compile) prefixes; the seg layers (our output head) are written too but never loaded, so
nnU-Net keeps its freshly initialised segmentation outputs. Reading, we strip those prefixes.

Layouts. Our kernels are (*k in our axes, C_in, C_out); PyTorch's conv weights are
(C_out, C_in, *k in the plans' axes) and transposed-conv weights (C_in, C_out, *k). Our axis j is
the plans' axis `plan.axes[j]` (config/nnunet_plans.py), i.e. torch dim 2 + axes[j]: for the usual
transpose_forward [0, 1, 2], (kx, ky, kz, in, out) <-> (out, in, kz, ky, kx). Biases and norm
weights (our `scale`) are vectors in both.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from genesis_jax import errors
from genesis_jax.models import nnunet as nnunet_models
from genesis_jax.weights import torch_pickle

# Substring of the keys nnU-Net's loader never copies (the segmentation output layers).
SEG_LAYERS = ".seg_layers."
PREFIXES = ("module.", "_orig_mod.")


def conv_unit(prefix: str, path: tuple, bias: bool, norm_index: int = 1) -> list:
  """Entries (torch key, flax path, kind) of one ConvDropoutNormReLU, in state_dict order."""
  conv = [("weight", path + ("conv", "kernel"), "conv")]
  if bias:
    conv.append(("bias", path + ("conv", "bias"), "vec"))
  norm = [("weight", path + ("norm", "scale"), "vec"), ("bias", path + ("norm", "bias"), "vec")]
  return ([(f"{prefix}.conv.{n}", p, k) for n, p, k in conv]
          + [(f"{prefix}.norm.{n}", p, k) for n, p, k in norm]
          + [(f"{prefix}.all_modules.0.{n}", p, k) for n, p, k in conv]
          + [(f"{prefix}.all_modules.{norm_index}.{n}", p, k) for n, p, k in norm])


def torch_layout(plan) -> list[tuple[str, tuple, str]]:
  """Every state_dict entry of the plan's network in PyTorch's order: (key, flax path, kind), kind
  "conv", "convT" or "vec". A flax path may appear under several keys (aliases)."""
  a = plan.arch
  n = a["n_stages"]
  bias = a["conv_bias"]
  enc: list = []
  if plan.network == "PlainConvUNet":
    norm_index = 2 if a["nonlin_first"] else 1
    for s in range(n):
      for j in range(a["n_conv_per_stage"][s]):
        enc += conv_unit(f"encoder.stages.{s}.0.convs.{j}", ("encoder", f"stage_{s}", f"conv_{j}"),
                         bias, norm_index)
  else:
    norm_index = 1
    enc += conv_unit("encoder.stem.convs.0", ("encoder", "stem", "conv_0"), bias)
    channels = a["stem_channels"]
    for s in range(n):
      for b in range(a["n_blocks_per_stage"][s]):
        prefix, path = f"encoder.stages.{s}.blocks.{b}", ("encoder", f"stage_{s}", f"block_{b}")
        enc += conv_unit(f"{prefix}.conv1", path + ("conv1",), bias)
        enc += conv_unit(f"{prefix}.conv2", path + ("conv2",), bias)
        if channels != a["features_per_stage"][s]:
          strided = b == 0 and any(x != 1 for x in a["strides"][s])
          enc += conv_unit(f"{prefix}.skip.{1 if strided else 0}", path + ("skip",), False)
        channels = a["features_per_stage"][s]
  dec = []
  for d in range(n - 1):
    for j in range(a["n_conv_per_stage_decoder"][d]):
      dec += conv_unit(f"decoder.stages.{d}.convs.{j}", ("decoder", f"stage_{d}", f"conv_{j}"),
                       bias, norm_index)
  for d in range(n - 1):
    dec.append((f"decoder.transpconvs.{d}.weight", ("decoder", f"transpconv_{d}", "kernel"),
                "convT"))
    if bias:
      dec.append((f"decoder.transpconvs.{d}.bias", ("decoder", f"transpconv_{d}", "bias"), "vec"))
  for d in range(n - 1):
    dec.append((f"decoder.seg_layers.{d}.weight", ("decoder", f"seg_{d}", "kernel"), "conv"))
    dec.append((f"decoder.seg_layers.{d}.bias", ("decoder", f"seg_{d}", "bias"), "vec"))
  return enc + [("decoder." + k, p, kind) for k, p, kind in enc] + dec


def to_torch_perm(kind: str, ndim: int, plan) -> tuple[int, ...] | None:
  """Axes that np.transpose takes to turn our array into PyTorch's (None for vectors)."""
  if kind == "vec":
    return None
  nd = ndim - 2
  # ours -> torch's: torch dim 2 + axes[j] holds our axis j.
  ours_of_torch = [0] * nd
  for j, i in enumerate(plan.axes):
    ours_of_torch[i] = j
  head = (nd + 1, nd) if kind == "conv" else (nd, nd + 1)
  return head + tuple(ours_of_torch)


def unwrap(params: Any) -> dict:
  return params["params"] if isinstance(params, dict) and "params" in params else params


def get_path(tree: dict, path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def export_state_dict(params: Any, plan) -> dict[str, np.ndarray]:
  """The PyTorch state_dict ({key: float32 array}, PyTorch's key order) of our network's params
  (`build(plan, ...)`'s params, or variables with a 'params' entry)."""
  tree = unwrap(params)
  out = {}
  for key, path, kind in torch_layout(plan):
    try:
      value = np.asarray(get_path(tree, path), dtype=np.float32)
    except KeyError as e:
      raise errors.CheckpointError(
          f"params lack {'/'.join(path)} (for {key}): not the {plan.network} of "
          f"{plan.path} [{plan.configuration}].") from e
    perm = to_torch_perm(kind, value.ndim, plan)
    out[key] = np.array(value if perm is None else value.transpose(perm), order="C")
  return out


def expected_params(plan, num_classes: int) -> dict:
  """Shapes (jax.ShapeDtypeStruct) of our params for the plan's network."""
  model = nnunet_models.build(plan, num_classes)
  x = jax.ShapeDtypeStruct((1,) + tuple(plan.patch_size) + (plan.n_input_channels,), np.float32)
  return unwrap(jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), x))


def strip_prefixes(state_dict: dict) -> dict:
  out = {}
  for k, v in state_dict.items():
    for p in PREFIXES:
      while k.startswith(p):
        k = k[len(p):]
    out[k] = v
  return out


def load_state_dict(state_dict: dict, plan, num_classes: int | None = None,
                    source: str = "state_dict", seg_layers: bool = True) -> dict:
  """Our params from a PyTorch state_dict of the plan's network (keys with or without 'module.' /
  '_orig_mod.'). num_classes None: the checkpoint's seg layers decide. seg_layers False: as
  nnU-Net's loader, the seg layers are neither read nor required and the params lack
  decoder/seg_* (for a network with other classes: merge into its init).

  Raises CheckpointError naming the first missing key, the first key whose shape does not match
  the plans, or keys the plans' network does not have.
  """
  sd = strip_prefixes(state_dict)
  layout = torch_layout(plan)
  if not seg_layers:
    layout = [e for e in layout if SEG_LAYERS not in "." + e[0]]
    sd = {k: v for k, v in sd.items() if SEG_LAYERS not in "." + k}
    num_classes = num_classes or 1
  if num_classes is None:
    seg = sd.get(f"decoder.seg_layers.{plan.arch['n_stages'] - 2}.weight")
    if seg is None:
      raise errors.CheckpointError(f"{source}: no decoder.seg_layers in the checkpoint; pass "
                                   f"num_classes.")
    num_classes = int(np.shape(seg)[0])
  shapes = expected_params(plan, num_classes)
  by_path: dict[tuple, list[str]] = {}
  for key, path, kind in layout:
    by_path.setdefault(path, []).append(key)
  params: dict = {}
  for key, path, kind in layout:
    if by_path[path][0] != key:
      continue  # An alias: its value was read under the first key present.
    present = [k for k in by_path[path] if k in sd]
    if not present:
      raise errors.CheckpointError(
          f"{source}: key {key} is missing: the checkpoint is not the {plan.network} of "
          f"{plan.path} [{plan.configuration}].")
    value = np.asarray(sd[present[0]])
    want = get_path(shapes, path).shape
    perm = to_torch_perm(kind, len(want), plan)
    want_torch = want if perm is None else tuple(want[i] for i in perm)
    if tuple(value.shape) != tuple(want_torch):
      raise errors.CheckpointError(
          f"{source}: {present[0]} has shape {tuple(value.shape)}, but the network of "
          f"{plan.path} [{plan.configuration}] (with {plan.n_input_channels} input channels, "
          f"{num_classes} classes) needs {tuple(want_torch)}; the checkpoint was trained with "
          f"other plans.")
    value = value.astype(np.float32)
    if perm is not None:
      value = value.transpose(np.argsort(perm))
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  extra = sorted(set(sd) - {k for k, _, _ in layout})
  if extra:
    raise errors.CheckpointError(
        f"{source}: {len(extra)} key(s) the network of {plan.path} [{plan.configuration}] does "
        f"not have, first {extra[0]}: the checkpoint was trained with other plans.")
  return params


def write_nnunet_checkpoint(path: str | os.PathLike, params: Any, plan,
                            extra: dict | None = None) -> None:
  """Writes `{'network_weights': state_dict}` (plus `extra` plain entries) as a .pth for
  `nnUNetv2_train ... -pretrained_weights FILE`, without torch (atomic: renamed into place)."""
  sd = export_state_dict(params, plan)
  meta = {"plans": os.path.abspath(plan.path), "configuration": plan.configuration,
          "network_class_name": plan.network_class_name, "writer": "genesis_jax"}
  torch_pickle.save({"network_weights": sd, "genesis_jax": {**meta, **(extra or {})}},
                    os.fspath(path))


def import_nnunet_checkpoint(path: str | os.PathLike, plan, num_classes: int | None = None,
                             seg_layers: bool = True) -> dict:
  """Our params from an nnU-Net checkpoint (`checkpoint_final.pth`: its 'network_weights'; a
  bare state_dict or {'state_dict': ...} also works). num_classes None: the checkpoint's;
  seg_layers as `load_state_dict`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingPathError(f"nnU-Net checkpoint {path} does not exist.")
  try:
    obj = torch_pickle.load(path)
  except torch_pickle.TorchFileError as e:
    raise errors.CheckpointError(str(e)) from e
  if isinstance(obj, dict) and "network_weights" in obj:
    obj = obj["network_weights"]
  elif isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise errors.CheckpointError(f"{path}: no 'network_weights' state_dict in this checkpoint.")
  return load_state_dict(obj, plan, num_classes, source=path, seg_layers=seg_layers)
