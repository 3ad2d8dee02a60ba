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


def place_samples(x: Any, mesh: Mesh | None = None, *, multiple: int = 1
                  ) -> tuple[jax.Array, jax.Array]:
  """Pad rows and put samples on the mesh, split by rows.

  Args:
    x: array of shape (N, d).
    mesh: a 1-D mesh, or None for the default device.
    multiple: each device's row count is made a multiple of this (e.g. the chunk size).

  Returns:
    x: array of shape (N_pad, d), N_pad a multiple of (devices x multiple), sharded by rows.
    mask: array of shape (N_pad,), True on real rows, sharded like x.
  """
  n_total = padded_size(x.shape[0], multiple * mesh_size(mesh))
  xp, mask = pad_rows(x, n_total)
  if mesh is None:
    return jax.device_put(xp), jax.device_put(mask)
  axis = _axis(mesh)
  return (jax.device_put(xp, NamedSharding(mesh, P(axis, *([None] * (xp.ndim - 1))))),
          jax.device_put(mask, NamedSharding(mesh, P(axis))))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Put every leaf of `tree` on all devices of `mesh` (no-op without a mesh)."""
  if mesh is None:
    return tree
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
