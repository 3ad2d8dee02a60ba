"""Oracle Approximating Shrinkage (OAS) of per-cluster covariances, paper Eq. 9.

Pure JAX, vectorised over the K components of a mixture.

Eq. 9 (Chen, Wiesel, Eldar & Hero 2010, Eq. 23), with S the cluster's sample covariance
(Eq. 3, divided by n = |C_k|) in dimension d::

  rho   = min( ((1 - 2/d) Tr(S^2) + Tr^2(S)) / ((n + 1 - 2/d) (Tr(S^2) - Tr^2(S) / d)), 1 )
  Sigma = (1 - rho) S + rho Tr(S) / d I

Difference with scikit-learn: `sklearn.covariance.oas` / `OAS` drop both ``2/d`` terms, i.e.
``rho = (Tr(S^2) + Tr^2(S)) / ((n + 1) (Tr(S^2) - Tr^2(S) / d))`` (their comment: "the factor
2/p is omitted since it does not impact the value of the estimator for large p"), and they
return rho = 0 when d = 1. For the d = 24..1024 of GLAD the two agree to O(1/d), but they are
not equal; this module follows the paper. `tests/test_oas.py` shows the difference.

Degenerate inputs (all handled without NaN):

* ``Tr(S^2) - Tr^2(S)/d = 0`` means S is isotropic (S = Tr(S)/d I, which includes S = 0 and
  every d = 1 case): the shrinkage target equals S, so rho is irrelevant; rho = 1 is returned.
* A 1-sample cluster has S = 0 exactly, the 0/0 case: rho = 1 and Sigma = 0, which is not
  positive definite. OAS cannot repair it and a Gaussian fitted to one point is meaningless,
  so the fitters (`kmle`, `em`) drop every cluster smaller than ``min_cluster_size`` (>= 2)
  exactly like an empty one, and add a tiny floor ``reg_covar * I`` to every covariance for
  numerical positive-definiteness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def oas_shrinkage(cov: jax.Array, counts: jax.Array) -> jax.Array:
  """Shrinkage coefficient rho of Eq. 9 for each component.

  Args:
    cov: array of shape (K, d, d), sample covariances S_k (Eq. 3, normalised by n_k).
    counts: array of shape (K,), cluster sizes n_k = |C_k| (soft counts allowed, n_k > 0).

  Returns:
    array of shape (K,), rho_k in [0, 1] (1 where S_k is isotropic, including S_k = 0).

  References:
    Artola et al., GLAD (WACV 2023), Eq. 9; Chen et al. (2010), Eq. 23.
  """
  d = cov.shape[-1]
  tr = jnp.trace(cov, axis1=-2, axis2=-1)
  tr_s2 = jnp.sum(jnp.square(cov), axis=(-2, -1))  # Tr(S^2) = ||S||_F^2 for symmetric S
  num = (1.0 - 2.0 / d) * tr_s2 + jnp.square(tr)
  spread = tr_s2 - jnp.square(tr) / d   # >= 0 (Cauchy-Schwarz on the eigenvalues)
  den = (counts + 1.0 - 2.0 / d) * spread
  # Relative test: rounding leaves `spread` a few ulps of Tr(S^2) away from 0 for an isotropic S
  # (S = 0 included: 0 <= 0). Below this level Eq. 9 gives rho >= 1 anyway unless n ~ 1/eps.
  isotropic = spread <= 16.0 * jnp.finfo(cov.dtype).eps * tr_s2
  rho = jnp.minimum(num / jnp.where(isotropic, 1.0, den), 1.0)
  return jnp.where(isotropic, 1.0, jnp.clip(rho, 0.0, 1.0))


def oas_covariance(cov: jax.Array, counts: jax.Array) -> jax.Array:
  """OAS-regularised covariances Sigma = (1 - rho) S + rho Tr(S)/d I (Eq. 9), batched over K.

  Args:
    cov: array of shape (K, d, d), sample covariances.
    counts: array of shape (K,), cluster sizes.

  Returns:
    array of shape (K, d, d).
  """
  d = cov.shape[-1]
  rho = oas_shrinkage(cov, counts)[:, None, None]
  target = (jnp.trace(cov, axis1=-2, axis2=-1) / d)[:, None, None] * jnp.eye(d, dtype=cov.dtype)
  return (1.0 - rho) * cov + rho * target
