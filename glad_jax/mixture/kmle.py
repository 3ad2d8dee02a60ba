"""K-MLE: hard-assignment maximum likelihood for the global Gaussian mixture (paper Eq. 1-3, 9).

The algorithm alternates (Section 3.1)

* an assignment step, Eq. 1: ``z_i = argmin_k (u_i - mu_k)^T Sigma_k^{-1} (u_i - mu_k)
  + log|Sigma_k| - 2 log pi_k``, i.e. ``z_i = argmax_k log pi_k + log N(u_i; mu_k, Sigma_k)``;
* an update step, Eq. 2-3: per cluster C_k the weight |C_k|/N, the mean and the sample
  covariance, shrunk by OAS (Eq. 9, `glad_jax.mixture.oas`) when enabled.

Clusters left with fewer than ``min_cluster_size`` (>= 2) samples are dropped ("Gaussians with
no samples are dropped"; a 1-sample cluster has zero scatter, see `oas`).

Implementation:

* Memory O(N + K d^2), no N x K x d array. The assignment pass is chunked (``lax.scan``): per
  chunk the features ``[u_i u_j (i <= j), u, 1]`` (`gaussian.quadratic_blocks`) give all K
  log-densities by float32 matmuls (`gaussian.log_joint`); it returns the labels. The update's
  sums (`cluster_moments`) sort the samples by label and take per-tile Gram matrices of the
  differences to the previous means: O(N d^2) flops as small matmuls, and no float32
  cancellation in the covariances.
* Data parallel: with a mesh, each device reduces its rows and one ``psum`` adds the
  statistics (`glad_jax.sharding`); the M-step is replicated.
* K shrinks: the jitted step keeps a fixed number of rows, dead components masked by weight 0
  (log-weight -inf), and the host driver compacts the live ones into a smaller bucket (a
  multiple of 64) as soon as one fits, so dead rows cost nothing and compilations are few.
* Numerics: the driver centres the data on its global mean (the mixture is translated back at
  the end), which keeps the float32 cancellation of the expanded quadratic form (and of EM's
  raw second moments) small; ``reg_covar`` is relative to the data's mean variance, so the fit
  is scale invariant.

API (optax-like pure pieces plus one host driver): `kmle_init`, `kmle_step`, `fit_kmle`.
The pieces shared with EM (`sufficient_statistics`, `m_step`, the driver) live here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from glad_jax import sharding
from glad_jax.mixture.gaussian import (GaussianMixture, expanded_size, log_joint,
                                       log_joint_params, quadratic_blocks, quadratic_size,
                                       split_rows, unpack_quadratic)
from glad_jax.mixture.oas import oas_covariance
from glad_jax.mixture import pruned
from glad_jax.mixture.pruned import projection_basis, pruned_assignment_pass
from glad_jax.mixture.tiles import tile_layout

_HIGHEST = jax.lax.Precision.HIGHEST
# 'auto' assignment: prune from this dimension on. Measured on tire (EfficientNet-Lite0, K ~ 1000,
# r = 32): at d = 112 the bounds leave ~2.4 candidates per sample at ~9 % of the dense pass's
# multiply-adds; at d = 24 and 40 they need r close to d and pruning costs more than it saves.
PRUNE_MIN_DIM = 64
# 'auto' assignment: back to dense when an iteration certifies fewer than this share of samples.
PRUNE_MAX_FALLBACK = 0.25
# Candidate cache: a cached iteration that certifies fewer than this share of samples ends the
# cache's use (the next iteration is a full pass, which builds a new one).
CACHE_MAX_FALLBACK = 0.1
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
      least `PRUNE_MIN_WORK` multiply-adds, and goes back to dense for the rest of the fit if
      an iteration leaves more than `PRUNE_MAX_FALLBACK` of the samples uncertified.
    bound_rank: r, the dimension of the projection behind the bounds (pruned only).
    n_candidates: C, components scored exactly per sample (pruned passes and the cache).
    candidate_cache: reuse each sample's C best components of a full assignment pass in the
      next iterations, certified against bounds on how far the parameters moved since
      (`glad_jax.mixture.pruned`; same labels, no K-wide work while it holds); a cached
      iteration that leaves more than `CACHE_MAX_FALLBACK` of the samples uncertified makes the
      next one a full pass again. Off by default: on tire's layer 1 (860k samples, K ~ 1000)
      the many small clusters move too far between early iterations for any cached candidate
      to certify (every sample fell back), so it only pays late in long fits.
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
  candidate_cache: bool = False

  def replace(self, **changes) -> "KMLEConfig":
    return dataclasses.replace(self, **changes)


@struct.dataclass
class MixtureStats:
  """Diagnostics of one step.

  Attributes:
    counts: array of shape (K,), samples (soft counts for EM) per component in this step.
    loglik: shape (), mean over samples of log sum_k pi_k N(u; k) under the *input* mixture.
    class_loglik: shape (), mean over samples of max_k log pi_k N(u; k) under the input
      mixture: the classification (complete-data) log-likelihood that K-MLE maximises.
    n_live: shape (), int32, live components of the output mixture.
    n_failed: shape (), int32, components large enough to keep but whose covariance was not
      numerically positive definite (dropped too; only plausible without OAS).
    n_fallback: shape (), int32, samples the pruned assignment could not certify (scored
      densely); 0 for the dense assignment and for EM.
  """

  counts: jax.Array
  loglik: jax.Array
  class_loglik: jax.Array
  n_live: jax.Array
  n_failed: jax.Array
  n_fallback: jax.Array


@dataclasses.dataclass(frozen=True)
class FitInfo:
  """What happened during a fit.

  Attributes:
    n_iter: iterations run.
    converged: True when the tolerance was met before ``max_iter``.
    loglik: per iteration, the monitored mean log-likelihood (`objective`) of the mixture that
      entered the iteration.
    mixture_loglik: per iteration, mean log sum_k pi_k N(u; k).
    class_loglik: per iteration, mean max_k log pi_k N(u; k).
    n_live: per iteration, the number of components alive after its update.
    objective: 'classification' (K-MLE) or 'mixture' (EM): which curve `loglik` is.
    assignment: per iteration, how Eq. 1 was computed: 'dense', 'pruned' (projected bounds) or
      'cached' (candidates of an earlier pass); see `KMLEConfig`. EM: 'soft'.
    n_fallback: per iteration, samples a pruned or cached pass scored densely (0 when dense).
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


