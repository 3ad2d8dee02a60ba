"""Atomic Orbax checkpoints of fitted models, with a version check and clear errors.

A checkpoint is a directory::

    <path>/
      glad_checkpoint.json   # format version, library version, caller metadata (config, ...), array
                             # manifest and, for `save_state`, the structure of the state pytree
      arrays/                # Orbax StandardCheckpointer tree of NumPy arrays (host memory)

`save_state` / `load_state` store any state pytree generically: `flax.struct.dataclass` nodes (by
class, restricted to glad_jax's own classes), dicts, lists/tuples and None are described in the JSON
header, every array leaf goes to Orbax, and static (non-pytree) fields such as a frozen config are
JSON-encoded. A field added to a state class later is saved and restored with no change here.

Atomicity: everything is written into a hidden sibling directory ``.<name>.tmp-<random>`` and only a complete
directory is renamed into place (``os.replace`` of a directory is atomic on POSIX). A crash mid-save leaves at most
the hidden temporary directory, never a ``<path>`` that restores as a model. Replacing an existing checkpoint first
moves the old one aside, then renames the new one in, then deletes the old one.

Arrays are saved and restored as host NumPy arrays, so a checkpoint written on 8 devices restores on 1 (or a GPU):
placement is decided by the caller after loading.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np

# Bumped whenever the layout of the saved arrays changes in a way old readers cannot understand.
# 2: the whole fitted state as one generic pytree (`save_state`); version 1 held per-layer entries.
FORMAT_VERSION = 2
_META_FILE = "glad_checkpoint.json"
_ARRAYS_DIR = "arrays"


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, corrupt or from an incompatible version."""


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree_util.tree_map(np.asarray, tree)


def _this_process_only() -> dict[str, Any]:
  """Orbax options that let this process save or restore alone.

  In a multi-process run (`glad_jax.distributed`) one process writes the checkpoint of the
  (replicated) model; Orbax otherwise expects every process at its save barriers and fails.
  The arrays are host NumPy copies, so no other process holds a part of them.
  """
  if jax.process_count() == 1:
    return {}
  import orbax.checkpoint as ocp

  me = jax.process_index()
  return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me})}


