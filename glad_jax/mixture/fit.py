"""The host driver of the global mixture fits (K-MLE and EM): configuration, loop, stopping rule.

`fit_mixture` validates the input once (`initialization`), centres the samples, places them on
the mesh, starts from `initialization.kmle_init` (or a given mixture) and runs the jitted step
(`steps.mixture_step`) until the stopping rule holds, reporting each iteration to a callback.

* K shrinks: the jitted step keeps a fixed number of rows, dead components masked by weight 0
  (log-weight -inf), and the driver compacts the live ones into a smaller bucket (a multiple of
  ``bucket``) as soon as one fits, so dead rows cost nothing and compilations are few.
* Numerics: the data are centred on their global mean (the mixture is translated back at the
  end), which keeps the float32 cancellation of the expanded quadratic form (and of EM's raw
  second moments) small; ``reg_covar`` is relative to the data's mean variance, so the fit is
  scale invariant.
* Assignment (K-MLE): dense, or pruned by projected bounds from d >= `PRUNE_MIN_DIM` ('auto',
  see `KMLEConfig.assignment`); both give the same labels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glad_jax import sharding
from glad_jax.mixture.gaussian import GaussianMixture, expanded_size
from glad_jax.mixture.initialization import (kmle_init, validate_config, validate_init,
                                             validate_samples)
from glad_jax.mixture.online import ComponentStats, pack_scatter
from glad_jax.mixture.pruned import projection_basis
from glad_jax.mixture.stats import SufficientStats
from glad_jax.mixture.steps import mixture_step

# 'auto' assignment: prune from this dimension on. Measured on tire (EfficientNet-Lite0, K ~ 1000,
# r = 32): at d = 112 the bounds leave ~2.4 candidates per sample at ~9 % of the dense pass's
# multiply-adds; at d = 24 and 40 they need r close to d and pruning costs more than it saves.
PRUNE_MIN_DIM = 64
# 'auto' assignment: back to dense when an iteration leaves more than this share of the samples
# uncertified, for PRUNE_BACKOFF iterations, doubling after each further failure (the bounds
# tighten as the components separate: magnetic_tile's layer 3 left 87 % uncertified at
# iteration 2 and a permanent switch ran its remaining 38 iterations dense, 8.5 s each).
PRUNE_MAX_FALLBACK = 0.25
PRUNE_BACKOFF = 2
# 'auto' assignment: before backing off, a failed pruned iteration doubles the bound's rank r
# (`KMLEConfig.bound_rank`), as long as the bounds then cost at most this share of the dense
# pass's multiply-adds (expanded_size(r) / expanded_size(d)): r = 32 -> 64 at d = 112 (0.35).
# Measured on magnetic_tile's layer 3 (43,904 vectors, K ~ 960): r = 32 leaves 56-79 % of the
# vectors uncertified at iterations 2-8, r = 64 leaves 36 % at iteration 2 and 6 % by iteration
# 8 (iterations of 2.6 s against 4.0-4.3 s dense), r = 96 certifies all but costs as much as dense.
PRUNE_MAX_BOUND_SHARE = 0.36
# 'auto' assignment: prune only when a dense pass costs at least this many multiply-adds
# (N K (d (d + 1) / 2 + d + 1); ~0.2 s on a 2-core CPU): the pruned step takes seconds more to
# compile, which small fits would not win back.
PRUNE_MIN_WORK = 2e10

Callback = Callable[[int, float, int], None]


@dataclasses.dataclass(frozen=True)
class KMLEConfig:
  """Hyper-parameters of the global mixture fit (defaults: paper Section 4.1).

  Attributes:
    n_components: initial number of Gaussians K (paper: 1000); the fit usually ends with fewer.
    max_iter: iteration cap (paper: 100).
    tol: stop when the relative change of the monitored mean log-likelihood between two
      iterations is below this (paper: 1e-6).
    use_oas: OAS shrinkage of every covariance (Eq. 9); False = plain sample covariance.
    reg_covar: floor ``reg_covar * v * I`` added to every covariance, with v the mean variance
      of the data (trace of its covariance / d): numerical positive-definiteness only. Without
      OAS a cluster of n <= d samples is singular up to this floor, and float32 log-densities
      of a component conditioned beyond ~1/reg_covar lose accuracy: keep it >= 1e-6 then.
    min_cluster_size: clusters with fewer (soft-counted in EM) samples are dropped; >= 2.
    chunk_size: samples per chunk of the pass over the data (per device); None picks one from
      the feature width and the backend (see `default_chunk_size`).
    init_sample_size: size of the random subsample the k-means++ seeding runs on (at least
      4 K, at most N), which keeps `kmle_init` cheap for N ~ 1e6.
    bucket: K is padded to a multiple of this with masked components, so that pruning only
      recompiles when a smaller bucket fits.
    assignment: how the assignment step (Eq. 1) is computed; every choice gives the same labels
      (up to float32 ties). 'dense' scores all K components of every sample; 'pruned' scores
      cheap upper bounds of all K, then the best `n_candidates` exactly, and certifies the
      argmax (`glad_jax.mixture.pruned`; uncertified samples are scored densely); 'auto' prunes
      when d >= `PRUNE_MIN_DIM`, the bound's rank is below d and a dense pass would cost at
      least `PRUNE_MIN_WORK` multiply-adds; when an iteration leaves more than
      `PRUNE_MAX_FALLBACK` of the samples uncertified, it doubles the bound's rank while that
      stays cheap (`bound_ranks`), and past the largest rank goes back to dense for
      `PRUNE_BACKOFF` iterations (twice as many after each further failure).
    bound_rank: r, the dimension of the projection behind the bounds (pruned only; 'auto'
      starts there).
    n_candidates: C, components scored exactly per sample (pruned only).
    label_tol: K-MLE only, an extra stopping rule (not the paper's): also stop when at most this
      fraction of the samples changed component in an iteration. None (default): the paper's
      rule alone (`tol`). K-MLE's fixed point is reached when no label changes, and the
      classification log-likelihood then stops changing too; late iterations that move a few
      hundred samples among ~1000 components change the likelihood by more than 1e-6 relative
      for many iterations (see README "Speed").
  """

  n_components: int = 1000
  max_iter: int = 100
  tol: float = 1e-6
  use_oas: bool = True
  reg_covar: float = 1e-6
  min_cluster_size: int = 2
  chunk_size: int | None = None
  init_sample_size: int = 10_000
  bucket: int = 64
  assignment: str = "auto"
  bound_rank: int = 32
  n_candidates: int = 16
  label_tol: float | None = None

  def replace(self, **changes) -> "KMLEConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class FitInfo:
  """What happened during a fit.

  Attributes:
    n_iter: iterations run.
    converged: True when the stopping rule held before ``max_iter``.
    loglik: per iteration, the monitored mean log-likelihood (`objective`) of the mixture that
      entered the iteration.
    mixture_loglik: EM, per iteration, mean log sum_k pi_k N(u; k); K-MLE: NaN (not its
      objective, and its logsumexp over K cost ~10 % of a dense pass at d = 40).
    class_loglik: per iteration, mean max_k log pi_k N(u; k).
    n_live: per iteration, the number of components alive after its update.
    objective: 'classification' (K-MLE) or 'mixture' (EM): which curve `loglik` is.
    assignment: per iteration, how Eq. 1 was computed: 'dense' or 'pruned' (projected bounds);
      see `KMLEConfig`. EM: 'soft'.
    n_fallback: per iteration, samples a pruned pass scored densely (0 when dense).
    label_change: K-MLE, per iteration, the fraction of the samples whose component differs
      from the previous iteration's (1.0 at the first iteration); empty for EM.
    bound_rank: per iteration, the rank r of a pruned pass's bounds (0 when dense or soft).
    final_stats: K-MLE, the per-component statistics (counts, means, scatter about the mean)
      of the last assignment, one row per returned component: the returned mixture is their
      M-step (`glad_jax.mixture.online.mixture_from_stats` gives it back) and what an online
      update continues from. Samples of the clusters the last update dropped are not in them.
      ``reg_covar`` is the fit's absolute covariance floor; ``loglik_threshold`` is NaN (the
      fit does not compute per-sample likelihoods, see `glad_jax.online.layer_update_stats`).
      None for EM.
  """

  n_iter: int
  converged: bool
  loglik: tuple[float, ...]
  mixture_loglik: tuple[float, ...]
  class_loglik: tuple[float, ...]
  n_live: tuple[int, ...]
  objective: str
  assignment: tuple[str, ...] = ()
  n_fallback: tuple[int, ...] = ()
  label_change: tuple[float, ...] = ()
  bound_rank: tuple[int, ...] = ()
  final_stats: ComponentStats | None = None


def default_chunk_size(dim: int, platform: str | None = None) -> int:
  """Samples per chunk of the assignment pass, from the feature width (F + d + 1 floats/sample).

  About 16 MiB of float32 features per chunk on CPU (256-1024 rows for d = 128-64: measured
  within noise of the best chunk, and 1.3-2x faster than 64 MiB chunks) and 1 GiB on
  accelerators (large matmuls, e.g. 256 rows at d = 1024); a power of two in [8, 65536].
  """
  platform = platform or jax.default_backend()
  target = (16 << 20) if platform == "cpu" else (1 << 30)
  rows = max(8, target // (4 * expanded_size(dim)))
  return int(min(65536, 2 ** int(math.floor(math.log2(rows)))))


def bucket_size(k: int, bucket: int) -> int:
  """k rounded up to a multiple of `bucket`."""
  return -(-k // bucket) * bucket


@jax.jit
def centre_samples(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Global mean (two-pass, float32-accurate), centred rows (padding kept at 0), mean variance.

  Args:
    x: array of shape (N, d).
    mask: bool array of shape (N,), False on padding rows.

  Returns:
    (centred x (N, d), mean (d,), mean variance (): trace of the covariance / d).
  """
  n = jnp.sum(mask.astype(x.dtype))
  valid = mask[:, None]
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0) / n
  mean = mean + jnp.sum(jnp.where(valid, x - mean, 0.0), axis=0) / n
  xc = jnp.where(valid, x - mean, 0.0)
  return xc, mean, jnp.sum(jnp.square(xc)) / (n * x.shape[1])


