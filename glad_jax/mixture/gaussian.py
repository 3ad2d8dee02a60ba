"""Gaussian mixtures held as Cholesky factors: log-densities, log-dets, Mahalanobis distances.

Pure JAX, no I/O. Every array shape is given as (n_samples, n_components, dim) = (N, K, d).
A covariance is stored as its lower Cholesky factor ``L`` (Sigma = L L^T); the Mahalanobis
distance uses the *precision* factor ``P = L^{-T}`` (Sigma^{-1} = P P^T), so that
``(u - mu)^T Sigma^{-1} (u - mu) = ||(u - mu)^T P||^2`` is a plain row-vector x matrix product.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class GaussianMixture:
  """A Gaussian mixture Theta = (pi_k, mu_k, Sigma_k), k = 1..K (paper Section 3.1).

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


def cholesky_log_det(cov_chol: jax.Array) -> jax.Array:
  """log|Sigma_k| from lower Cholesky factors of shape (K, d, d); returns (K,)."""
  diag = jnp.diagonal(cov_chol, axis1=-2, axis2=-1)
  return 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def precision_cholesky(cov_chol: jax.Array) -> jax.Array:
  """P_k = L_k^{-T} (upper triangular) such that Sigma_k^{-1} = P_k P_k^T; shape (K, d, d)."""
  d = cov_chol.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(d, dtype=cov_chol.dtype), cov_chol.shape)
  inv_l = jax.scipy.linalg.solve_triangular(cov_chol, eye, lower=True)
  return jnp.swapaxes(inv_l, -1, -2)


def mahalanobis_sq(x: jax.Array, means: jax.Array, prec_chol: jax.Array) -> jax.Array:
  """Squared Mahalanobis distances of every sample to every component.

  Args:
    x: array of shape (N, d).
    means: array of shape (K, d).
    prec_chol: array of shape (K, d, d), precision Cholesky factors (see `precision_cholesky`).

  Returns:
    array of shape (N, K). Materialises an (N, K, d) intermediate: callers chunk N.
  """
  # (x - mu_k)^T P_k = x^T P_k - mu_k^T P_k: one (N, d) x (d, K*d) matmul.
  xp = jnp.einsum("nd,kde->nke", x, prec_chol)
  mp = jnp.einsum("kd,kde->ke", means, prec_chol)
  return jnp.sum(jnp.square(xp - mp[None]), axis=-1)


def component_log_prob(x: jax.Array, means: jax.Array, prec_chol: jax.Array,
                       log_det: jax.Array) -> jax.Array:
  """log N(x_n; mu_k, Sigma_k) for all n, k; shapes (N, d) -> (N, K)."""
  d = x.shape[-1]
  maha = mahalanobis_sq(x, means, prec_chol)
  return -0.5 * (d * math.log(2.0 * math.pi) + log_det[None, :] + maha)
