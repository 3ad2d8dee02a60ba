"""K-MLE: hard-assignment maximum likelihood for the global Gaussian mixture (paper Eq. 1-3, 9).

The algorithm alternates (Section 3.1)

* an assignment step, Eq. 1: ``z_i = argmin_k (u_i - mu_k)^T Sigma_k^{-1} (u_i - mu_k)
  + log|Sigma_k| - 2 log pi_k``, i.e. ``z_i = argmax_k log pi_k + log N(u_i; mu_k, Sigma_k)``;
* an update step, Eq. 2-3: per cluster C_k the weight |C_k|/N, the mean and the sample
  covariance, shrunk by OAS (Eq. 9, `glad_jax.mixture.oas`) when enabled.

Clusters left with fewer than ``min_cluster_size`` (>= 2) samples are dropped ("Gaussians with
no samples are dropped"; a 1-sample cluster has zero scatter, see `oas`).

The pieces live by concern, and this module is the K-MLE entry point that re-exports them:

* `stats`: sufficient statistics and the assignment pass (Eq. 1; dense, or `pruned`);
* `mstep`: Eq. 2-3 and 9 from the statistics;
* `steps`: one iteration, `kmle_step` (and `em_step`);
* `initialization`: `kmle_init` (k-means++ seeding) and the input checks;
* `fit`: `KMLEConfig`, `FitInfo` and the host driver shared with EM.

Memory O(N + K d^2), no N x K x d array; data parallel over a 1-D mesh (one ``psum`` of the
statistics per iteration, `glad_jax.sharding`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from glad_jax.mixture.fit import Callback
from glad_jax.mixture.fit import FitInfo
from glad_jax.mixture.fit import KMLEConfig
from glad_jax.mixture.fit import default_chunk_size
from glad_jax.mixture.fit import fit_mixture
from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.initialization import kmle_init
from glad_jax.mixture.mstep import m_step
from glad_jax.mixture.stats import SufficientStats
from glad_jax.mixture.stats import assignment_pass
from glad_jax.mixture.stats import cluster_moments
from glad_jax.mixture.stats import sufficient_statistics
from glad_jax.mixture.steps import MixtureStats
from glad_jax.mixture.steps import kmle_step

__all__ = [
    "Callback",
    "FitInfo",
    "KMLEConfig",
    "MixtureStats",
    "SufficientStats",
    "assignment_pass",
    "cluster_moments",
    "default_chunk_size",
    "fit_kmle",
    "kmle_init",
    "kmle_step",
    "m_step",
    "sufficient_statistics",
]


def fit_kmle(x: Any, config: KMLEConfig = KMLEConfig(), key: jax.Array | None = None,
             mesh: Mesh | None = None, callback: Callback | None = None, *,
             init: GaussianMixture | None = None) -> tuple[GaussianMixture, FitInfo]:
  """Fit the global mixture with K-MLE (Section 3.1) until convergence.

  Stopping rule (Section 4.1): relative change of the mean log-likelihood between two
  iterations below ``config.tol``, or ``config.max_iter`` iterations (optionally also: at most
  ``config.label_tol`` of the samples changed component, see `KMLEConfig`). The monitored curve
  is the *classification* log-likelihood, mean_i max_k log pi_k N(u_i; k): it is the objective
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

  References:
    Artola et al., GLAD (WACV 2023), Eq. 1-3, 9 and Section 4.1; Nielsen, k-MLE (ICASSP 2012).
  """
  key = jax.random.key(0) if key is None else key
  return fit_mixture(x, config, key, hard=True, mesh=mesh, callback=callback, init=init)
