"""Gaussian mixtures held as Cholesky factors: log-densities, log-dets, Mahalanobis distances.

Pure JAX, no I/O. Every array shape is given as (n_samples, n_components, dim) = (N, K, d).
A covariance is stored as its lower Cholesky factor ``L`` (Sigma = L L^T); the Mahalanobis
distance uses the *precision* factor ``P = L^{-T}`` (Sigma^{-1} = P P^T), so that
``(u - mu)^T Sigma^{-1} (u - mu) = ||(u - mu)^T P||^2`` is a plain row-vector x matrix product.

Two ways to evaluate the quadratic form are provided:

* direct (`mahalanobis_sq`): ``||x^T P_k - mu_k^T P_k||^2``, one (N, d) x (d, K*d) matmul plus an
  (N, K, d) square-and-sum. Robust in float32: the cancellation error of ``x P - mu P`` grows
  like ``eps * sqrt(x^T A x * maha)``.
* expanded (`expanded_features` + `log_joint_params`): with ``A_k = Sigma_k^{-1}``,
  ``maha = sum_{i<=j} c_ij A_k,ij x_i x_j - 2 (A_k mu_k)^T x + mu_k^T A_k mu_k`` is linear in the
  features [x_i x_j, x, 1], so all K distances are one (N, F + d + 1) x (F + d + 1, K) matmul
  (F ~ d(d+1)/2; `log_joint` runs it band by band): half the flops of the direct form, a large
  inner dimension (BLAS-friendly) and no (N, K, d) intermediate. The price is float32
  cancellation of order ``eps * x^T A x`` (instead of ``eps * maha``), so callers centre the data
  (the fitters subtract the global mean) and the matmuls ask for full float32 precision
  (``Precision.HIGHEST``: no TF32 on GPUs). This is the hot loop of K-MLE and EM.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Full float32 in the big matmuls: on GPUs the default would round operands to TF32 (10-bit
# mantissa), far too coarse for the cancellation in the expanded quadratic form.
_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class GaussianMixture:
  """A Gaussian mixture Theta = (pi_k, mu_k, Sigma_k), k = 1..K (paper Section 3.1).

  A component with weight 0 is *masked* (log-weight -inf): it never wins an assignment and
  contributes nothing to a density. The fitters use such rows to pad K to a bucket size.

  Attributes:
    weights: array of shape (K,), the mixing weights pi_k (sum to 1).
    means: array of shape (K, d), the means mu_k.
    cov_chol: array of shape (K, d, d), lower Cholesky factors L_k of Sigma_k.
  """

  weights: jax.Array
  means: jax.Array
  cov_chol: jax.Array

  @property
  def n_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def covariances(self) -> jax.Array:
    """Sigma_k = L_k L_k^T, array of shape (K, d, d)."""
    return jnp.einsum("kij,klj->kil", self.cov_chol, self.cov_chol, precision=_HIGHEST)


def cholesky_log_det(cov_chol: jax.Array) -> jax.Array:
  """log|Sigma_k| from lower Cholesky factors of shape (K, d, d); returns (K,)."""
  diag = jnp.diagonal(cov_chol, axis1=-2, axis2=-1)
  return 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def precision_cholesky(cov_chol: jax.Array) -> jax.Array:
  """P_k = L_k^{-T} (upper triangular) such that Sigma_k^{-1} = P_k P_k^T; shape (K, d, d)."""
  # A batched triangular solve: a recursive 2x2 block inverse hung on XLA:CPU for
  # ~1000 matrices of d = 28..112 (tire, K = 1000), which this form handles in well under a second.
  d = cov_chol.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(d, dtype=cov_chol.dtype), cov_chol.shape)
  inv_l = jax.scipy.linalg.solve_triangular(cov_chol, eye, lower=True)
  return jnp.swapaxes(inv_l, -1, -2)


def mahalanobis_sq(x: jax.Array, means: jax.Array, prec_chol: jax.Array) -> jax.Array:
  """Squared Mahalanobis distances of every sample to every component (direct form).

  Args:
    x: array of shape (N, d).
    means: array of shape (K, d).
    prec_chol: array of shape (K, d, d), precision Cholesky factors (see `precision_cholesky`).

  Returns:
    array of shape (N, K). Materialises an (N, K, d) intermediate: callers chunk N.
  """
  # (x - mu_k)^T P_k = x^T P_k - mu_k^T P_k: one (N, d) x (d, K*d) matmul.
  xp = jnp.einsum("nd,kde->nke", x, prec_chol, precision=_HIGHEST)
  mp = jnp.einsum("kd,kde->ke", means, prec_chol, precision=_HIGHEST)
  return jnp.sum(jnp.square(xp - mp[None]), axis=-1)


def component_log_prob(x: jax.Array, means: jax.Array, prec_chol: jax.Array,
                       log_det: jax.Array) -> jax.Array:
  """log N(x_n; mu_k, Sigma_k) for all n, k; shapes (N, d) -> (N, K)."""
  d = x.shape[-1]
  maha = mahalanobis_sq(x, means, prec_chol)
  return -0.5 * (d * math.log(2.0 * math.pi) + log_det[None, :] + maha)


# ----------------------------------------------------------------------------------------------
# Expanded quadratic form: features [x_i x_j (i <= j), x, 1] and matching weight matrices.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def feature_bands(d: int) -> tuple[tuple[int, int], ...]:
  """Row bands [s, e) of the quadratic features: about 8 rows each, at most 16 bands.

  Band [s, e) holds the products x_i x_j for s <= i < e and j >= s: a (B, d - s) block of the
  upper triangle plus the lower triangle of its diagonal block (computed twice, a (B - 1)/(d + 1)
  flop overhead). Bands keep every array a plain broadcast product: one piece per row compiled
  in 15 s at d = 512, and concatenating the bands costs as much as building them on CPU, so the
  hot loop multiplies band by band (`log_joint`) and never concatenates.
  """
  n_bands = min(16, -(-d // 8))
  b = -(-d // n_bands)
  return tuple((s, min(s + b, d)) for s in range(0, d, b))


@functools.lru_cache(maxsize=None)
def quadratic_pairs(d: int) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs (i, j) of the `quadratic_features` columns, two int arrays of shape (F,).

  Band by band (`feature_bands`): rows i of a band [s, e) times columns j >= s. Every pair
  i <= j appears at least once; pairs i > j appear only inside a diagonal block (their mirror
  appears there too).
  """
  rows, cols = [], []
  for s, e in feature_bands(d):
    ii, jj = np.meshgrid(np.arange(s, e), np.arange(s, d), indexing="ij")
    rows.append(ii.ravel())
    cols.append(jj.ravel())
  return np.concatenate(rows), np.concatenate(cols)


