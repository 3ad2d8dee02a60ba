"""Atomic Orbax checkpoints of fitted models, with a version check and clear errors.

A checkpoint is a directory::

    <path>/
      glad_checkpoint.json   # format version, library version, config, caller metadata, array manifest
      arrays/                # Orbax StandardCheckpointer tree of NumPy arrays (host memory)

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
FORMAT_VERSION = 1
_META_FILE = "glad_checkpoint.json"
_ARRAYS_DIR = "arrays"


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, corrupt or from an incompatible version."""


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree_util.tree_map(np.asarray, tree)


def _manifest(tree: Mapping[str, Any]) -> dict[str, list]:
  """Flat {path: [shape, dtype]} listing, used to detect truncated or tampered array stores."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): [list(np.shape(v)), str(np.asarray(v).dtype)] for p, v in flat}


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, Any],
                    *, overwrite: bool = True) -> pathlib.Path:
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
  }
  try:
    header_text = json.dumps(header, indent=2, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None

  tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / _ARRAYS_DIR, host_arrays)
      ckptr.wait_until_finished()
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
        "Refit the model with this version, or load it with the version that wrote it.")
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
  try:
    with ocp.StandardCheckpointer() as ckptr:
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
