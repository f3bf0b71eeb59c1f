"""Import and export of the released Models Genesis weights, without PyTorch or TensorFlow.

* PyTorch (`Genesis_Chest_CT.pt`): `torch.save({'state_dict': model.state_dict(), ...})` of a
  DataParallel UNet3D, so keys start with 'module.'. Both serializations are read: the zip
  archive (torch >= 1.6: `<name>/data.pkl` + one raw little-endian file per storage) and the
  legacy stream (magic, protocol and sys-info pickles, the object pickle, the storage keys, then
  each storage as int64 element count + raw bytes). Pickles are read with a restricted unpickler:
  only tensors, storages and plain containers are built; any other object becomes an inert
  placeholder and is never executed.
* Keras (`Genesis_Chest_CT.h5`): h5py groups `depth_{k}_conv` (kernel (3,3,3,in,out), bias) and
  `depth_{k}_bn` (gamma, beta, moving_mean, moving_variance) for k = 0..4*depth+1, plus one 1x1x1
  output conv whose name Keras generated (found by its kernel shape).

Layouts (SPEC.md): PyTorch conv (out, in, x, y, z) -> ours (x, y, z, in, out); PyTorch transposed
conv (in, out, x, y, z) -> flax ConvTranspose layout: flip x, y, z then (x, y, z, in, out).
Our tree is the one of `unet.UNet` (see its docstring); arrays come back as float32 numpy.
Every mismatch (missing, unexpected or mis-shaped key) raises `WeightImportError` naming the keys;
nothing is left at random init.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Iterator

import numpy as np


class WeightImportError(ValueError):
  """A checkpoint does not match the Genesis U-Net (names the offending keys and the file)."""


# ---------------------------------------------------------------------------------------------
# Key mapping between the original layouts and our parameter tree.

# PyTorch block names: the original hard-codes the channel count of each block at width 32.
def _torch_down(i: int) -> str:
  return f"down_tr{64 * 2 ** i}"


def _torch_up(level: int) -> str:
  return f"up_tr{64 * 2 ** level}"


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


# One entry per original tensor: (original key, collection, path in our tree, to_ours, to_orig).
_Entry = tuple[str, str, tuple[str, ...], Any, Any]


def _unit_entries_torch(prefix: str, ours: tuple[str, ...]) -> list[_Entry]:
  return [
      (f"{prefix}.conv1.weight", "params", ours + ("conv", "kernel"), _conv_to_ours, _conv_to_torch),
      (f"{prefix}.conv1.bias", "params", ours + ("conv", "bias"), _identity, _identity),
      (f"{prefix}.bn1.weight", "params", ours + ("bn", "scale"), _identity, _identity),
      (f"{prefix}.bn1.bias", "params", ours + ("bn", "bias"), _identity, _identity),
      (f"{prefix}.bn1.running_mean", "batch_stats", ours + ("bn", "mean"), _identity, _identity),
      (f"{prefix}.bn1.running_var", "batch_stats", ours + ("bn", "var"), _identity, _identity),
  ]


def pytorch_key_map(depth: int = 3) -> list[_Entry]:
  """Original PyTorch state_dict keys (without 'module.') and where they live in our tree."""
  entries: list[_Entry] = []
  for i in range(depth + 1):
    for j in range(2):
      entries += _unit_entries_torch(f"{_torch_down(i)}.ops.{j}",
                                     ("encoder", f"down_{i}", f"conv_{j}"))
  for level in reversed(range(depth)):
    up = _torch_up(level)
    ours = ("decoder", f"up_{level}")
    entries += [
        (f"{up}.up_conv.weight", "params", ours + ("up_conv", "kernel"), _upconv_to_ours,
         _upconv_to_torch),
        (f"{up}.up_conv.bias", "params", ours + ("up_conv", "bias"), _identity, _identity),
    ]
    for j in range(2):
      entries += _unit_entries_torch(f"{up}.ops.{j}", ours + (f"conv_{j}",))
  entries += [
      ("out_tr.final_conv.weight", "params", ("out", "kernel"), _conv_to_ours, _conv_to_torch),
      ("out_tr.final_conv.bias", "params", ("out", "bias"), _identity, _identity),
  ]
  return entries


def _pytorch_bn_counters(depth: int) -> list[str]:
  """`num_batches_tracked` buffers: expected in the file, with no counterpart in our tree."""
  keys = [f"{_torch_down(i)}.ops.{j}.bn1.num_batches_tracked"
          for i in range(depth + 1) for j in range(2)]
  keys += [f"{_torch_up(level)}.ops.{j}.bn1.num_batches_tracked"
           for level in reversed(range(depth)) for j in range(2)]
  return keys


def keras_key_map(depth: int = 3, out_layer: str = "out") -> list[_Entry]:
  """Keras weights as 'layer/weight' and where they live in our tree (`out_layer`: the name of
  the final 1x1 conv, which Keras generated)."""
  units = [("encoder", f"down_{i}", f"conv_{j}") for i in range(depth + 1) for j in range(2)]
  units += [("decoder", f"up_{level}", f"conv_{j}") for level in reversed(range(depth))
            for j in range(2)]
  entries: list[_Entry] = []
  for k, ours in enumerate(units):
    entries += [
        (f"depth_{k}_conv/kernel", "params", ours + ("conv", "kernel"), _identity, _identity),
        (f"depth_{k}_conv/bias", "params", ours + ("conv", "bias"), _identity, _identity),
        (f"depth_{k}_bn/gamma", "params", ours + ("bn", "scale"), _identity, _identity),
        (f"depth_{k}_bn/beta", "params", ours + ("bn", "bias"), _identity, _identity),
        (f"depth_{k}_bn/moving_mean", "batch_stats", ours + ("bn", "mean"), _identity, _identity),
        (f"depth_{k}_bn/moving_variance", "batch_stats", ours + ("bn", "var"), _identity,
         _identity),
    ]
  entries += [
      (f"{out_layer}/kernel", "params", ("out", "kernel"), _identity, _identity),
      (f"{out_layer}/bias", "params", ("out", "bias"), _identity, _identity),
  ]
  return entries


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


def _convert(source: dict[str, np.ndarray], entries: list[_Entry], ignored: list[str],
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


# ---------------------------------------------------------------------------------------------
# PyTorch files, read without torch.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _StorageType:
  def __init__(self, name: str):
    if name == "BFloat16Storage":
      import ml_dtypes
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    elif name in _STORAGE_DTYPES:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])
    else:
      raise WeightImportError(f"Unsupported torch storage type {name}.")


class _Storage:
  """A storage whose bytes may arrive after the object pickle (legacy format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, numel, None


class _LazyTensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise WeightImportError("Tensor storage was never read (truncated file?).")
    if not self.size:
      return np.array(flat[self.offset])
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


class _Opaque:
  """Stand-in for any object in a checkpoint that is not a tensor (args, optimizer classes...)."""

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return _Opaque()


_SAFE_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "bool", "str",
                  "bytes", "bytearray", "complex", "slice", "range"}


