"""How many samples a global mixture fit can afford: cost model, measured throughput, subsample.

The K-MLE iteration is dominated by its assignment pass (Eq. 1): 2 N K (d (d + 1) / 2 + d + 1)
float32 flops (`gaussian.packed_size`), done as matmuls. `measure_assignment_throughput` times
that pass on this machine; `estimate_fit_seconds` scales it to a fit (plus the statistics and
the M-step, modelled as a fraction of the pass), `choose_sample_budget` inverts the estimate for
a time budget, and `stratified_subsample` draws that many feature vectors so that every image
and every grid position keeps its share.

Estimates use the dense pass: an upper bound where the fit prunes (d >= `fit.PRUNE_MIN_DIM`).
Pure functions, no I/O; only `measure_assignment_throughput` runs JAX code.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax.mixture.gaussian import GaussianMixture, packed_size
from glad_jax.mixture.stats import assignment_pass

# Cost of a whole K-MLE iteration over its assignment pass alone (statistics, M-step, host loop):
# ~1.3 measured at d = 24-40, K ~ 1000 (scripts/bench_mixture.py: kmle s/it vs the pass).
STEP_OVERHEAD = 1.3
# Iterations assumed by `choose_sample_budget` (tire, K = 1000: 47 / 34 / 20 at 50,000 samples).
DEFAULT_ITERATIONS = 50
# Fewest samples per initial component `choose_sample_budget` returns (when there are as many).
MIN_SAMPLES_PER_COMPONENT = 10


def assignment_flops(n: int, d: int, k: int) -> float:
  """Useful flops of one assignment pass: 2 n k (d (d + 1) / 2 + d + 1)."""
  return 2.0 * n * k * packed_size(d)


def measure_assignment_throughput(n: int = 16384, d: int = 32, k: int = 256,
                                  repeats: int = 2) -> float:
  """Flops per second of the real assignment pass (`stats.assignment_pass`) on this machine.

  A short timed run (compiled first, best of `repeats`) on random data, about a second on a
  2-core CPU with the defaults.

  Returns:
    `assignment_flops(n, d, k)` / seconds.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  mix = GaussianMixture(weights=jnp.full((k,), 1.0 / k, jnp.float32),
                        means=jnp.asarray(rng.standard_normal((k, d)), jnp.float32),
                        cov_chol=jnp.tile(jnp.eye(d, dtype=jnp.float32), (k, 1, 1)))
  chunk = min(1024, n)
  n = n // chunk * chunk
  mask = jnp.ones((n,), bool)
  run = jax.jit(functools.partial(assignment_pass, chunk_size=chunk))
  jax.block_until_ready(run(mix, x[:n], mask))
  best = float("inf")
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(run(mix, x[:n], mask))
    best = min(best, time.perf_counter() - start)
  return assignment_flops(n, d, k) / best


def estimate_fit_seconds(n: int, d: int, k: int, n_iter: int, throughput: float) -> float:
  """Seconds of a K-MLE fit of n samples, K = k, `n_iter` iterations, at `throughput` flops/s.

  ``n_iter * STEP_OVERHEAD * assignment_flops(n, d, k) / throughput`` (compilation and
  seeding excluded); dense-pass cost, an upper bound where the fit prunes.
  """
  if throughput <= 0:
    raise ValueError(f"throughput must be > 0 flops/s, got {throughput!r}")
  return n_iter * STEP_OVERHEAD * assignment_flops(n, d, k) / throughput


def estimate_fit_bytes(n: int, d: int, k: int, chunk_size: int = 8192) -> int:
  """Peak bytes a fit of n samples in d dimensions with K = k needs beyond its input.

  Counts the float32 centred copy and the sorted/tiled copy of `stats.cluster_moments` (2 n d),
  labels and sort keys (3 n int32), one chunk of packed features and its (chunk, K) scores, and
  ~8 K d^2 floats of mixture state (Cholesky and precision factors, covariances, scatter,
  weights of the expanded form).
  """
  per_sample = 4 * (2 * d + 3)
  chunk = 4 * min(chunk_size, n) * (packed_size(d) + 2 * k)
  mixture = 4 * 8 * k * (d * d + d)
  return int(n * per_sample + chunk + mixture)


def choose_sample_budget(n_vectors: int, d: int, k: int, seconds_budget: float,
                         throughput: float, *, n_iter: int = DEFAULT_ITERATIONS) -> int:
  """The number of samples a global fit should use to finish in `seconds_budget`.

  The largest n <= n_vectors with ``estimate_fit_seconds(n, d, k, n_iter, throughput) <=
  seconds_budget``, but at least ``min(n_vectors, MIN_SAMPLES_PER_COMPONENT * k)`` (fewer
  samples per component would leave most components with a handful of points).

  Returns:
    n_used, an int in [1, n_vectors].
  """
  # The flop model as an iteration cost with no fixed part: the same inversion, floor and cap as the
  # measured plan.
  per_vector = estimate_fit_seconds(1, d, k, 1, throughput)
  return plan_samples(n_vectors, d, k, seconds_budget, IterationCost(0.0, per_vector), n_iter=n_iter).n_used


