"""Time and memory measurements: peak host memory, device memory, timing of (jitted) calls.

Used by `scripts/bench_end_to_end.py` and anyone who wants to know what a fit or a scoring run
costs. Three kinds of numbers:

* host memory: the resident set size (RSS) of this process, now (`host_rss_bytes`) and at its
  lifetime peak (`host_peak_rss_bytes`, from ``resource.getrusage``); `PeakMemory` measures the
  peak *within a block of code* by sampling the RSS from a background thread (JAX and NumPy
  release the GIL while they compute, so the sampler keeps running), combined with the
  kernel's own peak counter whenever the block set a new lifetime peak (then the kernel's number
  is exact, whatever the sampling interval);
* device memory: ``jax.Device.memory_stats()`` where the backend offers it (GPU/TPU:
  ``bytes_in_use``, ``peak_bytes_in_use``); on CPU it is None and device arrays live in host
  memory, i.e. in the RSS above;
* time: `time_call` runs a function a few times after warm-up calls (compilation excluded),
  blocking on JAX's asynchronous dispatch, and reports the best and median wall times;
  `StageTimer` is a GLAD progress callback that adds up the wall time spent in each stage.

No math here and no printing: callers format the numbers.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable, Mapping

import jax

MB = 1 << 20


# ------------------------------------------------------------------------------------------- host


def _page_size() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, ValueError, OSError):
    return 4096


def host_rss_bytes() -> int:
  """Current resident set size of this process in bytes (0 where it cannot be read)."""
  try:
    with open("/proc/self/statm", "rb") as f:  # Linux: cheap, no dependency
      return int(f.read().split()[1]) * _page_size()
  except (OSError, IndexError, ValueError):
    pass
  try:
    import psutil  # optional: macOS, Windows

    return int(psutil.Process().memory_info().rss)
  except Exception:  # noqa: BLE001 - no way to read it on this platform
    return 0


def host_peak_rss_bytes() -> int:
  """Lifetime peak resident set size of this process in bytes (``getrusage``'s ru_maxrss).

  The kernel keeps this counter; it never decreases. Linux reports kilobytes, macOS bytes.
  """
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ----------------------------------------------------------------------------------------- device


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
  """``device.memory_stats()`` of `device` (default: the first device), or None (e.g. on CPU)."""
  device = jax.devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  return dict(stats) if stats else None


def device_bytes_in_use(device: jax.Device | None = None) -> int | None:
  """Bytes currently allocated on the device, or None where the backend does not say."""
  stats = device_memory_stats(device)
  return None if stats is None or "bytes_in_use" not in stats else int(stats["bytes_in_use"])


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
  """Largest device allocation total since the process started, or None where unknown."""
  stats = device_memory_stats(device)
  return None if stats is None or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


# ------------------------------------------------------------------------------------ peak memory


@dataclasses.dataclass
class MemoryReport:
  """Memory of a block of code (see `PeakMemory`); all in bytes.

  Attributes:
    host_start: RSS when the block started.
    host_peak: largest RSS seen during the block.
    host_end: RSS when the block ended.
    device_start: device bytes in use at the start (None where the backend does not say).
    device_peak: largest device bytes in use during the block (None where unknown).
    device_end: device bytes in use at the end.
    seconds: wall time of the block.
  """

  host_start: int = 0
  host_peak: int = 0
  host_end: int = 0
  device_start: int | None = None
  device_peak: int | None = None
  device_end: int | None = None
  seconds: float = 0.0

  @property
  def host_increase(self) -> int:
    """Peak RSS above the RSS at the start: the memory the block itself needed at most."""
    return max(0, self.host_peak - self.host_start)

  @property
  def device_increase(self) -> int | None:
    if self.device_peak is None or self.device_start is None:
      return None
    return max(0, self.device_peak - self.device_start)


class PeakMemory:
  """Context manager measuring the peak host (and device) memory of a block of code.

      with PeakMemory() as mem:
        model.fit(images)
      print(mem.report.host_peak / 2**20, "MB")

  A daemon thread samples the RSS (and the device's bytes in use) every `interval` seconds.
  A short spike between two samples can be missed, except when it is a new lifetime peak of
  the process: then ``getrusage``'s exact counter is used. On GPU, the allocator's
  ``peak_bytes_in_use`` is a lifetime counter too and is used the same way.

  Args:
    interval: sampling period in seconds.
    device: the device whose memory is followed (default: the first one).
  """

  def __init__(self, interval: float = 0.002, device: jax.Device | None = None):
    if not interval > 0:
      raise ValueError(f"interval must be > 0 seconds, got {interval}")
    self.interval = float(interval)
    self.device = jax.devices()[0] if device is None else device
    self.report = MemoryReport()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._has_device_stats = False
    self._t0 = 0.0
    self._lifetime_host0 = 0
    self._lifetime_device0: int | None = None

  def _sample(self) -> None:
    r = self.report
    r.host_peak = max(r.host_peak, host_rss_bytes())
    if self._has_device_stats:
      used = device_bytes_in_use(self.device)
      if used is not None:
        r.device_peak = max(r.device_peak or 0, used)

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self._sample()

  def __enter__(self) -> "PeakMemory":
    r = self.report = MemoryReport()
    r.host_start = r.host_peak = host_rss_bytes()
    self._lifetime_host0 = host_peak_rss_bytes()
    r.device_start = device_bytes_in_use(self.device)
    self._has_device_stats = r.device_start is not None
    if self._has_device_stats:
      r.device_peak = r.device_start
      self._lifetime_device0 = device_peak_bytes(self.device)
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, name="glad-peak-memory", daemon=True)
    self._t0 = time.perf_counter()
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    r = self.report
    r.seconds = time.perf_counter() - self._t0
    self._sample()
    r.host_end = host_rss_bytes()
    # A lifetime peak that grew during the block was reached during the block: exact value.
    lifetime = host_peak_rss_bytes()
    if lifetime > self._lifetime_host0:
      r.host_peak = max(r.host_peak, lifetime)
    if self._has_device_stats:
      r.device_end = device_bytes_in_use(self.device)
      dev_lifetime = device_peak_bytes(self.device)
      if (dev_lifetime is not None and self._lifetime_device0 is not None
          and dev_lifetime > self._lifetime_device0):
        r.device_peak = max(r.device_peak or 0, dev_lifetime)


# ----------------------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall times of repeated calls (seconds), compilation and warm-up excluded.

  Attributes:
    times: the time of every timed call, in order.
  """

  times: tuple[float, ...]

  @property
  def best(self) -> float:
    return min(self.times)

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def mean(self) -> float:
    return statistics.fmean(self.times)


def _block(out: Any) -> Any:
  """Waits for every JAX array in `out` (dispatch is asynchronous); other leaves pass."""
  return jax.block_until_ready(out)


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1,
              **kwargs: Any) -> Timing:
  """Times ``fn(*args, **kwargs)``: `warmup` untimed calls (compilation), then `repeats` timed.

  Every call is waited for with ``jax.block_until_ready``, so that the time covers the
  computation and not only its dispatch.

  Args:
    fn: the function; its output may hold JAX arrays.
    repeats: timed calls (>= 1).
    warmup: untimed calls first (>= 0); 1 is enough to exclude compilation.

  Returns:
    a `Timing`.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  if warmup < 0:
    raise ValueError(f"warmup must be >= 0, got {warmup}")
  for _ in range(warmup):
    _block(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  return Timing(tuple(times))


class Stopwatch:
  """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (wall time of the block)."""

  def __init__(self):
    self.seconds = 0.0
    self._t0 = 0.0

  def __enter__(self) -> "Stopwatch":
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.seconds = time.perf_counter() - self._t0


class StageTimer:
  """A `GLAD` progress callback that adds up the wall time between consecutive events by stage.

  Time between two callbacks is charged to the stage (and layer, when the event names one) of
  the *second* event: the work that just finished. The first event of a run only starts the
  clock, so call `start()` right before the measured call to charge its first stretch too.

      timer = StageTimer()
      timer.start(); model.fit(images, progress=timer)
      timer.seconds  # {'features': 12.1, 'global/layer1': 30.2, 'local/layer1': 8.0, ...}

  Args:
    chain: optional other progress callback called after the timer (e.g. progress bars).
  """

  def __init__(self, chain: Callable[[str, Mapping[str, Any]], None] | None = None):
    self.chain = chain
    self.seconds: dict[str, float] = {}
    self._last: float | None = None

  def start(self) -> None:
    self._last = time.perf_counter()

  def __call__(self, stage: str, info: Mapping[str, Any]) -> None:
    now = time.perf_counter()
    key = stage if info.get("layer") is None else f"{stage}/{info['layer']}"
    if self._last is not None:
      self.seconds[key] = self.seconds.get(key, 0.0) + (now - self._last)
    self._last = now
    if self.chain is not None:
      self.chain(stage, info)


def format_bytes(n: int | None) -> str:
  """'123.4 MB' (MB = 2**20 bytes), or 'n/a' for None."""
  return "n/a" if n is None else f"{n / MB:.1f} MB"


__all__ = [
    "MemoryReport",
    "PeakMemory",
    "StageTimer",
    "Stopwatch",
    "Timing",
    "device_bytes_in_use",
    "device_memory_stats",
    "device_peak_bytes",
    "format_bytes",
    "host_peak_rss_bytes",
    "host_rss_bytes",
    "time_call",
]