class _TorchUnpickler(pickle.Unpickler):
  def __init__(self, f, load_storage):
    super().__init__(f)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
      return getattr(__import__("builtins"), name)
    return type(name, (_Opaque,), {})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise WeightImportError(f"Unsupported persistent id in torch pickle: {pid!r:.80}")
    return self._load_storage(*pid[1:])


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items()) \
        if isinstance(obj, collections.OrderedDict) else {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise WeightImportError(f"{path}: zip file without <archive>/data.pkl; not a torch checkpoint.")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
      raise WeightImportError(f"{path}: big-endian torch checkpoints are not supported.")
    storages: dict[str, _Storage] = {}

    def load_storage(stype, key, location, numel, *unused):
      if key not in storages:
        s = _Storage(stype.dtype, numel)
        s.data = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=stype.dtype)
        storages[key] = s
      return storages[key]

    obj = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
  return _materialize(obj)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as fh:
    f = io.BytesIO(fh.read())
  def plain_load():  # Even the header pickles go through the restricted unpickler.
    def no_storage(*pid):
      raise WeightImportError(f"{path}: unexpected storage in a torch header pickle.")
    return _TorchUnpickler(f, no_storage).load()

  try:
    magic = plain_load()
  except Exception as e:
    raise WeightImportError(f"{path}: neither a zip nor a legacy torch checkpoint ({e}).") from e
  if magic != _LEGACY_MAGIC:
    raise WeightImportError(f"{path}: not a torch checkpoint (bad magic number).")
  protocol = plain_load()
  if protocol != _LEGACY_PROTOCOL:
    raise WeightImportError(f"{path}: unsupported torch legacy protocol {protocol}.")
  sys_info = plain_load()
  if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
    raise WeightImportError(f"{path}: big-endian torch checkpoints are not supported.")
  storages: dict[str, _Storage] = {}
  views: list[tuple[_Storage, str, int]] = []

  def load_storage(stype, key, location, numel, view_metadata=None):
    if key not in storages:
      storages[key] = _Storage(stype.dtype, numel)
    if view_metadata is None:
      return storages[key]
    view_key, offset, view_size = view_metadata
    view = _Storage(stype.dtype, view_size)
    views.append((view, key, offset))
    return view

  obj = _TorchUnpickler(f, load_storage).load()
  keys = plain_load()
  for key in keys:
    s = storages[key]
    (numel,) = struct.unpack("<q", f.read(8))
    nbytes = numel * s.dtype.itemsize
    buf = f.read(nbytes)
    if len(buf) != nbytes:
      raise WeightImportError(f"{path}: truncated storage {key} ({len(buf)} of {nbytes} bytes).")
    s.data = np.frombuffer(buf, dtype=s.dtype)
  for view, key, offset in views:
    view.data = storages[key].data[offset:offset + view.numel]
  return _materialize(obj)


