"""Data parallelism over a 1-D device mesh: sample placement and sharded sums.

The mixture fitters (K-MLE, EM) only ever *sum* per-sample quantities (sufficient statistics,
log-likelihoods), so data parallelism is simple: samples are split by rows over a 1-D mesh,
each device reduces its rows, and one ``psum`` adds the per-device results. The same code runs
on 1 CPU, on N forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
and on GPUs.

Rows are padded to a multiple of (number of devices x chunk size) and carried with a boolean
validity mask; padded rows must contribute nothing, which every reduction here honours by
reading the mask.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of the default backend).

  Args:
    devices: the devices to use, in order.
    axis_name: name of the single mesh axis.

  Returns:
    a `jax.sharding.Mesh` of shape (len(devices),).
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device, got an empty list")
  return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def mesh_size(mesh: Mesh | None) -> int:
  """Number of devices samples are split over (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.devices.size)


def _axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names}")
  return mesh.axis_names[0]


def padded_size(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(1, -(-n // multiple)) * multiple


def pad_rows(x: Any, n_total: int) -> tuple[Any, Any]:
  """Zero-pad the rows of `x` to `n_total` and return the validity mask.

  Args:
    x: array of shape (N, ...), NumPy or JAX (stays of that kind).
    n_total: number of rows wanted, >= N.

  Returns:
    (x_padded of shape (n_total, ...), mask of shape (n_total,) bool, True on the N real rows).
  """
  n = x.shape[0]
  xp = jnp if isinstance(x, jax.Array) else np
  widths = [(0, n_total - n)] + [(0, 0)] * (x.ndim - 1)
  mask = xp.arange(n_total) < n
  return xp.pad(x, widths), mask


def place_samples(x: Any, mesh: Mesh | None = None, *, multiple: int = 1,
                  n_valid: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Pad rows and put samples on the mesh, split by rows.

  `x` may already be a global array spanning several processes (`glad_jax.distributed`):
  then padding and placement run as jitted programs over the mesh (every process calls this
  with the same global array), and no process ever reads rows it does not hold.

  Args:
    x: array of shape (N, ...), NumPy or JAX (e.g. (N, d) samples or (N, h, w, d) images).
    mesh: a 1-D mesh, or None for the default device.
    multiple: each device's row count is made a multiple of this (e.g. the chunk size).
    n_valid: the rows past this are padding already (default: N, none): e.g. the images that
      `distributed.to_global` appends after the real ones.

  Returns:
    x: array of shape (N_pad, ...), N_pad a multiple of (devices x multiple), sharded by rows.
    mask: array of shape (N_pad,), True on the first `n_valid` rows, sharded like x.
  """
  n_valid = x.shape[0] if n_valid is None else int(n_valid)
  if not 0 <= n_valid <= x.shape[0]:
    raise ValueError(f"n_valid should be in [0, {x.shape[0]}] (the rows of x), got {n_valid}")
  n_total = padded_size(x.shape[0], multiple * mesh_size(mesh))
  if mesh is None:
    xp, _ = pad_rows(x, n_total)
    return jax.device_put(xp), jax.device_put(jnp.arange(n_total) < n_valid)
  axis = _axis(mesh)
  rows = NamedSharding(mesh, P(axis, *([None] * (x.ndim - 1))))
  mask_sharding = NamedSharding(mesh, P(axis))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # A multi-process array: pad inside one jitted program whose output is split by rows (a
    # host-side pad would need every row on every process).
    widths = [(0, n_total - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    xp = jax.jit(lambda a: jnp.pad(a, widths), out_shardings=rows)(x)
    mask = jax.jit(lambda: jnp.arange(n_total) < n_valid, out_shardings=mask_sharding)()
    return xp, mask
  xp, _ = pad_rows(x, n_total)
  mask = (np.arange(n_total) < n_valid) if isinstance(xp, np.ndarray) else (
      jnp.arange(n_total) < n_valid)
  return jax.device_put(xp, rows), jax.device_put(mask, mask_sharding)


def to_local(tree: Any, mesh: Mesh | None = None) -> Any:
  """Every replicated leaf of `tree` as a single-device array of this process.

  The fitters return their parameters replicated over the mesh. With several processes such an
  array spans devices this process cannot address, so ``jax.device_put(a, device)`` and host
  reads of a non-replicated array fail; each process holds a full copy of a replicated array
  though, and this returns it (on the first local device of `mesh`, or the default device).

  Args:
    tree: a pytree of arrays, each fully addressable or fully replicated.
    mesh: the mesh the leaves live on (None: the default device).

  Returns:
    the same pytree with every array leaf on one local device.

  Raises:
    ValueError: for a leaf that is split over devices of other processes (not replicated).
  """
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()] \
      if mesh is not None else []
  device = local[0] if local else jax.local_devices()[0]

  def one(a):
    if not isinstance(a, jax.Array):
      return a
    if a.is_fully_addressable:
      return jax.device_put(a, device)
    if not a.is_fully_replicated:
      raise ValueError(f"an array of shape {a.shape} is split over devices of other processes "
                       f"({a.sharding}); only replicated arrays can be made local")
    return jax.device_put(a.addressable_data(0), device)

  return jax.tree_util.tree_map(one, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Put every leaf of `tree` on all devices of `mesh` (no-op without a mesh)."""
  if mesh is None:
    return tree
  if jax.process_count() > 1:
    # Across processes, a replicated global array is built from host values (each process
    # places its own copies); an array on one local device cannot be moved to the others'.
    tree = jax.tree_util.tree_map(
        lambda a: np.asarray(a) if isinstance(a, jax.Array) and a.is_fully_addressable else a,
        tree)
  return jax.device_put(tree, NamedSharding(mesh, P()))


def data_parallel_sum(fn: Callable[[Any, jax.Array, jax.Array], Any], mesh: Mesh | None
                      ) -> Callable[[Any, jax.Array, jax.Array], Any]:
  """Turn a per-shard reduction into a reduction over all samples of the mesh.

  Args:
    fn: ``fn(params, x_local, mask_local) -> pytree`` returning *sums* over its rows (padded
      rows excluded through the mask); `params` is replicated.
    mesh: a 1-D mesh, or None (then `fn` is returned unchanged).

  Returns:
    ``g(params, x, mask) -> pytree``: each device runs `fn` on its rows and the results are
    added across devices with one ``psum``; the output is replicated.
  """
  if mesh is None:
    return fn
  with_state = data_parallel(lambda params, x, mask, _: (fn(params, x, mask), None), mesh)
  return lambda params, x, mask: with_state(params, x, mask, None)[0]


def data_parallel(fn: Callable[[Any, jax.Array, jax.Array, Any], tuple[Any, Any]],
                  mesh: Mesh | None, state_in: Any = None, state_out: Any = None
                  ) -> Callable[[Any, jax.Array, jax.Array, Any], tuple[Any, Any]]:
  """`data_parallel_sum` with per-device state that lives with the samples.

  Args:
    fn: ``fn(params, x_local, mask_local, state_local) -> (sums, new_state_local)``: sums over
      its rows as in `data_parallel_sum`, plus state kept per device (e.g. per-sample caches).
    mesh: a 1-D mesh, or None (then `fn` is returned unchanged).
    state_in, state_out: pytrees of `PartitionSpec` (prefixes of the state and of the new
      state): ``P(axis)`` for parts split by rows like x, ``P()`` for replicated parts; None
      where there is no state.

  Returns:
    ``g(params, x, mask, state) -> (sums, new_state)``, the sums added across devices with one
    ``psum`` (replicated), the new state split as `state_out` says.
  """
  if mesh is None:
    return fn
  axis = _axis(mesh)

  def local(params, x, mask, state):
    sums, new_state = fn(params, x, mask, state)
    return jax.lax.psum(sums, axis), new_state

  spec = lambda s: P() if s is None else s  # noqa: E731  (a spec for an empty state)
  # check_vma=False: `fn` is ordinary single-device code (e.g. a scan whose carry starts as a
  # constant), not written with varying-axis annotations; the psum makes the sums replicated.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), spec(state_in)),
                       out_specs=(P(), spec(state_out)), check_vma=False)
