"""Multi-process fits on JAX's own distributed runtime (`jax.distributed`).

One process per host (or per GPU); every process runs the same program. The user-facing path:
``glad fit DATA --out CKPT --coordinator HOST:PORT --num-processes N --process-id I`` (or the
``JAX_*`` variables below), or in Python `initialize` before any other JAX work, then
``GLAD(config).fit(images_of_this_process)`` with each process's `process_shard` of the same
sorted image list, ``model.calibrate(...)`` and ``model.save(path)`` on every process (process 0
writes). The pieces:

* `resolve_options` checks the flags/variables of a hand-started run before anything starts.

* `initialize` starts the runtime (coordinator address, process count and id from the
  arguments, else from the environment: ``JAX_COORDINATOR_ADDRESS`` (read by JAX),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here), or a cluster manager that JAX
  detects: SLURM, Open MPI, Kubernetes). On CPU the collectives go through gloo.
* `process_shard` splits the list of training images: contiguous blocks, so that the
  blocks in process order are the list itself, and every block but the last ones full.
* `to_global` turns each process's (n_p, ...) feature array into one global array over all
  processes' devices (images axis split), padded so that every process contributes the same
  number of rows, with a validity mask. With `process_shard`'s blocks the padding is all at
  the end: the global array *is* the one-process array followed by zero rows, so the sharded
  fits see the same samples in the same order as a one-process fit (same seeded
  initialisation, same labels; sums differ by float32 round-off only).
* `global_mesh` is the 1-D data mesh over every device of every process, process by process;
  the K-MLE/EM fit (`glad_jax.mixture`) and the local weight fit (`glad_jax.local`) already
  reduce over such a mesh with ``psum``.
* `barrier` and `gather` synchronise and collect small host values (e.g. held-out scores for
  threshold calibration); `sample_rows` picks the global fit's vectors (and its seeded
  ``max_samples`` subset) in the one-process order; `broadcast_from_coordinator` shares the
  alignment reference; `check_all` turns one process's failure into an error on every process
  instead of a hang.
* `estimate_fit_bytes` / `check_fit_memory` refuse a fit that cannot fit in a device's memory
  before anything starts.

Nothing here reads a row that another process holds: host reads only touch replicated arrays
(`sharding.to_local`) or this process's own shards.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glad_jax import sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(ValueError):
  """A bad distributed setup (address, process count or id, late initialisation)."""


class FitMemoryError(ValueError):
  """A fit that needs more memory per device than the device has."""


class ProcessInfo(NamedTuple):
  """Where this process stands after `initialize`.

  Attributes:
    process_id: this process's index, in [0, num_processes).
    num_processes: number of processes.
    local_device_count: devices this process drives.
    device_count: devices of all processes.
  """

  process_id: int
  num_processes: int
  local_device_count: int
  device_count: int


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> bool:
  """Whether a multi-process run is asked for, by arguments or by the environment variables."""
  return (any(v is not None for v in (coordinator, num_processes, process_id))
          or any(os.environ.get(v) for v in (ENV_COORDINATOR, ENV_NUM_PROCESSES,
                                              ENV_PROCESS_ID)))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


class Options(NamedTuple):
  """A hand-started multi-process run's settings, from flags or the environment (`resolve_options`).

  Attributes:
    coordinator: "host:port" of process 0's coordinator service.
    num_processes: number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_count: CPU only: the CPU devices this process exposes (None: the default).
  """

  coordinator: str | None
  num_processes: int
  process_id: int
  local_device_count: int | None = None


def resolve_options(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, local_device_count: int | None = None, *,
                    flag_names: Mapping[str, str] | None = None) -> Options | None:
  """The settings of a multi-process run asked for by flags or environment, fully checked.

  A flag wins over its environment variable (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Checked here, before any JAX work, so that a
  bad command line fails at once with one line instead of hanging at the coordinator: a
  count of 1 needs nothing else; a count above 1 needs the coordinator and this process's id
  in range; an id or coordinator without a count is refused.

  Args:
    coordinator, num_processes, process_id: the flags (None: not given).
    local_device_count: CPU devices per process (None: the default).
    flag_names: how the errors name the settings (default: the `glad fit` flags).

  Returns:
    `Options`, or None when no multi-process run is asked for (a plain one-process fit).

  Raises:
    DistributedError: one line naming the missing or bad setting.
  """
  names = {"coordinator": "--coordinator", "num_processes": "--num-processes",
           "process_id": "--process-id", "local_device_count": "--local-devices",
           **dict(flag_names or {})}
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if local_device_count is not None and local_device_count < 1:
    raise DistributedError(f"{names['local_device_count']} should be >= 1, got "
                           f"{local_device_count}")
  if not requested(coordinator, num_processes, process_id):
    if local_device_count is not None:
      raise DistributedError(f"{names['local_device_count']} is for multi-process runs: give "
                             f"{names['num_processes']} too")
    return None

  def source(key: str, env: str) -> str:
    return names[key] if given[key] is not None else env

  coordinator = coordinator if coordinator is not None else (os.environ.get(ENV_COORDINATOR)
                                                             or None)
  count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if count is None:
    what = source("process_id", ENV_PROCESS_ID) if pid is not None else source(
        "coordinator", ENV_COORDINATOR)
    raise DistributedError(f"{what} without {names['num_processes']} (or {ENV_NUM_PROCESSES}): "
                           f"give the number of processes of the run")
  if count < 1:
    raise DistributedError(f"{source('num_processes', ENV_NUM_PROCESSES)} should be >= 1, got "
                           f"{count}")
  if count == 1:
    if pid not in (None, 0):
      raise DistributedError(f"process id {pid} is not in [0, 1) (num_processes=1)")
    return Options(None, 1, 0, local_device_count)
  if pid is None:
    raise DistributedError(f"{source('num_processes', ENV_NUM_PROCESSES)} {count} needs this "
                           f"process's {names['process_id']} (or {ENV_PROCESS_ID}) in [0, {count})")
  if not 0 <= pid < count:
    raise DistributedError(f"process id {pid} is not in [0, {count}) (num_processes={count})")
  if coordinator is None:
    raise DistributedError(f"{source('num_processes', ENV_NUM_PROCESSES)} {count} needs "
                           f"{names['coordinator']} HOST:PORT (or {ENV_COORDINATOR}), the same on "
                           f"every process")
  _check_address(coordinator)
  return Options(coordinator, int(count), int(pid), local_device_count)


def _check_address(coordinator: str) -> None:
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"coordinator should be HOST:PORT, got {coordinator!r}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None, *,
               timeout_s: int = 300) -> ProcessInfo:
  """Starts JAX's distributed runtime for this process (call before any other JAX work).

  With no arguments, `jax.distributed.initialize` reads the standard cluster environment
  (``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI, Kubernetes); ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` fill the count and id when no cluster manager provides them (a run
  started by hand, e.g. on localhost). CPU collectives (the ``psum`` of the fits) go through
  gloo.

  Args:
    coordinator: "host:port" of process 0's coordinator service (every process passes the
      same address; process 0 listens on its port).
    num_processes: number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_count: CPU only: the number of CPU devices this process exposes (default
      1). GPUs: each process uses the GPUs it sees (set ``CUDA_VISIBLE_DEVICES`` to split).
    timeout_s: how long to wait for every process to join.

  Returns:
    `ProcessInfo` of this process.

  Raises:
    DistributedError: bad values, or JAX already started computing in this process.
  """
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if num_processes is not None and (num_processes < 1):
    raise DistributedError(f"the number of processes should be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f"process id {process_id} is not in [0, {num_processes}) "
                           f"(num_processes={num_processes})")
  if coordinator is not None:
    _check_address(coordinator)
  if local_device_count is not None and local_device_count < 1:
    raise DistributedError(f"local_device_count should be >= 1, got {local_device_count}")
  # Both only act on the CPU backend: gloo carries the cross-process collectives of CPU
  # devices (without it a CPU psum across processes fails), and the device count splits a
  # host's cores into several devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
    _warn_lapack_pool(int(local_device_count))
  if num_processes == 1:
    # Nothing to coordinate: a one-process run needs no coordinator service.
    return process_info()
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
  except RuntimeError as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DistributedError(f"jax.distributed.initialize failed: {msg} (call "
                           f"glad_jax.distributed.initialize before any other JAX work)") from e
  except ValueError as e:
    raise DistributedError(f"jax.distributed.initialize: {e} (pass --coordinator HOST:PORT "
                           f"--num-processes N --process-id I, or set {ENV_COORDINATOR}, "
                           f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})") from e
  return process_info()


def _schedulable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover  (no affinity on this OS)
    return os.cpu_count() or 1


def _warn_lapack_pool(local_device_count: int) -> None:
  """Warns when CPU devices can exhaust jaxlib 0.10's LAPACK thread pool (a hang, not an error).

  jaxlib 0.10.x splits a batched LAPACK call (the fits' K Cholesky factorisations) into tasks
  on the process's intra-op pool, one thread per core, and blocks a pool thread until they are
  done; with as many devices as cores running such a call at once (the collectives of a
  multi-process fit line them up) every pool thread waits and the fit hangs. Seen here with
  2 CPU devices per process on 2 cores at d >= 24; jaxlib >= 0.11.1 no longer does this.
  """
  import jaxlib  # noqa: PLC0415

  version = tuple(int(v) for v in jaxlib.__version__.split(".")[:3] if v.isdigit())
  cores = _schedulable_cores()
  if (0, 10, 0) <= version < (0, 11, 1) and local_device_count >= cores:
    warnings.warn(f"{local_device_count} CPU devices per process on {cores} cores with jaxlib "
                  f"{jaxlib.__version__}: its batched LAPACK calls can deadlock the thread pool "
                  f"(a fit that hangs); use fewer devices per process (--local-devices "
                  f"{max(1, cores - 1)}) or jaxlib >= 0.11.1", RuntimeWarning, stacklevel=3)


def process_info() -> ProcessInfo:
  """`ProcessInfo` of this process (1 process when the runtime was not started)."""
  return ProcessInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                     local_device_count=jax.local_device_count(),
                     device_count=jax.device_count())


def is_coordinator() -> bool:
  """True on process 0, the one that writes checkpoints and reports."""
  return jax.process_index() == 0


def shard_bounds(n: int, num_processes: int, multiple: int = 1) -> list[tuple[int, int]]:
  """[start, stop) of each process's block of n items (see `process_shard`).

  Blocks have B = ceil(n / num_processes) items rounded up to a multiple of `multiple`;
  the first processes get full blocks, then one partial block, then empty ones.
  """
  if num_processes < 1 or multiple < 1:
    raise ValueError(f"num_processes and multiple should be >= 1, got {num_processes}, "
                     f"{multiple}")
  block = max(1, -(-n // num_processes))
  block = -(-block // multiple) * multiple
  return [(min(n, p * block), min(n, (p + 1) * block)) for p in range(num_processes)]


def process_shard(items: Sequence[Any], *, process_id: int | None = None,
                  num_processes: int | None = None, multiple: int | None = None) -> list:
  """This process's disjoint, deterministic, contiguous slice of `items`.

  Every process must pass the same list (e.g. the sorted training records). Blocks are
  contiguous and all the same size but for the last non-empty one, so the blocks of all
  processes in process order are `items`, and the padding `to_global` adds is at the end.

  Args:
    items: the full list, identical on every process.
    process_id, num_processes: default: this process's (`jax.process_index`, `process_count`).
    multiple: block sizes are rounded up to a multiple of this (default: the local device
      count, so that every device holds whole images).

  Returns:
    list, this process's items (possibly empty when there are fewer items than processes).
  """
  pid = jax.process_index() if process_id is None else int(process_id)
  count = jax.process_count() if num_processes is None else int(num_processes)
  multiple = jax.local_device_count() if multiple is None else int(multiple)
  start, stop = shard_bounds(len(items), count, multiple)[pid]
  return list(items[start:stop])


def global_mesh() -> Mesh:
  """The 1-D data mesh over every device of every process, grouped by process.

  Grouping by process makes each process's rows of a global array one contiguous block,
  which `to_global` relies on. Same as `sharding.make_mesh()` in a one-process run.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return sharding.make_mesh(devices)


def _local_block(mesh: Mesh) -> int:
  """Number of mesh devices of this process (each process must have the same number)."""
  mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if mine == 0:
    raise DistributedError(f"the mesh has no device of process {jax.process_index()}")
  return mine


def allgather_ints(values: Sequence[int]) -> np.ndarray:
  """The int64 vector `values` of every process, shape (num_processes, len(values))."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def to_global(local_array: Any, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """One global array from each process's rows, split by rows over `mesh`.

  Every process calls this with its own rows (the same trailing shape and dtype on all
  processes). Each contributes B rows, B = the largest row count of any process rounded up
  to a multiple of its number of devices (zero rows appended), so the global array has
  num_processes * B rows: process p's rows at [p B, p B + n_p).

  Args:
    local_array: array of shape (n_p, ...), this process's rows (n_p may be 0).
    mesh: a 1-D mesh whose devices are grouped by process (`global_mesh`).

  Returns:
    array: global array of shape (num_processes * B, ...), sharded by rows.
    mask: global bool array of shape (num_processes * B,), True on real rows.

  Raises:
    DistributedError: when processes give different trailing shapes or dtypes.
  """
  x = np.asarray(local_array)
  per_device = _local_block(mesh)
  n_proc = jax.process_count()
  # Shapes and dtype of every process, to fail with a message instead of hanging.
  code = np.dtype(x.dtype).num
  info = allgather_ints([x.shape[0], x.ndim, code, per_device] + list(x.shape[1:])
                        + [0] * (8 - max(0, x.ndim - 1)))
  if len({tuple(r[1:]) for r in info}) > 1:
    raise DistributedError(f"processes hold arrays of different shapes/dtypes/device counts "
                           f"(per process: rows, ndim, dtype code, devices, dims) {info.tolist()}")
  block = int(info[:, 0].max())
  block = max(per_device, -(-block // per_device) * per_device)
  padded = np.zeros((block,) + x.shape[1:], x.dtype)
  padded[:x.shape[0]] = x
  mask = np.arange(block) < x.shape[0]
  axis = mesh.axis_names[0]
  rows = NamedSharding(mesh, P(axis, *([None] * (x.ndim - 1))))
  glob = jax.make_array_from_process_local_data(rows, padded, (n_proc * block,) + x.shape[1:])
  gmask = jax.make_array_from_process_local_data(NamedSharding(mesh, P(axis)), mask,
                                                 (n_proc * block,))
  return glob, gmask


def valid_prefix(mask: jax.Array) -> int:
  """n if the True entries of `mask` are exactly its first n, else -1 (host read, replicated)."""
  m = np.asarray(jax.jit(lambda a: jnp.stack([jnp.sum(a), jnp.sum(jnp.cumprod(a))]))(
      mask.astype(jnp.int32)))
  n, prefix = int(m[0]), int(m[1])
  return n if n == prefix else -1


def leading_rows(x: jax.Array, n: int, mesh: Mesh) -> jax.Array:
  """The first n rows of a global array, as a global array over `mesh`.

  Split by rows when n divides evenly over the devices; otherwise replicated (every device
  then holds all n rows for the time of the fit's placement, which re-splits them).

  Args:
    x: global array of shape (N, ...), N >= n.
    n: rows to keep.
    mesh: the 1-D mesh of x.
  """
  axis = mesh.axis_names[0]
  spec = P(axis, *([None] * (x.ndim - 1))) if n % sharding.mesh_size(mesh) == 0 else P()
  return jax.jit(lambda a: a[:n], out_shardings=NamedSharding(mesh, spec))(x)


def global_samples(features: jax.Array, mask: jax.Array, mesh: Mesh) -> jax.Array:
  """The (n * h * w, d) feature vectors of the real images of a `to_global` array.

  These are the global fit's samples in the one-process order (image, row, column).

  Args:
    features: global array of shape (M_pad, h, w, d) from `to_global`.
    mask: its (M_pad,) validity mask; the real images must come first (`process_shard`).
    mesh: the mesh of both.

  Raises:
    DistributedError: when the real images are not the leading ones.
  """
  n = valid_prefix(mask)
  if n < 0:
    raise DistributedError("the real images are not the leading rows of the global array: "
                           "split the images with distributed.process_shard")
  m_pad, h, w, d = features.shape
  axis = mesh.axis_names[0]
  flat = jax.jit(lambda a: a.reshape(m_pad * h * w, d),
                 out_shardings=NamedSharding(mesh, P(axis, None)))(features)
  return flat if n == m_pad else leading_rows(flat, n * h * w, mesh)


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier called `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"glad_{name}")


