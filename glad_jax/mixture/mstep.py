"""The update step of the mixture fits: Eq. 2-3 from summed statistics, OAS (Eq. 9), pruning.

Shared by K-MLE (hard counts) and EM (soft counts): weights |C_k| / N over the kept clusters,
means, covariances, OAS shrinkage with n = the cluster's count, a relative diagonal floor, and
the masking (weight 0) of clusters smaller than ``min_cluster_size`` or whose covariance is not
numerically positive definite ("Gaussians with no samples are dropped").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.oas import oas_covariance
from glad_jax.mixture.stats import SufficientStats


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

