"""The released Models Genesis weights <-> our Flax U-Net tree, without PyTorch or TensorFlow.

* PyTorch (`Genesis_Chest_CT.pt`, docs/method.md#pytorch-checkpoint): `{'state_dict': ...}` of a
  DataParallel UNet3D, so keys start with 'module.'; read and written by `torch_pickle`.
* Keras (`Genesis_Chest_CT.h5`, docs/method.md#keras-checkpoint): layers `depth_{k}_conv`
  (kernel (3,3,3,in,out), bias) and `depth_{k}_bn` (gamma, beta, moving_mean, moving_variance)
  for k = 0..4*depth+1, plus one 1x1x1 output conv whose name Keras generated (found by its kernel
  shape); read by `keras_h5`.

Layouts (docs/method.md#layout-conversion): PyTorch conv (out, in, x, y, z) -> ours
(x, y, z, in, out); PyTorch transposed conv (in, out, x, y, z) -> flax ConvTranspose layout: flip
x, y, z then (x, y, z, in, out). Our tree is the one of `unet.UNet` (see its docstring); arrays
come back as float32 numpy. Every mismatch (missing, unexpected or mis-shaped key) raises
`WeightImportError` naming the keys; nothing is left at random init.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Any, Iterator

import numpy as np

from genesis_jax import errors
from genesis_jax.weights import keras_h5, torch_pickle

TORCH_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
RELEASE_SUFFIXES = TORCH_SUFFIXES + KERAS_SUFFIXES


class WeightImportError(errors.DataError):
  """A weight file cannot be read or does not match the Genesis U-Net (names the keys and file)."""


# ---------------------------------------------------------------------------------------------
# Layout conversion of single arrays.

def _conv_to_ours(w: np.ndarray) -> np.ndarray:  # (O, I, *k) -> (*k, I, O)
  nd = w.ndim - 2
  return np.transpose(w, tuple(range(2, 2 + nd)) + (1, 0))


def _conv_to_torch(w: np.ndarray) -> np.ndarray:  # (*k, I, O) -> (O, I, *k)
  nd = w.ndim - 2
  return np.transpose(w, (nd + 1, nd) + tuple(range(nd)))


def _upconv_to_ours(w: np.ndarray) -> np.ndarray:  # (I, O, *k) -> flipped (*k, I, O)
  nd = w.ndim - 2
  w = w[(slice(None), slice(None)) + (slice(None, None, -1),) * nd]
  return np.transpose(w, tuple(range(2, 2 + nd)) + (0, 1))


def _upconv_to_torch(w: np.ndarray) -> np.ndarray:  # flipped (*k, I, O) -> (I, O, *k)
  nd = w.ndim - 2
  w = np.transpose(w, (nd, nd + 1) + tuple(range(nd)))
  return w[(slice(None), slice(None)) + (slice(None, None, -1),) * nd]


def _identity(w: np.ndarray) -> np.ndarray:
  return w


_CONV = (_conv_to_ours, _conv_to_torch)
_UPCONV = (_upconv_to_ours, _upconv_to_torch)
_SAME = (_identity, _identity)


# ---------------------------------------------------------------------------------------------
# Name maps between the released files and our parameter tree.

# One entry per original tensor: (original key, collection, path in our tree, to_ours, to_orig).
Entry = tuple[str, str, tuple[str, ...], Any, Any]

# The leaves of one conv-BN-ReLU unit: (collection, our path, PyTorch name, Keras name, PyTorch
# layouts). Keras names are '<conv|bn>/<weight>' under the layer prefix 'depth_{k}_'.
_UNIT_LEAVES = (
    ("params", ("conv", "kernel"), "conv1.weight", "conv/kernel", _CONV),
    ("params", ("conv", "bias"), "conv1.bias", "conv/bias", _SAME),
    ("params", ("bn", "scale"), "bn1.weight", "bn/gamma", _SAME),
    ("params", ("bn", "bias"), "bn1.bias", "bn/beta", _SAME),
    ("batch_stats", ("bn", "mean"), "bn1.running_mean", "bn/moving_mean", _SAME),
    ("batch_stats", ("bn", "var"), "bn1.running_var", "bn/moving_variance", _SAME),
)


# PyTorch block names: the original hard-codes the channel count of each block at width 32.
def _torch_down(i: int) -> str:
  return f"down_tr{64 * 2 ** i}"


def _torch_up(level: int) -> str:
  return f"up_tr{64 * 2 ** level}"


def _units(depth: int) -> list[tuple[str, ...]]:
  """Our paths of the conv units, in the order of the Keras layers (encoder, then decoder)."""
  units = [("encoder", f"down_{i}", f"conv_{j}") for i in range(depth + 1) for j in range(2)]
  units += [("decoder", f"up_{level}", f"conv_{j}") for level in reversed(range(depth))
            for j in range(2)]
  return units


def _torch_unit_prefixes(depth: int) -> list[str]:
  """The PyTorch names of the units of `_units(depth)`, in the same order."""
  prefixes = [f"{_torch_down(i)}.ops.{j}" for i in range(depth + 1) for j in range(2)]
  prefixes += [f"{_torch_up(level)}.ops.{j}" for level in reversed(range(depth)) for j in range(2)]
  return prefixes


def _torch_unit(prefix: str, ours: tuple[str, ...]) -> list[Entry]:
  return [(f"{prefix}.{torch_name}", col, ours + leaf, *layouts)
          for col, leaf, torch_name, _, layouts in _UNIT_LEAVES]


def _keras_unit(k: int, ours: tuple[str, ...]) -> list[Entry]:
  """Keras kernels are stored channels-last already: every leaf copies as it is."""
  return [(f"depth_{k}_{keras_name}", col, ours + leaf, *_SAME)
          for col, leaf, _, keras_name, _ in _UNIT_LEAVES]


def pytorch_key_map(depth: int = 3) -> list[Entry]:
  """Original PyTorch state_dict keys (without 'module.') and where they live in our tree."""
  entries: list[Entry] = []
  for i in range(depth + 1):
    for j in range(2):
      entries += _torch_unit(f"{_torch_down(i)}.ops.{j}", ("encoder", f"down_{i}", f"conv_{j}"))
  for level in reversed(range(depth)):
    up = _torch_up(level)
    ours = ("decoder", f"up_{level}")
    entries += [
        (f"{up}.up_conv.weight", "params", ours + ("up_conv", "kernel"), *_UPCONV),
        (f"{up}.up_conv.bias", "params", ours + ("up_conv", "bias"), *_SAME),
    ]
    for j in range(2):
      entries += _torch_unit(f"{up}.ops.{j}", ours + (f"conv_{j}",))
  entries += [
      ("out_tr.final_conv.weight", "params", ("out", "kernel"), *_CONV),
      ("out_tr.final_conv.bias", "params", ("out", "bias"), *_SAME),
  ]
  return entries


def pytorch_bn_counters(depth: int = 3) -> list[str]:
  """`num_batches_tracked` buffers: expected in the file, with no counterpart in our tree."""
  return [f"{p}.bn1.num_batches_tracked" for p in _torch_unit_prefixes(depth)]


def keras_key_map(depth: int = 3, out_layer: str = "out") -> list[Entry]:
  """Keras weights as 'layer/weight' and where they live in our tree (`out_layer`: the name of
  the final 1x1 conv, which Keras generated)."""
  entries: list[Entry] = []
  for k, ours in enumerate(_units(depth)):
    entries += _keras_unit(k, ours)
  entries += [
      (f"{out_layer}/kernel", "params", ("out", "kernel"), *_SAME),
      (f"{out_layer}/bias", "params", ("out", "bias"), *_SAME),
  ]
  return entries


# ---------------------------------------------------------------------------------------------
# Building and checking our tree.

def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      yield from _flatten(dict(v), prefix + (k,))
    else:
      yield prefix + (k,), v


def model_config_of(variables: dict) -> dict:
  """The U-Net fields (variant, width, depth, spatial_dims, in/out channels) a tree was made for."""
  enc = variables["params"]["encoder"]
  depth = len([k for k in enc if k.startswith("down_")]) - 1
  kernel = np.shape(enc["down_0"]["conv_0"]["conv"]["kernel"])
  out = np.shape(variables["params"]["out"]["kernel"])
  has_up = "up_conv" in variables["params"]["decoder"][f"up_{depth - 1}"]
  return dict(variant="pytorch" if has_up else "keras", width=int(kernel[-1]), depth=depth,
              spatial_dims=len(kernel) - 2, in_channels=int(kernel[-2]), out_channels=int(out[-1]))


def _expected_shapes(cfg: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every leaf of our UNet for `cfg`, from flax itself (nothing is computed)."""
  import jax  # Imported here: reading a checkpoint file needs only numpy.
  import jax.numpy as jnp
  from genesis_jax.models import unet
  model = unet.UNet(out_channels=cfg["out_channels"], width=cfg["width"], depth=cfg["depth"],
                    spatial_dims=cfg["spatial_dims"], variant=cfg["variant"])
  x = jax.ShapeDtypeStruct((1,) + (2 ** cfg["depth"],) * cfg["spatial_dims"]
                           + (cfg["in_channels"],), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = {}
  for col in ("params", "batch_stats"):
    for path, leaf in _flatten(shapes[col]):
      out[(col,) + path] = tuple(leaf.shape)
  return out


def _convert(source: dict[str, np.ndarray], entries: list[Entry], ignored: list[str],
             origin: str) -> dict:
  """Applies `entries` to `source`, checking names against the map and shapes against the model."""
  expected = {e[0] for e in entries} | set(ignored)
  missing = sorted(expected - set(source))
  unexpected = sorted(set(source) - expected)
  if missing or unexpected:
    raise WeightImportError(
        f"{origin}: keys do not match the Genesis U-Net. Missing: {missing or 'none'}. "
        f"Unexpected: {unexpected or 'none'}.")
  tree: dict = {"params": {}, "batch_stats": {}}
  for key, col, path, to_ours, _ in entries:
    _set(tree[col], path, np.ascontiguousarray(to_ours(np.asarray(source[key])), np.float32))
  try:
    cfg = model_config_of(tree)
    want = _expected_shapes(cfg)
  except (KeyError, IndexError, ValueError) as e:
    raise WeightImportError(f"{origin}: cannot infer the U-Net configuration: {e!r}") from e
  bad = []
  for key, col, path, _, _ in entries:
    got = _get(tree[col], path).shape
    if want.get((col,) + path) != got:
      bad.append(f"{key}: {got} vs expected {want.get((col,) + path)}")
  if bad:
    raise WeightImportError(f"{origin}: mis-shaped keys for {cfg}: {bad}")
  return tree


def _read(reader, path: str) -> Any:
  """`reader(path)`, its file-format errors raised as WeightImportError (same message)."""
  try:
    return reader(path)
  except (torch_pickle.TorchFileError, keras_h5.KerasFileError) as e:
    raise WeightImportError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# Import.

def _state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(sd, dict):
    raise WeightImportError(f"{path}: expected a dict with 'state_dict', got {type(obj).__name__}.")
  out = {}
  for k, v in sd.items():
    if not isinstance(v, np.ndarray):
      raise WeightImportError(f"{path}: state_dict entry {k!r} is not a tensor.")
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def import_pytorch(path: str | os.PathLike) -> dict:
  """Released PyTorch weights -> {'params': ..., 'batch_stats': ...} of `unet.UNet` (numpy)."""
  path = os.fspath(path)
  sd = _state_dict_of(_read(torch_pickle.load, path), path)
  depth = len([k for k in sd if re.fullmatch(r"down_tr\d+\.ops\.0\.conv1\.weight", k)]) - 1
  if depth < 1:
    raise WeightImportError(
        f"{path}: no 'down_tr*.ops.0.conv1.weight' keys; keys: {sorted(sd)[:8]}...")
  return _convert(sd, pytorch_key_map(depth), pytorch_bn_counters(depth), path)


def import_keras(path: str | os.PathLike) -> dict:
  """Released Keras weights -> {'params', 'batch_stats'} of `unet.UNet(variant="keras")`."""
  path = os.fspath(path)
  layers = _read(keras_h5.read_layers, path)
  depth_layers = [n for n in layers if re.fullmatch(r"depth_\d+_conv", n)]
  n_units = len(depth_layers)
  if n_units < 6 or (n_units - 2) % 4:
    raise WeightImportError(
        f"{path}: expected 4*depth+2 'depth_<k>_conv' layers, found {sorted(depth_layers)}.")
  depth = (n_units - 2) // 4
  others = [n for n in layers if not re.fullmatch(r"depth_\d+_(conv|bn)", n)]
  finals = [n for n in others if "kernel" in layers[n] and layers[n]["kernel"].ndim >= 3
            and all(s == 1 for s in layers[n]["kernel"].shape[:-2])]
  if len(finals) != 1:
    raise WeightImportError(f"{path}: expected one 1x1 output conv besides depth_* layers, found "
                            f"{finals or 'none'} among {others}.")
  flat = {f"{layer}/{w}": v for layer, ws in layers.items() for w, v in ws.items()}
  return _convert(flat, keras_key_map(depth, out_layer=finals[0]), [], path)


def import_release(path: str | os.PathLike) -> dict:
  """{'params', 'batch_stats'} from a .pt/.pth/.tar (PyTorch) or .h5/.hdf5 (Keras) file."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext in KERAS_SUFFIXES:
    return import_keras(path)
  if ext in TORCH_SUFFIXES:
    return import_pytorch(path)
  raise WeightImportError(f"{path}: unknown weight file extension {ext!r}; expected .pt/.pth "
                          "(PyTorch) or .h5 (Keras).")


# ---------------------------------------------------------------------------------------------
# Export (readable by torch.load, weights_only included).

def to_pytorch_state_dict(variables: dict) -> collections.OrderedDict:
  """Our {'params', 'batch_stats'} -> the original's state_dict (numpy, no 'module.' prefix)."""
  cfg = model_config_of(variables)
  if cfg["variant"] != "pytorch":
    raise WeightImportError(
        "export: only the pytorch variant (with transposed convs) has a PyTorch layout; this tree "
        "is the keras variant. Export a model trained with model.variant='pytorch'.")
  sd = collections.OrderedDict()
  counters = set(pytorch_bn_counters(cfg["depth"]))
  for key, col, path, _, to_orig in pytorch_key_map(cfg["depth"]):
    try:
      value = np.asarray(_get(variables[col], path), np.float32)
    except KeyError as e:
      raise WeightImportError(f"export: our tree lacks {col}/{'/'.join(path)} for {key}.") from e
    sd[key] = np.ascontiguousarray(to_orig(value))
    counter = key.replace("running_var", "num_batches_tracked")
    if counter in counters:
      sd[counter] = np.zeros((), np.int64)
  return sd


def export_pytorch(variables: dict, path: str | os.PathLike, legacy: bool = False) -> None:
  """Writes our U-Net as the original's checkpoint: {'state_dict': {'module.<key>': tensor}}.

  legacy=False: torch's zip format; True: the pre-1.6 stream format of the released file.
  """
  sd = to_pytorch_state_dict(variables)
  torch_pickle.save({"state_dict": collections.OrderedDict(
      ("module." + k, v) for k, v in sd.items())}, path, legacy=legacy)