@functools.partial(jax.jit, static_argnames=("size",))
def resize_mixture(mixture: GaussianMixture, size: int) -> GaussianMixture:
  """Live components first (order kept), then masked rows up to `size` (>= number live)."""
  live = mixture.weights > 0
  order = jnp.argsort(~live, stable=True)
  k = mixture.n_components
  idx = order[:size] if size <= k else jnp.concatenate([order, jnp.zeros((size - k,), order.dtype)])
  keep = (jnp.arange(size) < jnp.sum(live))
  d = mixture.dim
  eye = jnp.eye(d, dtype=mixture.means.dtype)
  return GaussianMixture(weights=jnp.where(keep, mixture.weights[idx], 0.0),
                         means=jnp.where(keep[:, None], mixture.means[idx], 0.0),
                         cov_chol=jnp.where(keep[:, None, None], mixture.cov_chol[idx], eye))


@functools.partial(jax.jit, static_argnames=("size",))
def resized_rows(weights: jax.Array, size: int) -> jax.Array:
  """Where `resize_mixture(mixture, size)` puts each row of a mixture with these weights.

  Returns:
    int32 array of shape (K + 1,): the new row of each live component, `size` for a dead one
    and for the padding label K (entry K).
  """
  live = weights > 0
  rank = jnp.cumsum(live.astype(jnp.int32)) - 1
  return jnp.append(jnp.where(live, rank, size), size).astype(jnp.int32)