# ----------------------------------------------------------------------------------------------
# Pure pieces: sufficient statistics (E / assignment step) and the M-step (Eq. 2-3, 9).
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class SufficientStats:
  """Sums over samples, taken about a reference point c_k per component; add them across chunks
  and devices (every field is a sum).

  Attributes:
    counts: array of shape (K,), sum_i r_ik (r = 1/0 for K-MLE, responsibilities for EM).
    sums: array of shape (K, d), sum_i r_ik (u_i - c_k).
    scatter: array of shape (K, d, d), sum_i r_ik (u_i - c_k)(u_i - c_k)^T.
    loglik: shape (), sum of log sum_k pi_k N(u; k) over valid samples.
    class_loglik: shape (), sum of max_k log pi_k N(u; k) over valid samples.
    n_samples: shape (), number of valid samples.
    n_fallback: shape (), int32, samples the pruned assignment scored densely (0 otherwise).
  """

  counts: jax.Array
  sums: jax.Array
  scatter: jax.Array
  loglik: jax.Array
  class_loglik: jax.Array
  n_samples: jax.Array
  n_fallback: jax.Array


def _two_sum(s, c, v):
  """Kahan-compensated s + v (c carries the lost low-order bits): exact-ish float32 totals."""
  y = v - c
  t = s + y
  return t, (t - s) - y