def load_torch_file(path: str | os.PathLike) -> Any:
  """The object in a torch.save file (either serialization), tensors as numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightImportError(f"{path}: no such file.")
  return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)


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
  sd = _state_dict_of(load_torch_file(path), path)
  depth = len([k for k in sd if re.fullmatch(r"down_tr\d+\.ops\.0\.conv1\.weight", k)]) - 1
  if depth < 1:
    raise WeightImportError(f"{path}: no 'down_tr*.ops.0.conv1.weight' keys; keys: {sorted(sd)[:8]}...")
  return _convert(sd, pytorch_key_map(depth), _pytorch_bn_counters(depth), path)


# ---------------------------------------------------------------------------------------------
# PyTorch files, written without torch (readable by torch.load, weights_only included).

class _Global:
  """A reference to `module.name` that is pickled as such without importing the module."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle requires reduce functions to be callable.
    raise TypeError("placeholder")


class _TensorRef:
  def __init__(self, key: str, array: np.ndarray, legacy: bool):
    self.key, self.array, self.legacy = key, array, legacy

  def __reduce__(self):
    stride = tuple(s // self.array.itemsize for s in self.array.strides)
    storage = ("storage", _Global("torch", _storage_name(self.array.dtype)), self.key, "cpu",
               self.array.size) + ((None,) if self.legacy else ())  # legacy: view_metadata
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (_PersistentStorage(storage), 0, self.array.shape, stride, False,
             collections.OrderedDict()))


class _PersistentStorage:
  def __init__(self, pid):
    self.pid = pid


def _storage_name(dtype: np.dtype) -> str:
  for name, dt in _STORAGE_DTYPES.items():
    if np.dtype(dt) == dtype:
      return name
  raise ValueError(f"No torch storage for dtype {dtype}.")


class _TorchPickler(pickle._Pickler):  # The Python pickler: it lets us emit GLOBAL by hand.
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global_ref(self, obj: _Global):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global_ref

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, _PersistentStorage) else None