def _manifest(tree: Mapping[str, Any]) -> dict[str, list]:
  """Flat {path: [shape, dtype]} listing, used to detect truncated or tampered array stores."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): [list(np.shape(v)), str(np.asarray(v).dtype)] for p, v in flat}


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, Any],
                    *, overwrite: bool = True, _extra_header: Mapping[str, Any] | None = None
                    ) -> pathlib.Path:
  """Atomically writes `arrays` (a nested dict of arrays) and JSON-able `metadata` to directory `path`.

  Args:
    path: destination directory.
    arrays: nested dict of arrays (NumPy or JAX); the leaves are copied to host memory.
    metadata: JSON-serialisable dict (config, library version, ...); stored under "metadata".
    overwrite: replace an existing checkpoint at `path`; if False an existing path raises FileExistsError.

  Returns:
    The absolute path written.
  """
  # Imported here so that importing glad_jax does not pay Orbax's start-up cost.
  import orbax.checkpoint as ocp

  from glad_jax import __version__

  dest = pathlib.Path(path).expanduser().absolute()
  if dest.exists() and not overwrite:
    raise FileExistsError(f"checkpoint {dest} already exists (pass overwrite=True to replace it)")
  if dest.exists() and not dest.is_dir():
    raise CheckpointError(f"cannot write a checkpoint to {dest}: it exists and is not a directory")
  dest.parent.mkdir(parents=True, exist_ok=True)
  host_arrays = _to_numpy_tree(dict(arrays))
  header = {
      "format_version": FORMAT_VERSION,
      "library": "glad_jax",
      "library_version": __version__,
      "manifest": _manifest(host_arrays),
      "metadata": dict(metadata),
      **dict(_extra_header or {}),
  }
  try:
    header_text = json.dumps(header, indent=2, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None

  tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
  try:
    if jax.tree_util.tree_leaves(host_arrays):
      with ocp.StandardCheckpointer(**_this_process_only()) as ckptr:
        ckptr.save(tmp / _ARRAYS_DIR, host_arrays)
        ckptr.wait_until_finished()
    else:  # Orbax refuses an empty tree; a state without arrays keeps an empty array directory
      (tmp / _ARRAYS_DIR).mkdir(parents=True)
    # The header is written last: a directory without it is never a valid checkpoint.
    with open(tmp / _META_FILE, "w") as f:
      f.write(header_text)
      f.flush()
      os.fsync(f.fileno())
    old = None
    if dest.exists():
      old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
      os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return dest


def read_checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks the JSON header of a checkpoint (cheap; no arrays are loaded)."""
  src = pathlib.Path(path).expanduser().absolute()
  if not src.exists():
    raise CheckpointError(f"checkpoint not found: {src}")
  if not src.is_dir():
    raise CheckpointError(f"{src} is not a glad_jax checkpoint directory (it is a file)")
  meta_path = src / _META_FILE
  if not meta_path.exists():
    raise CheckpointError(
        f"{src} is not a complete glad_jax checkpoint: {_META_FILE} is missing "
        "(an interrupted save, or not a checkpoint directory)")
  try:
    header = json.loads(meta_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint header {meta_path} is corrupt: {e}") from None
  if not isinstance(header, dict) or header.get("library") != "glad_jax":
    raise CheckpointError(f"{meta_path} is not a glad_jax checkpoint header")
  version = header.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointError(
        f"checkpoint {src} has format version {version} (written by glad_jax "
        f"{header.get('library_version', '?')}); this glad_jax reads format version {FORMAT_VERSION}. "
        "Refit the model with this version (glad fit), or load it with the version that wrote it.")
  return header


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores (arrays, metadata) written by `save_checkpoint`; arrays are host NumPy arrays.

  Raises:
    CheckpointError: missing path, missing/corrupt header, incompatible format version, missing or corrupt
      array data, or arrays that do not match the header's manifest.
  """
  import orbax.checkpoint as ocp

  header = read_checkpoint_header(path)
  src = pathlib.Path(path).expanduser().absolute()
  arrays_dir = src / _ARRAYS_DIR
  if not arrays_dir.is_dir():
    raise CheckpointError(f"checkpoint {src} is incomplete: the array directory {arrays_dir} is missing")
  if not header["manifest"]:
    return {}, header["metadata"]
  try:
    with ocp.StandardCheckpointer(**_this_process_only()) as ckptr:
      arrays = ckptr.restore(arrays_dir)
  except Exception as e:  # Orbax/tensorstore raise many types; all mean the same thing to a user.
    raise CheckpointError(f"checkpoint arrays in {arrays_dir} could not be read ({type(e).__name__}: {e})") from None
  arrays = _to_numpy_tree(arrays)
  found = _manifest(arrays)
  if found != header["manifest"]:
    missing = sorted(set(header["manifest"]) - set(found))
    differing = sorted(k for k in set(found) & set(header["manifest"]) if found[k] != header["manifest"][k])
    raise CheckpointError(
        f"checkpoint {src} is corrupt: arrays do not match its manifest "
        f"(missing: {missing or 'none'}; wrong shape/dtype: {differing or 'none'})")
  return arrays, header["metadata"]


# ------------------------------------------------------------------------------- generic state trees

_ALLOWED_PREFIX = "glad_jax."  # classes a checkpoint may name (never arbitrary importable code)


def _class_name(obj: Any) -> str:
  cls = type(obj)
  return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type:
  import dataclasses
  import importlib

  module, _, qualname = name.partition(":")
  if not module.startswith(_ALLOWED_PREFIX) or not qualname:
    raise CheckpointError(f"checkpoint names class {name!r}, which is not a glad_jax class")
  try:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError):
    raise CheckpointError(f"checkpoint names class {name!r}, which this glad_jax does not have: "
                          "refit the model with this version") from None
  if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
    raise CheckpointError(f"checkpoint names {name!r}, which is not a dataclass")
  return obj


def _encode_static(value: Any) -> Any:
  """JSON form of a static (non-pytree) field value: scalars, tuples, lists, dicts, dataclasses."""
  import dataclasses

  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, tuple):
    return {"__tuple__": [_encode_static(v) for v in value]}
  if isinstance(value, list):
    return [_encode_static(v) for v in value]
  if isinstance(value, dict):
    return {"__dict__": {str(k): _encode_static(v) for k, v in value.items()}}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {"__dataclass__": _class_name(value),
            "fields": {f.name: _encode_static(getattr(value, f.name))
                       for f in dataclasses.fields(value) if f.init}}
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"cannot store static value {value!r} of type {type(value).__name__} in a checkpoint")


def _decode_static(obj: Any) -> Any:
  if isinstance(obj, list):
    return [_decode_static(v) for v in obj]
  if not isinstance(obj, dict):
    return obj
  if "__tuple__" in obj:
    return tuple(_decode_static(v) for v in obj["__tuple__"])
  if "__dict__" in obj:
    return {k: _decode_static(v) for k, v in obj["__dict__"].items()}
  if "__dataclass__" in obj:
    cls = _resolve_class(obj["__dataclass__"])
    return cls(**{k: _decode_static(v) for k, v in obj["fields"].items()})
  raise CheckpointError(f"unknown static entry in checkpoint: {sorted(obj)}")


def _encode_tree(node: Any, arrays: dict[str, Any]) -> Any:
  """JSON structure of a state pytree; array leaves are appended to `arrays` under "a<index>"."""
  import dataclasses

  if node is None:
    return None
  if isinstance(node, (jax.Array, np.ndarray)):
    key = f"a{len(arrays)}"
    arrays[key] = node
    return {"__array__": key}
  if isinstance(node, (bool, int, float, str)):
    return {"__scalar__": node}
  if isinstance(node, dict):
    return {"__dict__": {str(k): _encode_tree(v, arrays) for k, v in node.items()}}
  if isinstance(node, (list, tuple)):
    return {"__list__" if isinstance(node, list) else "__tuple__":
            [_encode_tree(v, arrays) for v in node]}
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    fields, static = {}, {}
    for f in dataclasses.fields(node):
      if not f.init:
        continue
      value = getattr(node, f.name)
      if f.metadata.get("pytree_node", True):
        fields[f.name] = _encode_tree(value, arrays)
      else:
        static[f.name] = _encode_static(value)
    return {"__node__": _class_name(node), "fields": fields, "static": static}
  raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint state (arrays, dicts, lists, "
                  "tuples, None and flax.struct dataclasses only)")


def _decode_tree(obj: Any, arrays: Mapping[str, Any]) -> Any:
  if obj is None:
    return None
  if "__array__" in obj:
    return arrays[obj["__array__"]]
  if "__scalar__" in obj:
    return obj["__scalar__"]
  if "__dict__" in obj:
    return {k: _decode_tree(v, arrays) for k, v in obj["__dict__"].items()}
  if "__list__" in obj:
    return [_decode_tree(v, arrays) for v in obj["__list__"]]
  if "__tuple__" in obj:
    return tuple(_decode_tree(v, arrays) for v in obj["__tuple__"])
  if "__node__" in obj:
    cls = _resolve_class(obj["__node__"])
    kwargs = {k: _decode_tree(v, arrays) for k, v in obj["fields"].items()}
    kwargs.update({k: _decode_static(v) for k, v in obj["static"].items()})
    try:
      return cls(**kwargs)
    except TypeError as e:
      raise CheckpointError(f"checkpoint state does not fit {obj['__node__']} ({e}): refit the model "
                            "with this version") from None
  raise CheckpointError(f"unknown entry in checkpoint state: {sorted(obj)}")


def save_state(path: str | os.PathLike, state: Any, metadata: Mapping[str, Any], *,
               overwrite: bool = True) -> pathlib.Path:
  """Atomically writes a state pytree (arrays to Orbax, structure to the JSON header) and metadata.

  Args:
    path: destination directory.
    state: a pytree of `flax.struct.dataclass` nodes (glad_jax classes), dicts, lists, tuples, None
      and arrays; static fields must be JSON-able values, tuples or (frozen) dataclasses.
    metadata: JSON-serialisable dict (config, fit information, ...).
    overwrite: as in `save_checkpoint`.

  Returns:
    The absolute path written.
  """
  arrays: dict[str, Any] = {}
  structure = _encode_tree(state, arrays)
  return save_checkpoint(path, arrays, metadata, overwrite=overwrite,
                         _extra_header={"state": structure})


def load_state(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """Restores (state, metadata) written by `save_state`; array leaves are host NumPy arrays.

  Raises:
    CheckpointError: as `load_checkpoint`, or when the header holds no state / a state this version
      cannot rebuild.
  """
  header = read_checkpoint_header(path)
  if "state" not in header:
    raise CheckpointError(f"checkpoint {path} holds no model state (written by save_checkpoint)")
  arrays, metadata = load_checkpoint(path)
  try:
    return _decode_tree(header["state"], arrays), metadata
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {path} has a state this glad_jax cannot rebuild ({e}): refit "
                          "the model with this version") from None