def quadratic_size(d: int) -> int:
  """F, the number of quadratic features: d (d + 1) / 2 plus ~d (B - 1) / 2 duplicated pairs
  (B <= 8 rows per band up to d = 128, d / 16 beyond)."""
  return int(quadratic_pairs(d)[0].size)


def expanded_size(d: int) -> int:
  """Width of `expanded_features`: F quadratic + d linear + 1 constant."""
  return quadratic_size(d) + d + 1


def quadratic_blocks(x: jax.Array) -> list[jax.Array]:
  """The quadratic features band by band (no concatenation).

  Args:
    x: array of shape (N, d).

  Returns:
    one array per band [s, e) of `feature_bands(d)`, of shape (N, (e - s) (d - s)); their
    concatenation is `quadratic_features(x)`.
  """
  n = x.shape[0]
  return [(x[:, s:e, None] * x[:, None, s:]).reshape(n, -1) for s, e in feature_bands(x.shape[1])]


def quadratic_features(x: jax.Array) -> jax.Array:
  """Products x_i x_j for the pairs of `quadratic_pairs` (every i <= j at least once).

  Args:
    x: array of shape (N, d).

  Returns:
    array of shape (N, F), F = `quadratic_size(d)`.
  """
  return jnp.concatenate(quadratic_blocks(x), axis=-1)


def expanded_features(x: jax.Array) -> jax.Array:
  """[x_i x_j (pairs of `quadratic_pairs`), x, 1]: all a Gaussian log-density and M-step need.

  ``expanded_features(x) @ w`` with w from `log_joint_params` gives all K log-densities at once,
  and a (weighted) sum of the rows gives a cluster's second moments, sums and count. The fitters
  use the same layout band by band (`split_rows`) without building this concatenation.

  Args:
    x: array of shape (N, d).

  Returns:
    array of shape (N, F + d + 1).
  """
  ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  return jnp.concatenate([quadratic_features(x), x, ones], axis=-1)


def split_rows(a: jax.Array, d: int) -> list[jax.Array]:
  """Split the leading axis of an (F + d + 1, ...) array like `expanded_features`' columns.

  Returns:
    [one (F_b, ...) piece per band, the (d, ...) linear piece, the (1, ...) constant piece].
  """
  sizes = [(e - s) * (d - s) for s, e in feature_bands(d)] + [d, 1]
  return jnp.split(a, np.cumsum(sizes)[:-1].tolist(), axis=0)


def pack_quadratic(a: jax.Array) -> jax.Array:
  """Entries of symmetric (..., d, d) matrices at the `quadratic_pairs`, shape (..., F)."""
  rows, cols = quadratic_pairs(a.shape[-1])
  return a[..., rows, cols]


