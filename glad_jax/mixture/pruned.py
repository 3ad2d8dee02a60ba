"""The K-MLE assignment step (Eq. 1) with certified candidate pruning, for high-dimensional features.

The dense pass (`kmle.assignment_pass`) evaluates every component for every sample:
(d (d + 1) / 2 + d + 1) K multiply-adds per sample, 6.6 M at d = 112 and K = 1024, 525 M at the
paper's WideResNet50-2 layer 3 (d = 1024). Yet a sample is won by one of a handful of components.
This pass finds them with a cheap upper bound of every score, evaluates the few best candidates
exactly and certifies that the winner is among them; the samples it cannot certify (a few
percent at most on real features) go through the dense pass. The labels are the dense pass's
(up to float32 ties between components whose scores differ by less than their rounding).

Bound. For any d x r matrix Q of rank r and any SPD Sigma, the Mahalanobis distance of a
projection never exceeds the full one:

    (Q^T e)^T (Q^T Sigma Q)^{-1} (Q^T e) <= e^T Sigma^{-1} e

(with y = Sigma^{-1/2} e and R = Sigma^{1/2} Q, the left side is the squared norm of the
orthogonal projection of y onto the range of R). With s_k(u) = log pi_k + log N(u; mu_k, Sigma_k),
the score that Eq. 1 maximises,

    U_k(u) = log pi_k - (d log 2 pi + log|Sigma_k| + m_k(Q^T u)) / 2  >=  s_k(u),

where m_k is the Mahalanobis distance of the projected Gaussian N(Q^T mu_k, Q^T Sigma_k Q). So U_k
is an r-dimensional Gaussian log-density of Q^T u plus a per-component constant, and all K bounds
of a sample cost (r (r + 1) / 2 + r + 1) K multiply-adds through the same expanded quadratic form
as the dense pass (`gaussian.log_joint`). Q holds the r leading principal axes of the data, fixed
for a fit (the directions along which the components' means spread most); any Q gives a valid
bound, a good one a tight bound.

Certificate. The components of the C largest bounds are scored exactly (direct form
||(u - mu_k)^T P_k||^2, pairs grouped by component: one (T, d) x (d, d) product per tile of T
pairs, `tiles.tile_layout`); s* is the best of them. Every other component has
s_k <= U_k <= U_(C), the C-th largest bound, so U_(C) < s* - margin proves that s*'s component is
the argmax over all K. Measured on tire's layer 3 (EfficientNet-Lite0, d = 112, K ~ 1000):
with r = 32 a sample has on average 2.4 components whose bound reaches s* (99 %: 11), so C = 16
certifies almost every sample at ~10 % of the dense pass's multiply-adds. At d = 24-40 the bound
needs r close to d and pruning does not pay (`kmle` uses it from d = 64 on, see `KMLEConfig`).

The mixture log-likelihood (a diagnostic of K-MLE, not its objective) is the logsumexp over the C
exactly scored candidates: a lower bound of the logsumexp over all K, short by at most
log(1 + (K - C) exp(U_(C) - s*)) per certified sample (negligible when certified by a margin of
tens of nats, which is the typical case).

Pure JAX, jittable, no I/O.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glad_jax.mixture.gaussian import (GaussianMixture, cholesky_log_det, log_joint,
                                       log_joint_params, precision_cholesky, split_rows)
from glad_jax.mixture.tiles import tile_layout

_HIGHEST = jax.lax.Precision.HIGHEST
# Certification margin, in nats: absolute plus relative to |s*|. It covers the float32 rounding of
# the bound (expanded form in r dimensions) and of the exact score, both orders of magnitude
# smaller; typical certification gaps are tens of nats.
_MARGIN_ABS = 1e-2
_MARGIN_REL = 1e-4


def projection_basis(x: jax.Array, mask: jax.Array, rank: int) -> jax.Array:
  """The `rank` leading principal axes of the (valid) samples, shape (d, rank), orthonormal.

  Args:
    x: array of shape (N, d), ideally centred (the fitters centre their data).
    mask: bool array of shape (N,), False on padding rows.
    rank: r <= d (static).
  """
  xm = jnp.where(mask[:, None], x, 0.0)
  n = jnp.maximum(jnp.sum(mask.astype(x.dtype)), 1.0)
  mean = jnp.sum(xm, axis=0) / n
  xc = jnp.where(mask[:, None], x - mean, 0.0)
  cov = jnp.dot(xc.T, xc, precision=_HIGHEST) / n
  _, vectors = jnp.linalg.eigh(cov)                 # ascending eigenvalues
  return vectors[:, ::-1][:, :rank]


def bound_params(mixture: GaussianMixture, basis: jax.Array
                 ) -> tuple[list[jax.Array], jax.Array]:
  """Expanded-form weights of the bounds U_k: ``log_joint(x @ basis, *bound_params) = U``.

  Args:
    mixture: K components in dimension d (masked components allowed).
    basis: array of shape (d, r), rank r.

  Returns:
    (`gaussian.split_rows` pieces of the (F_r + r + 1, K) weights, bias (K,)). A component whose
    projected covariance is not numerically positive definite gets weights 0 and bias +inf (it
    is then always a candidate, scored exactly: the bound stays valid); masked ones get -inf.
  """
  d, r = basis.shape
  # Q^T Sigma_k Q = (L_k^T Q)^T (L_k^T Q).
  lq = jnp.einsum("kji,jr->kir", mixture.cov_chol, basis, precision=_HIGHEST)    # (K, d, r)
  cov_q = jnp.einsum("kir,kis->krs", lq, lq, precision=_HIGHEST)
  chol_q = jnp.linalg.cholesky(cov_q)
  ok = jnp.all(jnp.isfinite(chol_q), axis=(-2, -1))
  eye = jnp.eye(r, dtype=basis.dtype)
  projected = GaussianMixture(weights=mixture.weights,
                              means=jnp.dot(mixture.means, basis, precision=_HIGHEST),
                              cov_chol=jnp.where(ok[:, None, None], chol_q, eye))
  w, b = log_joint_params(projected)
  # From the r-dimensional log-density to U_k: swap its normaliser for the d-dimensional one.
  shift = 0.5 * (r * math.log(2.0 * math.pi) + cholesky_log_det(projected.cov_chol)
                 - d * math.log(2.0 * math.pi) - cholesky_log_det(mixture.cov_chol))
  live = mixture.weights > 0
  b = jnp.where(live, jnp.where(ok, b + shift, jnp.inf), -jnp.inf)
  w = jnp.where(ok[None, :], w, 0.0)
  return split_rows(w, r), b


def pair_scores(x: jax.Array, sample: jax.Array, component: jax.Array, mixture: GaussianMixture,
                prec_chol: jax.Array, log_norm: jax.Array) -> jax.Array:
  """s_k(u) = log pi_k + log N(u; mu_k, Sigma_k) of (sample, component) pairs, direct form.

  Pairs are grouped by component in tiles of T (`tiles.tile_layout`), and each tile is one
  (T, d) x (d, d) product with its component's precision factor.

  Args:
    x: array of shape (N, d).
    sample: int32 array of shape (P,), row of x of each pair.
    component: int32 array of shape (P,), component of each pair; K marks a pair to skip.
    mixture: the K components (only the means are read here).
    prec_chol: array of shape (K, d, d), P_k = L_k^{-T}.
    log_norm: array of shape (K,), log pi_k - (d log 2 pi + log|Sigma_k|) / 2.

  Returns:
    array of shape (P,), -inf on skipped pairs.
  """
  n_pairs = sample.shape[0]
  k, d = mixture.means.shape
  tile = int(min(128, max(8, 2 ** int(math.log2(max(1, n_pairs // (4 * k)))))))
  group = max(1, min(-(-n_pairs // tile) + k, (64 << 20) // (4 * d * max(d, tile))))
  layout = tile_layout(component, k, tile, multiple=group)
  n_rows = x.shape[0]
  rows = jnp.full((layout.n_tiles * tile,), n_rows, jnp.int32).at[layout.dest].set(
      sample[layout.order], mode="drop", unique_indices=True)
  owner = jnp.minimum(layout.owner, k - 1)           # unused tiles: any component, masked below
  n_groups = layout.n_tiles // group

  def body(_, inputs):
    r, o = inputs                                    # (G, T) rows, (G,) components
    e = x.at[r].get(mode="fill", fill_value=0.0) - mixture.means[o][:, None, :]
    y = jnp.einsum("gtd,gde->gte", e, prec_chol[o], precision=_HIGHEST)
    return None, log_norm[o][:, None] - 0.5 * jnp.sum(jnp.square(y), axis=-1)

  _, scores = jax.lax.scan(body, None, (rows.reshape(n_groups, group, tile),
                                        owner.reshape(n_groups, group)))
  flat = scores.reshape(-1).at[layout.dest].get(mode="fill", fill_value=-jnp.inf)
  return jnp.full((n_pairs,), -jnp.inf, x.dtype).at[layout.order].set(flat)


def _accurate_sum(v: jax.Array) -> jax.Array:
  """Sum of a long float32 vector: block sums, then a compensated (Kahan) sum of the blocks."""
  block = 1024
  n = v.shape[0]
  v = jnp.pad(v, (0, -n % block)).reshape(-1, block)

  def body(carry, part):
    s, c = carry
    y = part - c
    t = s + y
    return (t, (t - s) - y), None

  zero = jnp.zeros((), v.dtype)
  (total, _), _ = jax.lax.scan(body, (zero, zero), jnp.sum(v, axis=1))
  return total


def pruned_assignment_pass(mixture: GaussianMixture, basis: jax.Array, x: jax.Array,
                           mask: jax.Array, *, chunk_size: int, n_candidates: int
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The assignment step, Eq. 1, exact, with candidate pruning (see the module docstring).

  Same contract as `kmle.assignment_pass` (labels and log-likelihood sums), plus the number of
  samples the certificate did not cover (assigned by the dense pass).

  Args:
    mixture: the current mixture (K rows, masked rows allowed), K > n_candidates.
    basis: array of shape (d, r), the projection of the bounds.
    x: array of shape (N, d), N a multiple of chunk_size (or N <= chunk_size).
    mask: bool array of shape (N,), False on padding rows.
    chunk_size: rows per chunk of the bound pass and of the dense fallback.
    n_candidates: C, the components scored exactly per sample (static).

  Returns:
    z: int32 array of shape (N,), the component of each sample; K on padding rows.
    loglik: shape (), sum over valid rows of the logsumexp of the scored candidates' s_k.
    class_loglik: shape (), sum over valid rows of max_k s_k.
    n_fallback: int32 shape (), valid rows assigned by the dense pass.
  """
  n, d = x.shape
  k = mixture.n_components
  c = int(n_candidates)
  cs = min(chunk_size, n)
  w_bound, b_bound = bound_params(mixture, basis)

  def bounds(_, xb):
    u = log_joint(jnp.dot(xb, basis, precision=_HIGHEST), w_bound, b_bound)   # (cs, K) >= s_k
    values, index = jax.lax.top_k(u, c)
    # The C-th largest bound bounds every non-candidate. It is read as a min, not a slice: a
    # slice of top_k's outputs makes XLA:CPU lower the top_k as a full sort of the K columns
    # (measured 30x slower at K = 1024).
    return None, (index.astype(jnp.int32), values > -jnp.inf, jnp.min(values, axis=1))

  _, (cand, cand_ok, threshold) = jax.lax.scan(bounds, None, x.reshape(n // cs, cs, d))
  cand, cand_ok = cand.reshape(n, c), cand_ok.reshape(n, c) & mask[:, None]
  threshold = threshold.reshape(n)

  prec_chol = precision_cholesky(mixture.cov_chol)
  live = mixture.weights > 0
  log_norm = jnp.where(live, jnp.log(jnp.where(live, mixture.weights, 1.0)), -jnp.inf) - 0.5 * (
      d * math.log(2.0 * math.pi) + cholesky_log_det(mixture.cov_chol))
  sample = jnp.repeat(jnp.arange(n, dtype=jnp.int32), c)
  scores = pair_scores(x, sample, jnp.where(cand_ok, cand, k).reshape(-1), mixture, prec_chol,
                       log_norm).reshape(n, c)
  best = jnp.max(scores, axis=1)
  z = jnp.take_along_axis(cand, jnp.argmax(scores, axis=1)[:, None], axis=1)[:, 0]
  lse = jax.nn.logsumexp(scores, axis=1)
  certified = threshold < best - (_MARGIN_ABS + _MARGIN_REL * jnp.abs(best))
  todo = mask & ~certified
  n_todo = jnp.sum(todo.astype(jnp.int32))

  def dense_fallback(state):
    z, best, lse = state
    w, b = log_joint_params(mixture)
    w_pieces = split_rows(w, d)
    rows = jnp.argsort(~todo, stable=True).astype(jnp.int32)   # rows to redo first
    rows = jnp.pad(rows, (0, cs))

    def body(carry):
      i, z, best, lse = carry
      idx = jax.lax.dynamic_slice(rows, (i * cs,), (cs,))
      idx = jnp.where(i * cs + jnp.arange(cs) < n_todo, idx, n)   # n: dropped below
      lj = log_joint(x.at[idx].get(mode="fill", fill_value=0.0), w_pieces, b)
      z = z.at[idx].set(jnp.argmax(lj, axis=1).astype(jnp.int32), mode="drop")
      best = best.at[idx].set(jnp.max(lj, axis=1), mode="drop")
      lse = lse.at[idx].set(jax.nn.logsumexp(lj, axis=1), mode="drop")
      return i + 1, z, best, lse

    _, z, best, lse = jax.lax.while_loop(lambda carry: carry[0] * cs < n_todo, body,
                                         (jnp.int32(0), z, best, lse))
    return z, best, lse

  z, best, lse = jax.lax.cond(n_todo > 0, dense_fallback, lambda state: state, (z, best, lse))
  z = jnp.where(mask, z, k).astype(jnp.int32)
  loglik = _accurate_sum(jnp.where(mask, lse, 0.0))
  class_loglik = _accurate_sum(jnp.where(mask, best, 0.0))
  return z, loglik, class_loglik, n_todo