def _dumps(obj: Any) -> bytes:
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _zip_entry(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Stored (uncompressed) entry whose data starts on a 64-byte boundary, as torch writes them."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode())
  pad = (-(zf.fp.tell() + header + 4)) % 64
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(info, data)


def to_pytorch_state_dict(variables: dict) -> collections.OrderedDict:
  """Our {'params', 'batch_stats'} -> the original's state_dict (numpy, no 'module.' prefix)."""
  cfg = model_config_of(variables)
  if cfg["variant"] != "pytorch":
    raise ValueError("Only the pytorch variant (with transposed convs) has a PyTorch layout.")
  sd = collections.OrderedDict()
  counters = set(_pytorch_bn_counters(cfg["depth"]))
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
  write_torch_checkpoint({"state_dict": collections.OrderedDict(
      ("module." + k, v) for k, v in sd.items())}, path, legacy=legacy)


def write_torch_checkpoint(obj: dict, path: str | os.PathLike, legacy: bool = False) -> None:
  """torch.save of a dict whose numpy-array values (in nested dicts too) become tensors."""
  arrays = collections.OrderedDict()

  def refs(d):
    out = collections.OrderedDict()
    for k, v in d.items():
      if isinstance(v, dict):
        out[k] = refs(v)
      elif isinstance(v, np.ndarray):
        key = str(len(arrays))
        arrays[key] = np.ascontiguousarray(v)
        out[k] = _TensorRef(key, arrays[key], legacy)
      else:
        out[k] = v
    return out

  payload = _dumps(dict(refs(obj)))
  path = os.fspath(path)
  if legacy:
    with open(path, "wb") as f:
      f.write(pickle.dumps(_LEGACY_MAGIC, protocol=2))
      f.write(pickle.dumps(_LEGACY_PROTOCOL, protocol=2))
      f.write(pickle.dumps(dict(protocol_version=_LEGACY_PROTOCOL, little_endian=True,
                                type_sizes=dict(short=2, int=4, long=4)), protocol=2))
      f.write(payload)
      f.write(pickle.dumps(list(arrays), protocol=2))
      for v in arrays.values():
        f.write(struct.pack("<q", v.size))
        f.write(v.astype(v.dtype.newbyteorder("<")).tobytes())
    return
  archive = os.path.splitext(os.path.basename(path))[0] or "archive"
  with zipfile.ZipFile(path, "w") as zf:
    _zip_entry(zf, f"{archive}/data.pkl", payload)
    _zip_entry(zf, f"{archive}/byteorder", b"little")
    for k, v in arrays.items():
      _zip_entry(zf, f"{archive}/data/{k}", v.astype(v.dtype.newbyteorder("<")).tobytes())
    _zip_entry(zf, f"{archive}/version", b"3\n")


# ---------------------------------------------------------------------------------------------
# Keras .h5 files.

def _read_keras_layers(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{layer name: {weight name ('kernel', 'gamma', ...): array}} from a Keras 2 .h5 file,
  whether saved with model.save (group 'model_weights') or model.save_weights."""
  import h5py
  layers: dict[str, dict[str, np.ndarray]] = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in root.attrs.get("layer_names", list(root.keys()))]
    for name in names:
      if name not in root:
        continue
      group = root[name]
      weights: dict[str, np.ndarray] = {}
      weight_names = group.attrs.get("weight_names", None)
      if weight_names is not None:
        for wn in weight_names:
          wn = wn.decode() if isinstance(wn, bytes) else str(wn)
          weights[wn.split("/")[-1].split(":")[0]] = np.asarray(group[wn])
      else:
        def visit(n, obj, weights=weights):
          if isinstance(obj, h5py.Dataset):
            weights[n.split("/")[-1].split(":")[0]] = np.asarray(obj)
        group.visititems(visit)
      if weights:
        layers[name] = weights
  return layers


def import_keras(path: str | os.PathLike) -> dict:
  """Released Keras weights -> {'params': ..., 'batch_stats': ...} of `unet.UNet(variant="keras")`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightImportError(f"{path}: no such file.")
  try:
    layers = _read_keras_layers(path)
  except OSError as e:
    raise WeightImportError(f"{path}: not an HDF5 file ({e}).") from e
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
  entries = keras_key_map(depth, out_layer=finals[0])
  tree = _convert(flat, entries, [], path)
  return tree