def _chunked(x, mask, chunk_size):
  n, d = x.shape
  cs = min(chunk_size, n)
  return x.reshape(n // cs, cs, d), mask.reshape(n // cs, cs), cs


def assignment_pass(params: tuple[jax.Array, jax.Array], x: jax.Array, mask: jax.Array, *,
                    chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The assignment step, Eq. 1, chunked: labels and log-likelihood sums.

  Args:
    params: (w, b) from `gaussian.log_joint_params`, shapes (F + d + 1, K) and (K,).
    x: array of shape (N, d), N a multiple of chunk_size (or N <= chunk_size).
    mask: array of shape (N,), bool, False on padding rows.
    chunk_size: rows per chunk.

  Returns:
    z: array of shape (N,), int32, the component of each sample; K on padding rows.
    loglik: shape (), sum over valid rows of log sum_k pi_k N(u; k).
    class_loglik: shape (), sum over valid rows of max_k log pi_k N(u; k).
  """
  w, b = params
  k = b.shape[0]
  xs, ms, _ = _chunked(x, mask, chunk_size)
  w_pieces = split_rows(w, x.shape[1])     # split once, outside the loop: one matmul per band

  def body(carry, inputs):
    ll, ll_c, cl, cl_c = carry
    xb, mb = inputs
    lj = log_joint(xb, w_pieces, b)        # (cs, K): log pi_k + log N(u; k)
    # Eq. 1 with the likelihood-correct sign: argmax_k log pi_k N(u; k) is
    # argmin_k maha + log|Sigma_k| - 2 log pi_k (the paper prints "+ 2 log pi_k", which would
    # favour *small* clusters and does not maximise the complete log-likelihood).
    z = jnp.where(mb, jnp.argmax(lj, axis=1), k).astype(jnp.int32)
    ll, ll_c = _two_sum(ll, ll_c, jnp.sum(jnp.where(mb, jax.nn.logsumexp(lj, axis=1), 0.0)))
    cl, cl_c = _two_sum(cl, cl_c, jnp.sum(jnp.where(mb, jnp.max(lj, axis=1), 0.0)))
    return (ll, ll_c, cl, cl_c), z

  zero = jnp.zeros((), x.dtype)
  (ll, _, cl, _), z = jax.lax.scan(body, (zero, zero, zero, zero), (xs, ms))
  return z.reshape(-1), ll, cl


def _tile_size(n: int, k: int) -> int:
  # Rows per tile of `cluster_moments`: about n / (4 k) (so the per-cluster padding adds <= ~25%
  # rows), a power of two in [8, 128].
  return int(min(128, max(8, 2 ** int(math.log2(max(1, n // (4 * k)))))))


def cluster_moments(x: jax.Array, z: jax.Array, shift: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Hard-assignment counts, sums and scatter matrices about `shift`, as matmuls (Eq. 2-3).

  A scatter-add of every sample's d x d outer product costs N d^2 memory operations, slower on
  CPU than the whole assignment matmul. Instead the samples are sorted by cluster, each cluster's
  rows padded to whole tiles of T rows, and every tile's Gram matrix is one small matmul
  (batched); only the (N / T + K) tile Grams are scatter-added. The differences u - c_k to the
  component's previous mean c_k are what is summed, so E[(u - c)(u - c)^T] - delta delta^T has
  no float32 cancellation to speak of (delta = the mean's move in this step).

  Args:
    x: array of shape (N, d).
    z: array of shape (N,), int32, component of each row; K marks rows to ignore.
    shift: array of shape (K, d), the reference points c_k.

  Returns:
    counts (K,), sums (K, d) of u - c_k, scatter (K, d, d) of (u - c_k)(u - c_k)^T.
  """
  n, d = x.shape
  k = shift.shape[0]
  tile = _tile_size(n, k)
  valid = z < k
  zc = jnp.minimum(z, k - 1)
  diff = jnp.where(valid[:, None], x - shift[zc], 0.0)
  sums = jax.ops.segment_sum(diff, zc, num_segments=k)
  group = max(1, min(-(-n // tile) + k, (64 << 20) // (4 * d * max(d, tile))))  # ~64 MiB per step
  layout = tile_layout(z, k, tile, multiple=group)
  n_groups = layout.n_tiles // group
  buf = jnp.zeros((layout.n_tiles * tile, d), x.dtype).at[layout.dest].set(
      diff[layout.order], mode="drop", unique_indices=True)

  def body(acc, inputs):
    b, o = inputs
    grams = jnp.einsum("gtd,gte->gde", b, b, precision=_HIGHEST)
    return acc.at[o].add(grams, mode="drop"), None           # owner k: an unused tile

  scatter, _ = jax.lax.scan(body, jnp.zeros((k, d, d), x.dtype),
                            (buf.reshape(n_groups, group, tile, d),
                             layout.owner.reshape(n_groups, group)))
  return layout.counts.astype(x.dtype), sums, scatter


def soft_moments_pass(params: tuple[jax.Array, jax.Array], x: jax.Array, mask: jax.Array, *,
                      chunk_size: int) -> SufficientStats:
  """E-step of EM, chunked: responsibility-weighted raw moments about the origin.

  Per chunk, ``r^T [u_i u_j, u, 1]`` (one matmul per feature band) gives every component's raw
  second moments, sums and soft count at once.

  Args:
    params: (w, b) from `gaussian.log_joint_params`.
    x: array of shape (N, d), N a multiple of chunk_size (or N <= chunk_size).
    mask: array of shape (N,), bool, False on padding rows.
    chunk_size: rows per chunk.

  Returns:
    `SufficientStats` with reference points c_k = 0.
  """
  w, b = params
  k = b.shape[0]
  d = x.shape[1]
  xs, ms, cs = _chunked(x, mask, chunk_size)
  w_pieces = split_rows(w, d)

  def body(carry, inputs):
    moments, ll, ll_c, cl, cl_c = carry
    xb, mb = inputs
    lj = log_joint(xb, w_pieces, b)
    lse = jax.nn.logsumexp(lj, axis=1)
    resp = jnp.exp(lj - lse[:, None]) * mb[:, None]
    feats = quadratic_blocks(xb) + [xb, jnp.ones((cs, 1), x.dtype)]
    moments = [m + jnp.dot(resp.T, f, precision=_HIGHEST) for m, f in zip(moments, feats)]
    ll, ll_c = _two_sum(ll, ll_c, jnp.sum(jnp.where(mb, lse, 0.0)))
    cl, cl_c = _two_sum(cl, cl_c, jnp.sum(jnp.where(mb, jnp.max(lj, axis=1), 0.0)))
    return (moments, ll, ll_c, cl, cl_c), None

  zero = jnp.zeros((), x.dtype)
  init = ([jnp.zeros((k, p.shape[0]), x.dtype) for p in w_pieces], zero, zero, zero, zero)
  (moments, ll, _, cl, _), _ = jax.lax.scan(body, init, (xs, ms))
  t = quadratic_size(d)
  moments = jnp.concatenate(moments, axis=1)
  return SufficientStats(counts=moments[:, -1], sums=moments[:, t:t + d],
                         scatter=unpack_quadratic(moments[:, :t], d), loglik=ll,
                         class_loglik=cl, n_samples=jnp.sum(mask.astype(x.dtype)),
                         n_fallback=jnp.zeros((), jnp.int32))


def sufficient_statistics(mixture: GaussianMixture, x: jax.Array, mask: jax.Array, *,
                          hard: bool, chunk_size: int, basis: jax.Array | None = None,
                          n_candidates: int = 16) -> SufficientStats:
  """One pass over (this device's) samples: Eq. 1 (hard) or responsibilities (soft), summed.

  Args:
    mixture: the current mixture (K rows).
    x: array of shape (N, d), N a multiple of chunk_size (or N <= chunk_size).
    mask: array of shape (N,), bool, False on padding rows (they contribute nothing).
    hard: True for K-MLE (each sample counts for its argmax component only; statistics about
      the previous means), False for EM (responsibilities; raw moments about the origin).
    chunk_size: rows per chunk.
    basis: hard only: an array of shape (d, r) selects the pruned assignment
      (`glad_jax.mixture.pruned`, bounds through this projection); None the dense one.
    n_candidates: pruned only: components scored exactly per sample.

  Returns:
    `SufficientStats`; reference points: ``mixture.means`` if hard, else 0.
  """
  return _statistics(mixture, x, mask, hard=hard, chunk_size=chunk_size, basis=basis,
                     n_candidates=n_candidates)[0]


def _hard_assignment(mixture, x, mask, basis, cache, *, chunk_size, n_candidates, refresh
                     ) -> pruned.Assignment:
  """Eq. 1 by the cheapest exact route available (see `KMLEConfig.assignment`): the candidates
  of an earlier pass (`cache`), projected bounds (`basis`), or all K scores."""
  if cache is not None:
    return pruned.cached_assignment_pass(mixture, cache, x, mask, chunk_size=chunk_size)
  if basis is not None:
    return pruned_assignment_pass(mixture, basis, x, mask, chunk_size=chunk_size,
                                  n_candidates=n_candidates, with_cache=refresh)
  if refresh:
    return pruned.dense_candidates_pass(mixture, x, mask, chunk_size=chunk_size,
                                        n_candidates=n_candidates)
  z, ll, cl = assignment_pass(log_joint_params(mixture), x, mask, chunk_size=chunk_size)
  return pruned.Assignment(z, ll, cl, jnp.zeros((), jnp.int32), None)


def _statistics(mixture, x, mask, *, hard, chunk_size, basis=None, cache=None,
                n_candidates=16, refresh=False
                ) -> tuple[SufficientStats, pruned.CandidateCache | None]:
  """`sufficient_statistics`, plus the candidate cache of the assignment when `refresh`."""
  if not hard:
    return soft_moments_pass(log_joint_params(mixture), x, mask, chunk_size=chunk_size), None
  a = _hard_assignment(mixture, x, mask, basis, cache, chunk_size=chunk_size,
                       n_candidates=n_candidates, refresh=refresh)
  counts, sums, scatter = cluster_moments(x, a.labels, mixture.means)
  return SufficientStats(counts=counts, sums=sums, scatter=scatter, loglik=a.loglik,
                         class_loglik=a.class_loglik, n_samples=jnp.sum(mask.astype(x.dtype)),
                         n_fallback=a.n_fallback), a.cache


def m_step(stats: SufficientStats, shift: jax.Array | float, *, use_oas: bool,
           reg_covar: jax.Array | float, min_cluster_size: float
           ) -> tuple[GaussianMixture, jax.Array]:
  """Eq. 2-3 (and Eq. 9) from summed statistics, with pruning by masking.

  Args:
    stats: `SufficientStats` (K components, dimension d), taken about `shift`.
    shift: array of shape (K, d) (or a scalar), the reference points of `stats`.
    use_oas: shrink each covariance with OAS, n = the cluster's (soft) count.
    reg_covar: absolute diagonal floor added to every covariance.
    min_cluster_size: components with a smaller count are masked (weight 0).

  Returns:
    the new mixture (K rows, masked rows: weight 0, mean 0, identity Cholesky factor) and the
    number of components dropped because their covariance was not positive definite.
  """
  counts = stats.counts
  dim = stats.sums.shape[1]
  safe = jnp.where(counts > 0, counts, 1.0)
  delta = stats.sums / safe[:, None]                          # mean - shift
  means = shift + delta                                       # Eq. 2
  # Eq. 3: E[(u - c)(u - c)^T] - (mu - c)(mu - c)^T.
  cov = stats.scatter / safe[:, None, None] - delta[:, :, None] * delta[:, None, :]
  cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))
  if use_oas:
    cov = oas_covariance(cov, counts)
  eye = jnp.eye(dim, dtype=cov.dtype)
  chol = jnp.linalg.cholesky(cov + reg_covar * eye)
  big_enough = counts >= min_cluster_size
  finite = jnp.all(jnp.isfinite(chol), axis=(-2, -1))
  live = big_enough & finite
  kept = jnp.where(live, counts, 0.0)
  weights = kept / jnp.maximum(jnp.sum(kept), 1e-30)          # Eq. 2, over the kept clusters
  mixture = GaussianMixture(weights=weights,
                            means=jnp.where(live[:, None], means, 0.0),
                            cov_chol=jnp.where(live[:, None, None], chol, eye))
  return mixture, jnp.sum(big_enough & ~finite).astype(jnp.int32)


def _step(mixture: GaussianMixture, x: jax.Array, mask: jax.Array, reg_covar, min_cluster_size,
          basis: jax.Array | None = None, cache: pruned.CandidateCache | None = None, *,
          hard: bool, use_oas: bool, chunk_size: int, n_candidates: int = 16,
          refresh: bool = False, mesh: Mesh | None = None
          ) -> tuple[GaussianMixture, MixtureStats, pruned.CandidateCache | None]:
  """One iteration; with `refresh`, also the candidate cache of its assignment pass."""
  def local_stats(params, x, mask, cache):
    mixture, basis = params
    return _statistics(mixture, x, mask, hard=hard, chunk_size=chunk_size, basis=basis,
                       cache=cache, n_candidates=n_candidates, refresh=refresh)

  specs = None if mesh is None else pruned.cache_partition_specs(sharding._axis(mesh))
  fresh = refresh and hard and cache is None
  stats, new_cache = sharding.data_parallel(
      local_stats, mesh, state_in=None if cache is None else specs,
      state_out=specs if fresh else None)((mixture, basis), x, mask, cache)
  new, n_failed = m_step(stats, mixture.means if hard else 0.0, use_oas=use_oas,
                         reg_covar=reg_covar, min_cluster_size=min_cluster_size)
  n = jnp.maximum(stats.n_samples, 1.0)
  return new, MixtureStats(counts=stats.counts, loglik=stats.loglik / n,
                           class_loglik=stats.class_loglik / n,
                           n_live=jnp.sum(new.weights > 0).astype(jnp.int32), n_failed=n_failed,
                           n_fallback=stats.n_fallback), new_cache


def _pad_for_chunks(x, mask, chunk_size):
  n = x.shape[0]
  if mask is None:
    mask = jnp.ones((n,), bool)
  cs = min(chunk_size, n)
  n_pad = sharding.padded_size(n, cs)
  if n_pad != n:
    x = jnp.pad(x, ((0, n_pad - n), (0, 0)))
    mask = jnp.pad(mask, (0, n_pad - n))
  return x, mask, cs


def kmle_step(mixture: GaussianMixture, x: jax.Array, mask: jax.Array | None = None, *,
              use_oas: bool = True, reg_covar: jax.Array | float = 0.0,
              min_cluster_size: int = 2, chunk_size: int = 1024,
              basis: jax.Array | None = None, n_candidates: int = 16
              ) -> tuple[GaussianMixture, MixtureStats]:
  """One K-MLE iteration: assignment (Eq. 1), update (Eq. 2-3), OAS (Eq. 9), pruning.

  Pure and jittable (`use_oas`, `chunk_size`, `n_candidates` static). No centring or rescaling
  happens here.

  Args:
    mixture: current mixture, K rows (masked rows allowed).
    x: array of shape (N, d).
    mask: optional array of shape (N,), bool; False rows are ignored.
    use_oas: shrink the covariances (Eq. 9).
    reg_covar: absolute floor added to the diagonal of every covariance.
    min_cluster_size: clusters with fewer samples are masked out of the new mixture.
    chunk_size: samples per chunk of the pass (memory O(chunk_size * d^2)).
    basis: optional array of shape (d, r): assign with certified candidate pruning through
      this projection (`glad_jax.mixture.pruned`; same labels, fewer flops at large d), e.g.
      `pruned.projection_basis(x, mask, 32)`. None: dense assignment.
    n_candidates: with `basis`, components scored exactly per sample (< K).

  Returns:
    (new mixture with K rows, `MixtureStats` of this step; its likelihoods are those of the
    input mixture).

  References:
    Artola et al., GLAD (WACV 2023), Eq. 1-3 and 9; Nielsen, k-MLE (ICASSP 2012).
  """
  x, mask, cs = _pad_for_chunks(x, mask, chunk_size)
  new, stats, _ = _step(mixture, x, mask, reg_covar, min_cluster_size, basis, hard=True,
                        use_oas=use_oas, chunk_size=cs, n_candidates=n_candidates)
  return new, stats


# ----------------------------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------------------------


def _kmeans_pp(key: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """k-means++ (D^2) seeding: k rows of `points` (m, d), each drawn with prob. ~ distance^2."""
  m = points.shape[0]
  keys = jax.random.split(key, k)
  first = points[jax.random.randint(keys[0], (), 0, m)]
  centers = jnp.zeros((k,) + points.shape[1:], points.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(points - first), axis=1)

  def body(i, carry):
    centers, d2 = carry
    # If every point coincides with a centre (duplicated data), fall back to uniform: the
    # duplicate components then lose every tie in Eq. 1 and are dropped after one step.
    logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    logits = jnp.where(jnp.any(d2 > 0), logits, 0.0)
    c = points[jax.random.categorical(keys[i], logits)]
    return centers.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(points - c), axis=1))

  centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
  return centers


@functools.partial(jax.jit, static_argnames=("n_components", "n_samples", "init_sample_size"))
def kmle_init(key: jax.Array, x: jax.Array, n_components: int, *, n_samples: int | None = None,
              init_sample_size: int = 10_000, reg_covar: jax.Array | float = 0.0
              ) -> GaussianMixture:
  """Initial mixture: k-means++ means on a random subsample, the global covariance, pi = 1/K.

  Seeding runs on ``min(N, max(init_sample_size, 4 K))`` rows drawn without replacement, so its
  cost O(init_sample_size * K * d) does not grow with N (N ~ 1e6, K = 1000 is fine). Every
  component starts with the covariance of the whole data set (plus ``reg_covar * I``), which
  makes the first assignment a Mahalanobis nearest-mean rule.

  Args:
    key: a `jax.random` key.
    x: array of shape (N_rows, d); only the first `n_samples` rows are data (the rest is
      padding, e.g. from `sharding.place_samples`).
    n_components: K (<= n_samples).
    n_samples: number of data rows (default: all rows).
    init_sample_size: size of the seeding subsample.
    reg_covar: absolute floor added to the diagonal of the initial covariance.

  Returns:
    a `GaussianMixture` with K components.
  """
  n = x.shape[0] if n_samples is None else n_samples
  d = x.shape[1]
  m = min(n, max(init_sample_size, 4 * n_components))
  k_sub, k_pp = jax.random.split(key)
  # Drawn among range(n) (not the padded row count): the same seed gives the same subsample
  # whatever the padding, hence the same model sharded or not.
  idx = jax.random.choice(k_sub, n, (m,), replace=False)
  means = _kmeans_pp(k_pp, x[idx], n_components)
  valid = (jnp.arange(x.shape[0]) < n)[:, None]
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0) / n
  xc = jnp.where(valid, x - mean, 0.0)
  cov = jnp.dot(xc.T, xc, precision=_HIGHEST) / n + reg_covar * jnp.eye(d, dtype=x.dtype)
  chol = jnp.linalg.cholesky(cov)
  return GaussianMixture(weights=jnp.full((n_components,), 1.0 / n_components, x.dtype),
                         means=means,
                         cov_chol=jnp.broadcast_to(chol, (n_components, d, d)))


# ----------------------------------------------------------------------------------------------
# Host driver (shared with EM): validation, placement, centring, loop, pruning.
# ----------------------------------------------------------------------------------------------


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


def _bucket_size(k: int, bucket: int) -> int:
  return -(-k // bucket) * bucket


def _validate_samples(x: Any) -> Any:
  """Checks x once, at the edge; returns it as float32 (NumPy or JAX, as given)."""
  if isinstance(x, jax.Array):
    xp = jnp
  else:
    xp = np
    try:
      x = np.asarray(x)
    except (TypeError, ValueError) as e:
      raise ValueError(f"x must be a numeric array of shape (n_samples, n_features): {e}") from e
  if x.ndim != 2:
    raise ValueError(f"x must be a 2-D array of shape (n_samples, n_features), got shape "
                     f"{tuple(x.shape)}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == np.bool_):
    raise ValueError(f"x must hold real numbers, got dtype {x.dtype}")
  n, d = x.shape
  if n == 0 or d == 0:
    raise ValueError(f"x is empty: got shape {tuple(x.shape)}")
  with np.errstate(over="ignore"):   # values beyond float32 become inf and are reported below
    x = x.astype(xp.float32)
  bad = ~xp.isfinite(x)
  n_bad = int(xp.sum(bad))
  if n_bad:
    row = int(xp.argmax(xp.any(bad, axis=1)))
    raise ValueError(f"x contains {n_bad} non-finite values (NaN or inf) in float32, the first "
                     f"in row {row}")
  if n < d:
    raise ValueError(f"x has fewer samples ({n}) than dimensions ({d}): a full-covariance "
                     f"mixture needs n_samples >= n_features")
  return x


def _validate_config(config: KMLEConfig, n: int) -> None:
  k = config.n_components
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"n_components must be a positive integer, got {k!r}")
  if k > n:
    raise ValueError(f"n_components ({k}) exceeds the number of samples ({n})")
  if not isinstance(config.max_iter, (int, np.integer)) or config.max_iter < 1:
    raise ValueError(f"max_iter must be a positive integer, got {config.max_iter!r}")
  if not config.tol >= 0:
    raise ValueError(f"tol must be >= 0, got {config.tol!r}")
  if not config.reg_covar >= 0:
    raise ValueError(f"reg_covar must be >= 0, got {config.reg_covar!r}")
  if config.min_cluster_size < 2:
    raise ValueError(f"min_cluster_size must be >= 2 (a 1-sample cluster has zero scatter), got "
                     f"{config.min_cluster_size!r}")
  if config.chunk_size is not None and (not isinstance(config.chunk_size, (int, np.integer))
                                        or config.chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None, got "
                     f"{config.chunk_size!r}")
  if not isinstance(config.bucket, (int, np.integer)) or config.bucket < 1:
    raise ValueError(f"bucket must be a positive integer, got {config.bucket!r}")
  if not isinstance(config.init_sample_size, (int, np.integer)) or config.init_sample_size < 1:
    raise ValueError(f"init_sample_size must be a positive integer, got "
                     f"{config.init_sample_size!r}")
  if config.assignment not in ("auto", "dense", "pruned"):
    raise ValueError(f"assignment must be 'auto', 'dense' or 'pruned', got {config.assignment!r}")
  for name in ("bound_rank", "n_candidates"):
    value = getattr(config, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if config.candidate_cache not in (True, False):
    raise ValueError(f"candidate_cache must be True or False, got "
                     f"{config.candidate_cache!r}")


def _validate_init(init: GaussianMixture, d: int) -> GaussianMixture:
  w, mu, chol = (np.asarray(a, np.float32) for a in (init.weights, init.means, init.cov_chol))
  k = w.shape[0] if w.ndim == 1 else -1
  if w.ndim != 1 or mu.shape != (k, d) or chol.shape != (k, d, d):
    raise ValueError(f"init must have weights (K,), means (K, {d}), cov_chol (K, {d}, {d}); got "
                     f"{w.shape}, {mu.shape}, {chol.shape}")
  if not (np.all(np.isfinite(w)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(chol))):
    raise ValueError("init contains non-finite values")
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError("init weights must be >= 0 with a positive sum")
  diag = np.diagonal(chol, axis1=1, axis2=2)
  if np.any(diag[w > 0] <= 0):
    raise ValueError("init cov_chol must be lower Cholesky factors with a positive diagonal")
  return GaussianMixture(weights=jnp.asarray(w / w.sum()), means=jnp.asarray(mu),
                         cov_chol=jnp.asarray(np.tril(chol)))


@jax.jit
def _centre(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Global mean (two-pass, float32-accurate), centred rows (padding kept at 0), mean variance."""
  n = jnp.sum(mask.astype(x.dtype))
  valid = mask[:, None]
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0) / n
  mean = mean + jnp.sum(jnp.where(valid, x - mean, 0.0), axis=0) / n
  xc = jnp.where(valid, x - mean, 0.0)
  return xc, mean, jnp.sum(jnp.square(xc)) / (n * x.shape[1])


@functools.partial(jax.jit, static_argnames=("size",))
def _resize(mixture: GaussianMixture, size: int) -> GaussianMixture:
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


@functools.lru_cache(maxsize=32)
def _compiled_step(hard: bool, mesh: Mesh | None, use_oas: bool, chunk_size: int,
                   n_candidates: int = 16, refresh: bool = False):
  """``step(mixture, x, mask, reg_covar, min_cluster_size, basis, cache) -> (mixture,
  MixtureStats, new cache)``, jitted once per configuration (and by jit per shape and per
  None-ness of basis and cache: see `_hard_assignment`)."""
  return jax.jit(functools.partial(_step, hard=hard, use_oas=use_oas, chunk_size=chunk_size,
                                   n_candidates=n_candidates, refresh=refresh, mesh=mesh))


def _use_pruning(config: KMLEConfig, hard: bool, d: int, k: int, iteration: int,
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


def fit_mixture(x: Any, config: KMLEConfig, key: jax.Array, *, hard: bool,
                mesh: Mesh | None = None, callback: Callback | None = None,
                init: GaussianMixture | None = None) -> tuple[GaussianMixture, FitInfo]:
  """Shared host driver of `fit_kmle` (hard=True) and `em.fit_em` (hard=False)."""
  x = _validate_samples(x)
  n, d = x.shape
  _validate_config(config, n)
  if init is not None:
    init = _validate_init(init, d)
    if init.n_components > n:
      raise ValueError(f"init has {init.n_components} components, more than the number of "
                       f"samples ({n})")
  n_dev = sharding.mesh_size(mesh)
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  cs = config.chunk_size or default_chunk_size(d, platform)
  cs = min(cs, sharding.padded_size(-(-n // n_dev), 8))   # no more padding than needed
  xd, mask = sharding.place_samples(x, mesh, multiple=cs)
  xc, centre, mean_var = _centre(xd, mask)
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
  mixture = sharding.replicate(_resize(mixture, _bucket_size(k0, config.bucket)), mesh)
  n_cand = int(config.n_candidates)
  steps = {refresh: _compiled_step(hard, mesh, bool(config.use_oas), cs, n_cand, refresh)
           for refresh in (False, True)}
  min_size = jnp.float32(config.min_cluster_size)
  caching = hard and bool(config.candidate_cache)
  cache = None
  # Early in a fit the parameters move too much for a cache to last: after a cache that failed
  # at once, wait 1, 2, 4, ... (at most 16) full iterations before building the next one.
  cache_wait, backoff, cache_uses = 0, 1, 0
  # The bounds' projection: the data's leading principal axes, fixed for the whole fit.
  basis = None
  if _use_pruning(config, hard, d, mixture.n_components, 2, n):
    basis = sharding.replicate(
        jax.jit(projection_basis, static_argnums=2)(xc, mask, min(int(config.bound_rank), d)),
        mesh)

  logliks, mix_ll, class_ll, lives, modes, fallbacks = [], [], [], [], [], []
  converged = False
  prev = None
  n_live = k0
  for it in range(1, config.max_iter + 1):
    prune = (cache is None and basis is not None
             and _use_pruning(config, hard, d, mixture.n_components, it, n))
    # The first iteration starts from kmle_init: its parameters move too far for its candidates
    # to certify anything afterwards.
    refresh = (caching and cache is None and it > 1 and cache_wait == 0
               and mixture.n_components > n_cand)
    mode = "cached" if cache is not None else "pruned" if prune else "dense" if hard else "soft"
    mixture, stats, new_cache = steps[refresh](mixture, xc, mask, reg, min_size,
                                               basis if prune else None, cache)
    s = jax.device_get(stats)
    n_live = int(s.n_live)
    mix_ll.append(float(s.loglik))
    class_ll.append(float(s.class_loglik))
    cur = class_ll[-1] if hard else mix_ll[-1]
    logliks.append(cur)
    lives.append(n_live)
    modes.append(mode)
    fallbacks.append(int(s.n_fallback))
    if prune and config.assignment == "auto" and fallbacks[-1] > PRUNE_MAX_FALLBACK * n:
      basis = None   # the bounds are too loose on this data: dense is cheaper from here on
    if refresh:
      cache, cache_uses = new_cache, 0
    elif mode == "cached" and fallbacks[-1] > CACHE_MAX_FALLBACK * n:
      cache = None   # the parameters moved too far: back to full passes
      cache_wait = backoff if cache_uses == 0 else 0
      backoff = min(2 * backoff, 16) if cache_uses == 0 else 1
    elif mode == "cached":
      cache_uses += 1
    elif cache_wait > 0:
      cache_wait -= 1
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
    prev = cur
    target = _bucket_size(n_live, config.bucket)
    if target < mixture.n_components:
      # Dead rows leave the state: the step recompiles for the smaller bucket only. The cache's
      # component indices refer to the old rows.
      mixture = sharding.replicate(_resize(mixture, target), mesh)
      cache = None

  final = _resize(mixture, n_live)
  final = final.replace(means=final.means + centre)
  if mesh is not None:
    final = jax.device_put(final, mesh.devices.flat[0])
  info = FitInfo(n_iter=len(logliks), converged=converged, loglik=tuple(logliks),
                 mixture_loglik=tuple(mix_ll), class_loglik=tuple(class_ll),
                 n_live=tuple(lives), objective="classification" if hard else "mixture",
                 assignment=tuple(modes), n_fallback=tuple(fallbacks))
  return final, info


def fit_kmle(x: Any, config: KMLEConfig = KMLEConfig(), key: jax.Array | None = None,
             mesh: Mesh | None = None, callback: Callback | None = None, *,
             init: GaussianMixture | None = None) -> tuple[GaussianMixture, FitInfo]:
  """Fit the global mixture with K-MLE (Section 3.1) until convergence.

  Stopping rule (Section 4.1): relative change of the mean log-likelihood between two
  iterations below ``config.tol``, or ``config.max_iter`` iterations. The monitored curve is
  the *classification* log-likelihood, mean_i max_k log pi_k N(u_i; k): it is the objective
  K-MLE maximises (Nielsen's k-MLE), it is non-decreasing without OAS, and it stops changing
  exactly when the assignments do. The mixture log-likelihood is recorded in `FitInfo` too.

  Args:
    x: array of shape (N, d), NumPy or JAX; float32 is used.
    config: a `KMLEConfig`.
    key: `jax.random` key of the initialisation (default: key 0).
    mesh: optional 1-D mesh (`glad_jax.sharding.make_mesh`): samples are split over it.
    callback: optional ``callback(iteration, mean_loglik, n_live)`` after every iteration.
    init: optional starting mixture (replaces `kmle_init`).

  Returns:
    (mixture with only the live components, `FitInfo`).

  Raises:
    ValueError: bad x (wrong ndim, empty, NaN/inf, N < d), bad config, K > N, or every
      component dropped.
  """
  key = jax.random.key(0) if key is None else key
  return fit_mixture(x, config, key, hard=True, mesh=mesh, callback=callback, init=init)