@jax.jit
def count_changed(previous: jax.Array, labels: jax.Array, rows: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """Valid samples whose label differs from the previous iteration's, int32 ().

  Args:
    previous: int32 (N,), the previous iteration's labels, in the rows it was computed with.
    labels: int32 (N,), this iteration's labels.
    rows: int32 (K_prev + 1,), where each previous row went since (`resized_rows`, or the
      identity).
    mask: bool (N,), False on padding rows.
  """
  return jnp.sum(mask & (rows[previous] != labels)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("size",))
def final_statistics(stats: SufficientStats, shift: jax.Array, weights: jax.Array,
                     centre: jax.Array, reg_covar: jax.Array, size: int) -> ComponentStats:
  """The `ComponentStats` of the components live in `weights`, in `resize_mixture`'s order.

  Args:
    stats: the last step's `SufficientStats` (K rows), taken about `shift` (K, d), in the fit's
      centred coordinates.
    weights: array of shape (K,), the weights of the mixture that step returned.
    centre: array of shape (d,), added back to the means.
    reg_covar: the fit's absolute covariance floor.
    size: the number of live components.
  """
  order = jnp.argsort(~(weights > 0), stable=True)[:size]
  counts = stats.counts[order]
  safe = jnp.where(counts > 0, counts, 1.0)
  delta = stats.sums[order] / safe[:, None]                  # mean - shift
  # Scatter about the mean, M_k = S_k - n_k delta delta^T (as the M-step's Eq. 3).
  scatter = stats.scatter[order] - counts[:, None, None] * delta[:, :, None] * delta[:, None, :]
  scatter = 0.5 * (scatter + jnp.swapaxes(scatter, 1, 2))
  return ComponentStats(counts=counts, means=shift[order] + delta + centre,
                        scatter_triu=pack_scatter(scatter), reg_covar=reg_covar,
                        loglik_threshold=jnp.full((), jnp.nan, counts.dtype))


@functools.lru_cache(maxsize=32)
def compiled_step(hard: bool, mesh: Mesh | None, use_oas: bool, chunk_size: int,
                  n_candidates: int = 16):
  """``step(mixture, x, mask, reg_covar, min_cluster_size, basis) -> (mixture, MixtureStats,
  labels, SufficientStats)`` (`steps.mixture_step`), jitted once per configuration (and by jit
  per shape and per None-ness of basis)."""
  # K-MLE monitors the classification log-likelihood only: no logsumexp over K in its pass.
  return jax.jit(functools.partial(mixture_step, hard=hard, use_oas=use_oas,
                                   chunk_size=chunk_size, n_candidates=n_candidates, mesh=mesh,
                                   mixture_loglik=not hard))


def use_pruning(config: KMLEConfig, hard: bool, d: int, k: int, iteration: int,
                n: int) -> bool:
  """Whether iteration `iteration` (1-based) of a fit on n samples with K = k rows should use
  the pruned assignment.

  'auto' does not prune the first iteration: all components of `kmle_init` share one covariance,
  so their scores are close and the bounds certify few samples (95 % fallback measured on tire's
  layer 3, against < 1 % from the second iteration on).
  """
  if not hard or config.assignment == "dense" or k <= 2 * config.n_candidates:
    return False
  if config.assignment == "pruned":
    return True
  return (d >= PRUNE_MIN_DIM and config.bound_rank < d and iteration > 1
          and n * k * expanded_size(d) >= PRUNE_MIN_WORK)


def bound_ranks(config: KMLEConfig, d: int) -> tuple[int, ...]:
  """The bound ranks a fit may use, in order: ``bound_rank`` ('pruned'), then for 'auto' its
  doublings below d whose bounds cost at most `PRUNE_MAX_BOUND_SHARE` of the dense pass."""
  ranks = [min(int(config.bound_rank), d)]
  while config.assignment == "auto":
    r = 2 * ranks[-1]
    if r >= d or expanded_size(r) > PRUNE_MAX_BOUND_SHARE * expanded_size(d):
      break
    ranks.append(r)
  return tuple(ranks)


def fit_mixture(x: Any, config: KMLEConfig, key: jax.Array, *, hard: bool,
                mesh: Mesh | None = None, callback: Callback | None = None,
                init: GaussianMixture | None = None) -> tuple[GaussianMixture, FitInfo]:
  """The host driver of `kmle.fit_kmle` (hard=True) and `em.fit_em` (hard=False).

  Args:
    x: array of shape (N, d), NumPy or JAX; float32 is used.
    config: a `KMLEConfig` (or `em.EMConfig`).
    key: `jax.random` key of the initialisation.
    hard: K-MLE (hard assignments, classification log-likelihood) or EM.
    mesh: optional 1-D mesh: samples are split over it.
    callback: optional ``callback(iteration, mean_loglik, n_live)`` after every iteration.
    init: optional starting mixture (replaces `kmle_init`).

  Returns:
    (mixture with only the live components, `FitInfo`).

  Raises:
    ValueError: bad x, bad config, K > N, or every component dropped.
    FloatingPointError: the log-likelihood became non-finite.
  """
  x = validate_samples(x)
  n, d = x.shape
  validate_config(config, n)
  if init is not None:
    init = validate_init(init, d)
    if init.n_components > n:
      raise ValueError(f"init has {init.n_components} components, more than the number of "
                       f"samples ({n})")
  n_dev = sharding.mesh_size(mesh)
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  cs = config.chunk_size or default_chunk_size(d, platform)
  cs = min(cs, sharding.padded_size(-(-n // n_dev), 8))   # no more padding than needed
  xd, mask = sharding.place_samples(x, mesh, multiple=cs)
  xc, centre, mean_var = centre_samples(xd, mask)
  del xd                                   # only the centred copy is used from here on
  mean_var = float(mean_var)
  if not mean_var > 0:
    raise ValueError("x has zero variance (all samples are identical): nothing to fit")
  reg = jnp.float32(config.reg_covar * mean_var)

  if init is None:
    mixture = kmle_init(key, xc, config.n_components, n_samples=n,
                        init_sample_size=config.init_sample_size, reg_covar=reg)
  else:
    mixture = init.replace(means=init.means - jax.device_get(centre))
  k0 = mixture.n_components
  mixture = sharding.replicate(resize_mixture(mixture, bucket_size(k0, config.bucket)), mesh)
  step = compiled_step(hard, mesh, bool(config.use_oas), cs, int(config.n_candidates))
  min_size = jnp.float32(config.min_cluster_size)
  # The bounds' projections: the data's leading principal axes, fixed for the whole fit (the
  # rank-r basis is the first r columns of the largest one).
  bases, ranks, rank_index = None, bound_ranks(config, d), 0
  if use_pruning(config, hard, d, mixture.n_components, 2, n):
    axes = jax.jit(projection_basis, static_argnums=2)(xc, mask, ranks[-1])
    bases = [sharding.replicate(axes[:, :r], mesh) for r in ranks]

  logliks, mix_ll, class_ll, lives, modes, fallbacks, changes = [], [], [], [], [], [], []
  ranks_used = []
  converged = False
  prev = None
  previous_labels, rows = None, None
  n_live = k0
  dense_until, backoff = 0, PRUNE_BACKOFF   # 'auto': iterations up to dense_until run dense
  for it in range(1, config.max_iter + 1):
    prune = (bases is not None and it > dense_until
             and use_pruning(config, hard, d, mixture.n_components, it, n))
    mode = "pruned" if prune else "dense" if hard else "soft"
    shift = mixture.means                  # K-MLE's statistics are taken about these
    rank = ranks[rank_index] if prune else 0
    mixture, stats, labels, sums = step(mixture, xc, mask, reg, min_size,
                                        bases[rank_index] if prune else None)
    step_weights = mixture.weights         # the rows of `sums` (before any resize below)
    if hard:
      if previous_labels is None:
        changes.append(1.0)
      else:
        changes.append(int(count_changed(previous_labels, labels, rows, mask)) / n)
      previous_labels = labels
      rows = jnp.arange(mixture.n_components + 1, dtype=jnp.int32)
    s = jax.device_get(stats)
    n_live = int(s.n_live)
    mix_ll.append(math.nan if hard else float(s.loglik))
    class_ll.append(float(s.class_loglik))
    cur = class_ll[-1] if hard else mix_ll[-1]
    logliks.append(cur)
    lives.append(n_live)
    modes.append(mode)
    fallbacks.append(int(s.n_fallback))
    ranks_used.append(rank)
    if prune and config.assignment == "auto" and fallbacks[-1] > PRUNE_MAX_FALLBACK * n:
      if rank_index + 1 < len(ranks):
        rank_index += 1           # a tighter bound at the next iteration
      else:
        # The bounds are too loose for now: dense is cheaper for the next `backoff` iterations.
        dense_until, backoff = it + backoff, 2 * backoff
    if callback is not None:
      callback(it, cur, n_live)
    if n_live == 0:
      raise ValueError(f"every component was dropped (clusters smaller than min_cluster_size="
                       f"{config.min_cluster_size}): decrease n_components "
                       f"({config.n_components}) or check x for degenerate data")
    if not math.isfinite(cur):
      raise FloatingPointError(f"the mean log-likelihood became {cur} at iteration {it}; check x "
                               f"for degenerate data or increase reg_covar")
    if prev is not None and abs(cur - prev) <= config.tol * abs(prev):
      converged = True
      break
    if hard and config.label_tol is not None and it > 1 and changes[-1] <= config.label_tol:
      converged = True
      break
    prev = cur
    target = bucket_size(n_live, config.bucket)
    if target < mixture.n_components:
      # Dead rows leave the state: the step recompiles for the smaller bucket only.
      if hard:
        rows = resized_rows(mixture.weights, target)
      mixture = sharding.replicate(resize_mixture(mixture, target), mesh)

  final = resize_mixture(mixture, n_live)
  final = final.replace(means=final.means + centre)
  final_stats = (final_statistics(sums, shift, step_weights, centre, reg, n_live) if hard
                 else None)
  if mesh is not None:
    final = sharding.to_local(final, mesh)  # this process's copy (multi-process safe)
    final_stats = None if final_stats is None else sharding.to_local(final_stats, mesh)
  info = FitInfo(n_iter=len(logliks), converged=converged, loglik=tuple(logliks),
                 mixture_loglik=tuple(mix_ll), class_loglik=tuple(class_ll),
                 n_live=tuple(lives), objective="classification" if hard else "mixture",
                 assignment=tuple(modes), n_fallback=tuple(fallbacks),
                 label_change=tuple(changes), bound_rank=tuple(ranks_used),
                 final_stats=final_stats)
  return final, info
