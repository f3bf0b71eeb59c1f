"""`torch.save` files read and written without PyTorch: `load(path)` and `save(obj, path)`.

Both serializations are handled: the zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw
little-endian file per storage) and the legacy stream (magic, protocol and sys-info pickles, the
object pickle, the storage keys, then each storage as an int64 element count and its raw bytes).

Pickles are read with a restricted unpickler: only tensors, storages and plain containers are
built; any other object becomes an inert placeholder and is never executed. Tensors come back as
numpy arrays. `save` writes numpy arrays (in nested dicts) as tensors that `torch.load` reads,
`weights_only=True` included.

This module knows nothing about any particular network; `release.py` maps the tensors it reads
onto the Genesis U-Net.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from genesis_jax import errors


class TorchFileError(errors.DataError):
  """A file is not a torch.save checkpoint this reader understands (names the file and why)."""


STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


# ---------------------------------------------------------------------------------------------
# Reading.

class _StorageType:
  def __init__(self, name: str):
    if name == "BFloat16Storage":
      import ml_dtypes
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    elif name in STORAGE_DTYPES:
      self.dtype = np.dtype(STORAGE_DTYPES[name])
    else:
      raise TorchFileError(f"Unsupported torch storage type {name}.")


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
      raise TorchFileError("Tensor storage was never read (truncated file?).")
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
      raise TorchFileError(f"Unsupported persistent id in torch pickle: {pid!r:.80}")
    return self._load_storage(*pid[1:])


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise TorchFileError(f"{path}: zip file without <archive>/data.pkl; not a torch checkpoint.")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
      raise TorchFileError(f"{path}: big-endian torch checkpoints are not supported.")
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
      raise TorchFileError(f"{path}: unexpected storage in a torch header pickle.")
    return _TorchUnpickler(f, no_storage).load()

  try:
    magic = plain_load()
  except Exception as e:
    raise TorchFileError(f"{path}: neither a zip nor a legacy torch checkpoint ({e}).") from e
  if magic != _LEGACY_MAGIC:
    raise TorchFileError(f"{path}: not a torch checkpoint (bad magic number).")
  protocol = plain_load()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchFileError(f"{path}: unsupported torch legacy protocol {protocol}.")
  sys_info = plain_load()
  if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
    raise TorchFileError(f"{path}: big-endian torch checkpoints are not supported.")
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
      raise TorchFileError(f"{path}: truncated storage {key} ({len(buf)} of {nbytes} bytes).")
    s.data = np.frombuffer(buf, dtype=s.dtype)
  for view, key, offset in views:
    view.data = storages[key].data[offset:offset + view.numel]
  return _materialize(obj)


def load(path: str | os.PathLike) -> Any:
  """The object in a torch.save file (either serialization), tensors as numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchFileError(f"{path}: no such file.")
  return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)


# ---------------------------------------------------------------------------------------------
# Writing.

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
  for name, dt in STORAGE_DTYPES.items():
    if np.dtype(dt) == dtype:
      return name
  raise TorchFileError(f"No torch storage for dtype {dtype}; cast the array to one of "
                       f"{sorted(np.dtype(d).name for d in STORAGE_DTYPES.values())}.")


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


def save(obj: dict, path: str | os.PathLike, legacy: bool = False) -> None:
  """torch.save of a dict whose numpy-array values (in nested dicts too) become tensors.

  legacy=False: torch's zip format; True: the pre-1.6 stream format.
  """
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
  partial = path + ".partial"  # Renamed into place once complete: no half-written `path`.
  try:
    if legacy:
      _write_legacy(partial, payload, arrays)
    else:
      _write_zip(partial, os.path.splitext(os.path.basename(path))[0] or "archive", payload,
                 arrays)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _write_legacy(path: str, payload: bytes, arrays: dict[str, np.ndarray]) -> None:
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


def _write_zip(path: str, archive: str, payload: bytes, arrays: dict[str, np.ndarray]) -> None:
  with zipfile.ZipFile(path, "w") as zf:
    _zip_entry(zf, f"{archive}/data.pkl", payload)
    _zip_entry(zf, f"{archive}/byteorder", b"little")
    for k, v in arrays.items():
      _zip_entry(zf, f"{archive}/data/{k}", v.astype(v.dtype.newbyteorder("<")).tobytes())
    _zip_entry(zf, f"{archive}/version", b"3\n")
