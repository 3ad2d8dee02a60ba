"""One iteration of K-MLE and of EM as pure functions (optax-like `step(state, data)`).

Both are the same three stages: sufficient statistics over the samples (`stats`: Eq. 1 hard
assignments for K-MLE, responsibilities for EM), summed across devices with one ``psum`` when
a mesh is given (`glad_jax.sharding`), then the replicated update (`mstep`: Eq. 2-3, OAS Eq. 9,
dropping of small clusters). `mixture_step` is the jitted core the host driver (`fit`) runs;
`kmle_step` and `em_step` are its user-facing forms (padding to whole chunks included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from glad_jax import sharding
from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.mstep import m_step
from glad_jax.mixture.stats import SufficientStats, statistics_and_labels


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


def mixture_step(mixture: GaussianMixture, x: jax.Array, mask: jax.Array, reg_covar,
                 min_cluster_size, basis: jax.Array | None = None, *, hard: bool, use_oas: bool,
                 chunk_size: int, n_candidates: int = 16, mesh: Mesh | None = None,
                 mixture_loglik: bool = True
                 ) -> tuple[GaussianMixture, MixtureStats, jax.Array | None, SufficientStats]:
  """One iteration of K-MLE (hard) or EM on samples already padded to whole chunks (per device).

  Args:
    mixture: current mixture, K rows (masked rows allowed); replicated on `mesh`.
    x: array of shape (N, d), N a multiple of (devices x chunk_size), split by rows on `mesh`.
    mask: bool array of shape (N,), False on padding rows.
    reg_covar: absolute floor added to the diagonal of every covariance.
    min_cluster_size: clusters with a smaller (soft) count are masked out.
    basis: hard only: (d, r) projection for the pruned assignment, or None (dense).
    hard, use_oas, chunk_size, n_candidates, mesh: static; see `kmle_step`.
    mixture_loglik: static; False (K-MLE's fit) skips the dense pass's logsumexp over K, and
      `MixtureStats.loglik` may then be NaN (`stats.assignment_pass`).

  Returns:
    (new mixture with K rows, `MixtureStats` (likelihoods of the input mixture), the labels of
    Eq. 1: int32 (N,), K on padding rows, split like x; None for EM, and the summed
    `SufficientStats` the new mixture was computed from: about the input means for K-MLE, about
    0 for EM; replicated).
  """
  def local_stats(params, x, mask, _):
    mixture, basis = params
    return statistics_and_labels(mixture, x, mask, hard=hard, chunk_size=chunk_size,
                                 basis=basis, n_candidates=n_candidates,
                                 mixture_loglik=mixture_loglik)

  rows = None if mesh is None or not hard else PartitionSpec(mesh.axis_names[0])
  stats, labels = sharding.data_parallel(local_stats, mesh, state_out=rows)(
      (mixture, basis), x, mask, None)
  new, n_failed = m_step(stats, mixture.means if hard else 0.0, use_oas=use_oas,
                         reg_covar=reg_covar, min_cluster_size=min_cluster_size)
  n = jnp.maximum(stats.n_samples, 1.0)
  return new, MixtureStats(counts=stats.counts, loglik=stats.loglik / n,
                           class_loglik=stats.class_loglik / n,
                           n_live=jnp.sum(new.weights > 0).astype(jnp.int32), n_failed=n_failed,
                           n_fallback=stats.n_fallback), labels, stats


def pad_for_chunks(x: jax.Array, mask: jax.Array | None, chunk_size: int
                   ) -> tuple[jax.Array, jax.Array, int]:
  """Zero-pads x (N, d) to whole chunks; returns (x, mask (False on padding), chunk size)."""
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
  x, mask, cs = pad_for_chunks(x, mask, chunk_size)
  new, stats, _, _ = mixture_step(mixture, x, mask, reg_covar, min_cluster_size, basis, hard=True,
                                  use_oas=use_oas, chunk_size=cs, n_candidates=n_candidates)
  return new, stats


def em_step(mixture: GaussianMixture, x: jax.Array, mask: jax.Array | None = None, *,
            use_oas: bool = True, reg_covar: jax.Array | float = 0.0,
            min_cluster_size: float = 2, chunk_size: int = 1024
            ) -> tuple[GaussianMixture, MixtureStats]:
  """One EM iteration: responsibilities (E-step), Eq. 2-3 with soft counts, OAS, pruning.

  Pure and jittable (`use_oas`, `chunk_size` static).

  Args:
    mixture: current mixture, K rows (masked rows allowed).
    x: array of shape (N, d).
    mask: optional array of shape (N,), bool; False rows are ignored.
    use_oas: shrink the covariances (Eq. 9) with n = soft count.
    reg_covar: absolute floor added to the diagonal of every covariance.
    min_cluster_size: components with a smaller soft count are masked out.
    chunk_size: samples per chunk of the pass.

  Returns:
    (new mixture with K rows, `MixtureStats` whose likelihoods are the input mixture's).
  """
  x, mask, cs = pad_for_chunks(x, mask, chunk_size)
  new, stats, _, _ = mixture_step(mixture, x, mask, reg_covar, min_cluster_size, hard=False,
                                  use_oas=use_oas, chunk_size=cs)
  return new, stats