def unpack_quadratic(v: jax.Array, d: int) -> jax.Array:
  """Symmetric (..., d, d) matrices from values at the `quadratic_pairs` (..., F)."""
  rows, cols = quadratic_pairs(d)
  pos = np.empty((d, d), np.int32)
  first = rows <= cols                     # one occurrence of every unordered pair
  pos[rows[first], cols[first]] = np.nonzero(first)[0]
  pos[cols[first], rows[first]] = np.nonzero(first)[0]   # a gather from a symmetric map
  return v[..., pos]


def _pair_multiplicity(d: int) -> np.ndarray:
  """How often each column's unordered pair {i, j} is counted in x^T A x = sum_ij A_ij x_i x_j:
  diagonal 1; an off-diagonal pair present twice in the features (both orders) 1 per column;
  present once 2."""
  rows, cols = quadratic_pairs(d)
  band = np.zeros(d, np.int64)
  for b, (s, e) in enumerate(feature_bands(d)):
    band[s:e] = b
  twice = (rows != cols) & (band[rows] == band[cols])
  return np.where((rows == cols) | twice, 1.0, 2.0)


# ----------------------------------------------------------------------------------------------
# Packed layout: each unordered pair i <= j exactly once, one matmul (low d).
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def packed_pairs(d: int) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs (i, j), i <= j, of the `packed_features` columns (row-major upper triangle),
  two int arrays of shape (d (d + 1) / 2,)."""
  return np.triu_indices(d)


def packed_size(d: int) -> int:
  """Width of `packed_features`: d (d + 1) / 2 quadratic + d linear + 1 constant."""
  return d * (d + 1) // 2 + d + 1


def packed_features(x: jax.Array) -> jax.Array:
  """[x_i x_j (i <= j, `packed_pairs`), x, 1]: the expanded features without duplicated pairs.

  One gather and one product per row; at low d (24-40) this costs little next to the
  (N, d (d + 1) / 2 + d + 1) x (., K) matmul it feeds, which has no duplicated pairs (the bands of
  `expanded_features` add 16-26 % at d = 40-24) and runs as one BLAS call.

  Args:
    x: array of shape (N, d).

  Returns:
    array of shape (N, `packed_size(d)`).
  """
  rows, cols = packed_pairs(x.shape[-1])
  ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  return jnp.concatenate([x[..., rows] * x[..., cols], x, ones], axis=-1)


def mahalanobis_params(means: jax.Array, prec_chol: jax.Array, *, packed: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """Weights of the expanded quadratic form: ``expanded_features(x) @ w + c = maha``.

  With A_k = P_k P_k^T = Sigma_k^{-1}:
  ``(x - mu)^T A (x - mu) = sum_i A_ii x_i^2 + sum_{i<j} 2 A_ij x_i x_j - 2 (A mu)^T x + mu^T A mu``
  (an off-diagonal pair present in both orders gets A_ij per column).

  Args:
    means: array of shape (K, d).
    prec_chol: array of shape (K, d, d).
    packed: weights for `packed_features` (each pair once) instead of `expanded_features`.

  Returns:
    w: array of shape (F + d + 1, K) (F = d (d + 1) / 2 when packed); its last row (the constant
      feature) is zero.
    c: array of shape (K,), mu_k^T A_k mu_k (kept apart so that masked components can carry
      -inf without a 0 * inf in the matmul).
  """
  k, d = means.shape
  a = jnp.einsum("kij,klj->kil", prec_chol, prec_chol, precision=_HIGHEST)
  if packed:
    rows, cols = packed_pairs(d)
    w_quad = a[:, rows, cols] * jnp.asarray(np.where(rows == cols, 1.0, 2.0), a.dtype)
  else:
    w_quad = pack_quadratic(a) * jnp.asarray(_pair_multiplicity(d), a.dtype)   # (K, F)
  w_lin = -2.0 * jnp.einsum("kij,kj->ki", a, means, precision=_HIGHEST)        # (K, d)
  w = jnp.concatenate([w_quad, w_lin, jnp.zeros((k, 1), a.dtype)], axis=-1).T
  # mu^T A mu = ||P^T mu||^2 through P: better conditioned than through A.
  mp = jnp.einsum("kd,kde->ke", means, prec_chol, precision=_HIGHEST)
  return w, jnp.sum(jnp.square(mp), axis=-1)


def mahalanobis_sq_expanded(x: jax.Array, means: jax.Array, prec_chol: jax.Array) -> jax.Array:
  """Squared Mahalanobis distances through the expanded quadratic form; (N, d) -> (N, K).

  Same values as `mahalanobis_sq` up to float32 cancellation (see the module docstring); memory
  (N, F): callers chunk N.
  """
  w, c = mahalanobis_params(means, prec_chol)
  return log_joint(x, w, c)


def log_joint_params(mixture: GaussianMixture, *, packed: bool = False
                     ) -> tuple[jax.Array, jax.Array]:
  """Weights such that ``expanded_features(x) @ w + b = log pi_k + log N(x; mu_k, Sigma_k)``.

  Masked components (weight 0) get ``b_k = -inf``.

  Args:
    mixture: a mixture with K components in dimension d.
    packed: weights for `packed_features` (``packed_features(x) @ w + b``) instead.

  Returns:
    w: array of shape (F + d + 1, K) (`packed_size(d)` rows when packed).
    b: array of shape (K,).
  """
  d = mixture.dim
  prec_chol = precision_cholesky(mixture.cov_chol)
  log_det = cholesky_log_det(mixture.cov_chol)
  w, c = mahalanobis_params(mixture.means, prec_chol, packed=packed)
  log_w = jnp.where(mixture.weights > 0, jnp.log(jnp.where(mixture.weights > 0, mixture.weights,
                                                           1.0)), -jnp.inf)
  # log pi - (d log 2 pi + log|Sigma| + maha) / 2; the factor -1/2 is exact in floating point.
  b = log_w - 0.5 * (d * math.log(2.0 * math.pi) + log_det + c)
  return -0.5 * w, b


def log_joint(x: jax.Array, w: jax.Array | list[jax.Array], b: jax.Array) -> jax.Array:
  """log pi_k + log N(x_n; k) from samples and `log_joint_params`; (N, d) -> (N, K).

  Equals ``expanded_features(x) @ w + b`` but multiplies band by band (one float32 matmul per
  band of `feature_bands`), which avoids materialising the concatenated features.

  Args:
    x: array of shape (N, d).
    w: array of shape (F + d + 1, K), or its `split_rows` pieces (split once, outside a loop).
    b: array of shape (K,).

  Returns:
    array of shape (N, K).
  """
  d = x.shape[1]
  pieces = w if isinstance(w, (list, tuple)) else split_rows(w, d)
  out = jnp.dot(x, pieces[-2], precision=_HIGHEST) + b[None, :]
  for block, wb in zip(quadratic_blocks(x), pieces[:-2]):
    out = out + jnp.dot(block, wb, precision=_HIGHEST)
  return out


# ----------------------------------------------------------------------------------------------
# The assignment kernel shared by the dense pass and the pruned pass's fallback.
# ----------------------------------------------------------------------------------------------

# Packed features (one matmul, no duplicated pairs) up to this dimension; bands above it, where
# building the (N, d (d + 1) / 2) gather costs more than the duplicated pairs (bench_mixture.py).
PACKED_MAX_DIM = 48


def joint_scorer(mixture: GaussianMixture) -> Callable[[jax.Array], jax.Array]:
  """``score(x) = log pi_k + log N(x_n; mu_k, Sigma_k)``, (n, d) -> (n, K), for a chunked loop.

  The weights are computed once (call this outside the loop); the layout is packed
  (`packed_features`, one matmul) for d <= `PACKED_MAX_DIM`, banded (`log_joint`) above.
  """
  d = mixture.dim
  if d <= PACKED_MAX_DIM:
    w, b = log_joint_params(mixture, packed=True)
    return lambda x: jnp.dot(packed_features(x), w, precision=_HIGHEST) + b[None, :]
  w, b = log_joint_params(mixture)
  pieces = split_rows(w, d)
  return lambda x: log_joint(x, pieces, b)


def best_component(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(argmax, max) over the last axis of (n, K) scores: the first index of the maximum, as
  ``jnp.argmax``, but as a max and a min-reduction of indices (XLA:CPU's variadic argmax
  reduction cost 40 % of the whole assignment pass at d = 24, K = 1024)."""
  k = scores.shape[-1]
  best = jnp.max(scores, axis=-1)
  index = jnp.arange(k, dtype=jnp.int32)
  z = jnp.min(jnp.where(scores >= best[..., None], index, k), axis=-1)
  return jnp.minimum(z, k - 1), best


def logsumexp_from_max(scores: jax.Array, best: jax.Array) -> jax.Array:
  """log sum_k exp(scores_k) over the last axis, given its max (one pass fewer than
  `jax.nn.logsumexp`); -inf where every score is -inf."""
  safe = jnp.where(jnp.isfinite(best), best, 0.0)
  total = jnp.sum(jnp.exp(scores - safe[..., None]), axis=-1)
  return jnp.where(jnp.isfinite(best), safe + jnp.log(total), best)
