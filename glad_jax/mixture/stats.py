"""Sufficient statistics of the mixture fits: the assignment step (Eq. 1) and the E-step, summed.

One pass over (one device's) samples gives everything the update (Eq. 2-3, `mstep`) needs:
per component the count, the sum and the scatter matrix of its samples, plus the mean
log-likelihoods the stopping rule monitors.

* K-MLE (hard): every sample goes to its argmax component (Eq. 1). `assignment_pass` scores all
  K components chunk by chunk (`gaussian.joint_scorer`: the expanded quadratic form as float32
  matmuls) and `pruned.pruned_assignment_pass` the few candidates that projected bounds leave;
  `cluster_moments` then sums the samples grouped by label, about the previous means.
* EM (soft): `soft_moments_pass`, responsibility-weighted raw moments, one matmul per chunk.

Memory O(N + K d^2): no N x K x d array; an (chunk, K) score block at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from glad_jax.mixture import pruned
from glad_jax.mixture.gaussian import (GaussianMixture, best_component, joint_scorer, log_joint,
                                       log_joint_params, logsumexp_from_max, quadratic_blocks,
                                       quadratic_size, split_rows, unpack_quadratic)
from glad_jax.mixture.tiles import tile_layout

_HIGHEST = jax.lax.Precision.HIGHEST


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


def assignment_pass(mixture: GaussianMixture, x: jax.Array, mask: jax.Array, *,
                    chunk_size: int, mixture_loglik: bool = True
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The assignment step, Eq. 1, chunked: labels and log-likelihood sums.

  Per chunk one (chunk, F + d + 1) x (F + d + 1, K) float32 matmul gives all K scores
  s_k(u) = log pi_k + log N(u; mu_k, Sigma_k) (`gaussian.joint_scorer`); the label is the first
  index of their maximum (`gaussian.best_component`), as ``jnp.argmax``.

  Args:
    mixture: the current mixture (K rows, masked rows allowed).
    x: array of shape (N, d), N a multiple of chunk_size (or N <= chunk_size).
    mask: array of shape (N,), bool, False on padding rows.
    chunk_size: rows per chunk.
    mixture_loglik: False skips the logsumexp over K (one exp per score: ~10 % of the pass at
      d = 40 on a CPU), which K-MLE does not need; loglik is then NaN.

  Returns:
    z: array of shape (N,), int32, the component of each sample; K on padding rows.
    loglik: shape (), sum over valid rows of log sum_k pi_k N(u; k) (NaN, see above).
    class_loglik: shape (), sum over valid rows of max_k log pi_k N(u; k).
  """
  k = mixture.n_components
  xs, ms, _ = _chunked(x, mask, chunk_size)
  score = joint_scorer(mixture)            # weights computed once, outside the loop

  def body(carry, inputs):
    ll, ll_c, cl, cl_c = carry
    xb, mb = inputs
    lj = score(xb)                         # (cs, K): log pi_k + log N(u; k)
    # Eq. 1 with the likelihood-correct sign: argmax_k log pi_k N(u; k) is
    # argmin_k maha + log|Sigma_k| - 2 log pi_k (the paper prints "+ 2 log pi_k", which would
    # favour *small* clusters and does not maximise the complete log-likelihood).
    z, best = best_component(lj)
    z = jnp.where(mb, z, k).astype(jnp.int32)
    if mixture_loglik:
      ll, ll_c = _two_sum(ll, ll_c, jnp.sum(jnp.where(mb, logsumexp_from_max(lj, best), 0.0)))
    cl, cl_c = _two_sum(cl, cl_c, jnp.sum(jnp.where(mb, best, 0.0)))
    return (ll, ll_c, cl, cl_c), z

  zero = jnp.zeros((), x.dtype)
  (ll, _, cl, _), z = jax.lax.scan(body, (zero, zero, zero, zero), (xs, ms))
  return z.reshape(-1), ll if mixture_loglik else jnp.full((), jnp.nan, x.dtype), cl


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


def hard_assignment(mixture: GaussianMixture, x: jax.Array, mask: jax.Array,
                    basis: jax.Array | None = None, *, chunk_size: int,
                    n_candidates: int = 16, mixture_loglik: bool = True) -> pruned.Assignment:
  """Eq. 1 by the exact route asked for: projected bounds when `basis` is given
  (`pruned.pruned_assignment_pass`), else all K scores (`assignment_pass`; `mixture_loglik`
  as there)."""
  if basis is not None:
    return pruned.pruned_assignment_pass(mixture, basis, x, mask, chunk_size=chunk_size,
                                         n_candidates=n_candidates)
  z, ll, cl = assignment_pass(mixture, x, mask, chunk_size=chunk_size,
                              mixture_loglik=mixture_loglik)
  return pruned.Assignment(z, ll, cl, jnp.zeros((), jnp.int32))


def statistics_and_labels(mixture: GaussianMixture, x: jax.Array, mask: jax.Array, *,
                          hard: bool, chunk_size: int, basis: jax.Array | None = None,
                          n_candidates: int = 16, mixture_loglik: bool = True
                          ) -> tuple[SufficientStats, jax.Array | None]:
  """`sufficient_statistics` and, for K-MLE, the labels of Eq. 1 (int32 (N,), K on padding rows;
  None for EM). `mixture_loglik`: see `assignment_pass` (K-MLE, dense)."""
  if not hard:
    return soft_moments_pass(log_joint_params(mixture), x, mask, chunk_size=chunk_size), None
  a = hard_assignment(mixture, x, mask, basis, chunk_size=chunk_size, n_candidates=n_candidates,
                      mixture_loglik=mixture_loglik)
  counts, sums, scatter = cluster_moments(x, a.labels, mixture.means)
  return SufficientStats(counts=counts, sums=sums, scatter=scatter, loglik=a.loglik,
                         class_loglik=a.class_loglik, n_samples=jnp.sum(mask.astype(x.dtype)),
                         n_fallback=a.n_fallback), a.labels


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
  return statistics_and_labels(mixture, x, mask, hard=hard, chunk_size=chunk_size, basis=basis,
                               n_candidates=n_candidates)[0]