def gather(local_values: Any) -> np.ndarray:
  """Concatenation of every process's 1-D `local_values`, in process order (host arrays).

  Processes may hold different counts (e.g. the held-out scores of their images).
  """
  v = np.asarray(local_values).reshape(-1)
  if jax.process_count() == 1:
    return v
  counts = allgather_ints([v.size])[:, 0]
  width = max(1, int(counts.max()))
  padded = np.zeros((width,), v.dtype)
  padded[:v.size] = v
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), width)
  return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def gather_rows(local_rows: Any) -> np.ndarray:
  """Concatenation of every process's (n_p, ...) array along its rows, in process order.

  For small host data only (e.g. the aligned training images an object mask is computed
  from); every process must pass the same trailing shape and dtype.
  """
  x = np.asarray(local_rows)
  return gather(x).reshape((-1,) + x.shape[1:])


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host, as NumPy.

  Every process must call this with the same array (it is a collective when the array
  spans processes). For small arrays (masks) and for data a host step needs whole.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample_rows(features: jax.Array, mask: jax.Array, mesh: Mesh,
                index: np.ndarray | None = None) -> jax.Array:
  """Feature vectors of the real images of a `to_global` array, in the one-process order.

  Vector i of the one-process fit is (image i // (h w), position i % (h w)) of the real
  images in global order, so ``index`` (e.g. the seeded ``max_samples`` subset, drawn from
  the real vector count) picks the same vectors as in a one-process fit. Without `index`
  and with the real images first (`process_shard`) this is `global_samples`; otherwise the
  rows are gathered by a jitted take over the mesh.

  Args:
    features: global array of shape (M_pad, h, w, d) from `to_global`.
    mask: its (M_pad,) validity mask.
    mesh: the mesh of both.
    index: optional int array of shape (n,), rows of the (n_real h w, d) sample matrix to keep.

  Returns:
    global array of shape (n, d) (n = n_real h w without `index`), split by rows over
    `mesh` when n divides evenly over its devices, else replicated.
  """
  m_pad, h, w, d = features.shape
  real = np.flatnonzero(host_array(mask))
  if index is None and real.size and real[-1] == real.size - 1:
    return global_samples(features, mask, mesh)
  hw = h * w
  index = np.arange(real.size * hw) if index is None else np.asarray(index, np.int64)
  if index.size and (index.min() < 0 or index.max() >= real.size * hw):
    raise ValueError(f"sample index out of range [0, {real.size * hw})")
  rows = real[index // hw] * hw + index % hw
  if m_pad * hw >= 2**31:
    raise DistributedError(f"{m_pad * hw} feature vectors per layer do not fit int32 indices: "
                           f"use --max-samples")
  axis = mesh.axis_names[0]
  flat = jax.jit(lambda a: a.reshape(m_pad * hw, d),
                 out_shardings=NamedSharding(mesh, P(axis, None)))(features)
  spec = P(axis, None) if rows.size % sharding.mesh_size(mesh) == 0 else P()
  rows = jax.device_put(rows.astype(np.int32), NamedSharding(mesh, P()))
  return jax.jit(lambda a, i: a[i], out_shardings=NamedSharding(mesh, spec))(flat, rows)


def broadcast_from_coordinator(value: Any) -> np.ndarray:
  """Process 0's host array on every process (the others pass anything of its shape and dtype).

  E.g. the alignment reference, the first training image of the whole list, which only
  process 0 (the first block of `process_shard`) holds.
  """
  v = np.asarray(value)
  if jax.process_count() == 1:
    return v
  return np.asarray(multihost_utils.broadcast_one_to_all(v))


def check_all(error: BaseException | None, doing: str) -> None:
  """Raises on every process when any process failed at the same step (a collective).

  A process that fails alone would leave the others waiting at their next collective; each
  process calls this after a step that can fail locally (reading its images, say), with the
  exception it caught or None. The failing process re-raises its own exception, the others
  raise one line naming the processes that failed.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  failed = np.flatnonzero(allgather_ints([int(error is not None)])[:, 0]).tolist()
  if error is not None:
    raise error
  if failed:
    raise DistributedError(f"process{'es' if len(failed) > 1 else ''} "
                           f"{', '.join(map(str, failed))} failed while {doing} (see "
                           f"{'their' if len(failed) > 1 else 'its'} output)")


def agreed_shape(shape: Sequence[int] | None, *, has_data: bool = True) -> tuple[int, ...] | None:
  """The shape every process with data reports, None when they differ or one has none.

  E.g. the common file shape of the training images, which each process knows of its own
  block only. A process with no data (`has_data` False) does not take part in the vote;
  one whose data has no common shape passes None, which makes the result None.
  """
  width = 8   # room for any array shape a fit meets
  if shape is not None and len(shape) > width:
    raise ValueError(f"agreed_shape takes shapes of at most {width} axes, got {tuple(shape)}")
  # -1: no data, -3: data without a common shape, -2: past the last axis.
  if not has_data:
    row = [-1] * width
  elif shape is None:
    row = [-3] * width
  else:
    row = list(shape) + [-2] * (width - len(shape))
  every = {tuple(r) for r in allgather_ints(row) if r[0] != -1}
  if any(r[0] == -3 for r in every):
    return None
  if len(every) != 1:
    return None
  return tuple(int(v) for v in every.pop() if v != -2)


# ----------------------------------------------------------------------------------------------
# Memory check.
# ----------------------------------------------------------------------------------------------


def estimate_fit_bytes(n_images: int, grids: Mapping[str, tuple[int, int, int]],
                       n_components: int, n_devices: int = 1) -> int:
  """Bytes one device needs to hold a GLAD fit's data (float32; a lower bound).

  Per layer, the training features n_images * h * w * d * 4 split over the devices, plus the
  mixture K * d^2 * 4 (covariance factors, replicated) of the widest layer, which is fitted
  last in the worst case while every layer's features are held.

  Args:
    n_images: training images.
    grids: {layer: (h, w, d)} of the backbone's feature grids.
    n_components: K of the global mixtures.
    n_devices: devices the images are split over.
  """
  features = sum(n_images * h * w * d * 4 for h, w, d in grids.values())
  widest = max((d for _, _, d in grids.values()), default=0)
  return int(math.ceil(features / max(1, n_devices)) + n_components * widest * widest * 4)


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """Memory a fit can use on `device`: the accelerator's limit, or on CPU the available host
  memory; None when unknown."""
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory stats)
      stats = {}
    limit = stats.get("bytes_limit")
    if limit:
      return int(limit) - int(stats.get("bytes_in_use", 0))
    return None
  try:
    import psutil  # noqa: PLC0415
  except ImportError:  # pragma: no cover
    return None
  # CPU devices of one process share the host memory.
  return int(psutil.virtual_memory().available) // max(1, jax.local_device_count())


def check_fit_memory(needed: int, device: jax.Device | None = None,
                     available: int | None = None) -> None:
  """Refuses a fit before it starts when `needed` bytes exceed a device's free memory.

  Args:
    needed: bytes per device (`estimate_fit_bytes`).
    device: the device to check (default: this process's first).
    available: override of the free bytes (default: `device_memory_bytes`).

  Raises:
    FitMemoryError: one line naming both sizes and what to change.
  """
  device = device or jax.local_devices()[0]
  free = device_memory_bytes(device) if available is None else int(available)
  if free is not None and needed > free:
    raise FitMemoryError(
        f"the fit needs about {needed / 2**30:.2f} GiB per device but {device.platform} device "
        f"{device.id} has {free / 2**30:.2f} GiB free: use fewer training images, fewer "
        f"components (--k), --max-samples, or more devices/processes")
