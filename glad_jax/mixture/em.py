"""EM for the global Gaussian mixture: the paper's ablation alternative to K-MLE (Section 3.1).

Same machinery as `kmle` (chunked, sharded pass over the samples, `stats`; M-step of Eq. 2-3
with optional OAS, Eq. 9, `mstep`; pruning of small components; host driver with bucketed K,
`fit`), with soft
responsibilities ``r_ik = pi_k N(u_i; k) / sum_j pi_j N(u_i; j)`` instead of hard assignments:
counts, sums and second moments are responsibility-weighted (``r^T [u u^T, u, 1]``, one matmul
per chunk), and OAS uses the soft count ``n_k = sum_i r_ik``. Each sample touches every
component, which is why EM costs about twice a K-MLE iteration here (the paper: > 2.5x).

With ``use_oas=False`` and the same ``reg_covar`` (absolute: ``config.reg_covar`` times the
data's mean variance) this is scikit-learn's ``GaussianMixture(covariance_type='full')`` EM;
`tests/test_em.py` checks it from a common initialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from glad_jax.mixture.fit import Callback, FitInfo, KMLEConfig, fit_mixture
from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.steps import em_step

__all__ = ["EMConfig", "em_step", "fit_em"]


@dataclasses.dataclass(frozen=True)
class EMConfig(KMLEConfig):
  """Hyper-parameters of the EM fit: the fields and defaults of `KMLEConfig`.

  The stopping rule monitors the mixture log-likelihood mean_i log sum_k pi_k N(u_i; k), the
  objective EM increases monotonically (without OAS). ``min_cluster_size`` compares with soft
  counts; ``label_tol`` and the assignment settings do not apply (EM has no labels).
  """


def fit_em(x: Any, config: EMConfig = EMConfig(), key: jax.Array | None = None,
           mesh: Mesh | None = None, callback: Callback | None = None, *,
           init: GaussianMixture | None = None) -> tuple[GaussianMixture, FitInfo]:
  """Fit the global mixture with EM until convergence.

  Same driver as `kmle.fit_kmle` (validation, centring, sharding, pruning, callback); stops when
  the relative change of the mean mixture log-likelihood is below ``config.tol`` or after
  ``config.max_iter`` iterations.

  Args:
    x: array of shape (N, d).
    config: an `EMConfig` (a `KMLEConfig` is accepted too).
    key: `jax.random` key of the initialisation (`kmle_init`; default: key 0).
    mesh: optional 1-D mesh over which samples are split.
    callback: optional ``callback(iteration, mean_loglik, n_live)``.
    init: optional starting mixture (e.g. a K-MLE fit, or a common start for comparisons).

  Returns:
    (mixture with only the live components, `FitInfo`).

  Raises:
    ValueError: as `fit_kmle`.
  """
  key = jax.random.key(0) if key is None else key
  return fit_mixture(x, config, key, hard=False, mesh=mesh, callback=callback, init=init)