def stratified_subsample(key: jax.Array, n_images: int, h: int, w: int,
                         n_used: int) -> np.ndarray:
  """Sorted flat indices into the (n_images * h * w) feature vectors, every image and every
  position represented.

  Image m's vectors are the flat indices m h w + p (p = row * w + col). Each image gets
  floor or ceil(n_used / n_images) vectors; the positions are taken in consecutive runs of one
  random cyclic order of the h w positions, image after image (in a random image order), so
  each position is used floor or ceil(n_used / (h w)) times and an image never repeats one.
  Every image is represented when n_used >= n_images, every position when n_used >= h w.

  Args:
    key: `jax.random` key (same key, same indices).
    n_images, h, w: the feature grid (N, h, w, d) the flat indices refer to.
    n_used: how many vectors to keep; n_used >= n_images h w keeps them all.

  Returns:
    int64 array of shape (min(n_used, n_images h w),), sorted, distinct.
  """
  positions = h * w
  total = n_images * positions
  if min(n_images, h, w, n_used) < 1:
    raise ValueError(f"n_images, h, w and n_used must be >= 1, got {n_images}, {h}, {w}, "
                     f"{n_used}")
  if n_used >= total:
    return np.arange(total, dtype=np.int64)
  k_images, k_positions = jax.random.split(key)
  image_order = np.asarray(jax.random.permutation(k_images, n_images))
  cycle = np.asarray(jax.random.permutation(k_positions, positions))
  base, extra = divmod(n_used, n_images)
  per_image = np.full(n_images, base, np.int64)
  per_image[:extra] += 1                       # the first `extra` images in the random order
  start = np.concatenate([[0], np.cumsum(per_image)[:-1]])
  image = np.repeat(image_order, per_image)
  offset = np.arange(n_used) - np.repeat(start, per_image)
  position = cycle[(np.repeat(start, per_image) + offset) % positions]
  return np.sort(image.astype(np.int64) * positions + position)


# ------------------------------------------------------------------ automatic budget from the real fit step

# The two probe sizes: an iteration costs a + b n (a: the per-iteration work that does not grow with the
# samples, such as the M-step over K d x d covariances and the driver's host step; b: per vector), and the two
# probes measure both, so that a small probe does not make the per-vector cost look larger than it is.
PROBE_SIZES = (8_192, 32_768)
# Probe iterations: the first one is not timed (it compiles), the next ones are.
PROBE_ITERATIONS = 3


def measure_iteration_seconds(probe_fit: Callable[[Callable[..., None]], Any]) -> float:
  """Seconds of one iteration of a probe fit, compilation excluded.

  `probe_fit(callback)` must run at least 2 iterations of the layer's actual fit (same algorithm, d, K and
  pruning path as the full fit) and call ``callback(iteration, ...)`` after each; the clock runs from the
  first callback (after compilation and the first iteration) to the last.
  """
  stamps: list[float] = []

  def callback(*_):
    stamps.append(time.perf_counter())

  probe_fit(callback)
  if len(stamps) < 2:
    raise RuntimeError(f"the probe fit ran {len(stamps)} iteration(s); it needs at least 2 to be timed")
  return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


class IterationCost(NamedTuple):
  """Seconds of one fit iteration on n vectors: ``fixed + per_vector * n`` (measured, `measure_iteration_cost`)."""
  fixed: float
  per_vector: float

  def seconds(self, n: int) -> float:
    return self.fixed + self.per_vector * n


def measure_iteration_cost(probe_fit_of: Callable[[int], Callable[[Callable[..., None]], Any]],
                           sizes: tuple[int, int]) -> IterationCost:
  """The line through the iteration seconds of two probe fits of `sizes` (n1 < n2) vectors.

  `probe_fit_of(n)` returns the `measure_iteration_seconds` probe on n vectors. A noisy measurement
  that gives a non-increasing cost falls back to no fixed part (all the larger probe's cost per vector).
  """
  n1, n2 = sizes
  t1 = measure_iteration_seconds(probe_fit_of(n1))
  t2 = measure_iteration_seconds(probe_fit_of(n2))
  if n2 <= n1 or t2 <= t1:
    return IterationCost(0.0, t2 / max(1, n2))
  per_vector = (t2 - t1) / (n2 - n1)
  return IterationCost(max(0.0, t2 - per_vector * n2), per_vector)


class SamplePlan(NamedTuple):
  """How many vectors a layer's global fit uses, and what that is expected to cost.

  Attributes:
    n_used: vectors the global fit uses (<= the layer's vectors).
    reason: "all" (every vector fits in the budget) or "budget" (subsampled to fit it).
    est_seconds: expected seconds of the global fit, at `DEFAULT_ITERATIONS` iterations.
    est_bytes: `estimate_fit_bytes` of the fit.
  """
  n_used: int
  reason: str
  est_seconds: float
  est_bytes: int


def plan_samples(n_vectors: int, d: int, k: int, seconds_budget: float, cost: IterationCost,
                 *, n_iter: int = DEFAULT_ITERATIONS) -> SamplePlan:
  """The largest n with ``n_iter * cost.seconds(n) <= seconds_budget`` (at least
  ``min(n_vectors, MIN_SAMPLES_PER_COMPONENT * k)``, at most n_vectors)."""
  if n_vectors < 1:
    raise ValueError(f"n_vectors must be >= 1, got {n_vectors!r}")
  if not seconds_budget > 0:
    raise ValueError(f"seconds_budget must be > 0, got {seconds_budget!r}")
  if not cost.per_vector > 0 or cost.fixed < 0:
    raise ValueError(f"the iteration cost must have per_vector > 0 and fixed >= 0, got {cost!r}")
  affordable = int(max(0.0, seconds_budget - n_iter * cost.fixed) / (n_iter * cost.per_vector))
  floor = min(n_vectors, MIN_SAMPLES_PER_COMPONENT * k)
  n_used = int(max(floor, min(n_vectors, affordable)))
  return SamplePlan(n_used, "all" if n_used == n_vectors else "budget", n_iter * cost.seconds(n_used),
                    estimate_fit_bytes(n_used, d, k))
