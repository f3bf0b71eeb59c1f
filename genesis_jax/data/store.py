"""Files that are complete or absent: the project's one atomic writer, and cube arrays on disk.

Every file the data layer (and `mode=predict`) writes goes through `atomic_write`: the bytes go to
a temporary file in the same folder (`.<name>.tmp-<pid>`), are flushed and fsynced, and the file
is renamed into place with `os.replace` (atomic on POSIX). A reader, or a re-run after a kill,
sees the old file or the complete new one, never a partial one; a killed writer leaves at most a
temp file, which `remove_temp_files` clears.

Cube arrays are plain .npy files, read back memory-mapped (`open_cubes`), so reading a cube
touches only its own pages on disk.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, BinaryIO, Callable

import numpy as np

TEMP_GLOB = ".*.tmp-*"  # The names `atomic_write` gives its temporary files.


def temp_path(path: pathlib.Path) -> pathlib.Path:
  """The temporary name `atomic_write` uses for `path` in this process."""
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any]) -> None:
  """Writes `path` via `write_fn(file)` on a temp file in the same folder, fsync, rename.

  The file gets the permissions a plain `open()` would give (0666 less the umask).
  """
  path = pathlib.Path(path)
  tmp = temp_path(path)
  try:
    with open(tmp, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Atomically writes `data` to `path`."""
  atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON with sorted keys (stable bytes for equal objects)."""
  write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """Atomically writes `array` as a .npy file (no pickles)."""
  atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def remove_temp_files(*folders: str | os.PathLike) -> None:
  """Deletes the temp files a killed `atomic_write` left in `folders` (one writer per folder)."""
  for folder in folders:
    for stale in pathlib.Path(folder).glob(TEMP_GLOB):
      stale.unlink()


def open_cubes(path: str | os.PathLike) -> np.ndarray:
  """A .npy cube array, memory-mapped read-only."""
  return np.load(path, mmap_mode="r", allow_pickle=False)


def npy_shape(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) from a .npy header, checking the file holds all the data it announces (a
  truncated copy would otherwise fail only when a late cube is read)."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    data_start = f.tell()
  expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if fortran or dtype.hasobject:
    raise ValueError("not a C-ordered numeric array")
  if os.path.getsize(path) != expected:
    raise ValueError(f"file size {os.path.getsize(path)} bytes, the header needs {expected}")
  return tuple(shape), dtype
