"""Gaussian-mixture math: log-densities (gaussian), OAS shrinkage (oas), K-MLE (kmle), EM (em).

Modules by concern: stats (sufficient statistics, assignment step), mstep (Eq. 2-3, 9), steps
(one K-MLE / EM iteration), initialization (seeding, input checks), fit (config, driver),
pruned (certified candidate pruning), budget (sample budget of a fit).
"""

from glad_jax.mixture.em import EMConfig
from glad_jax.mixture.em import em_step
from glad_jax.mixture.em import fit_em
from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.gaussian import cholesky_log_det
from glad_jax.mixture.gaussian import component_log_prob
from glad_jax.mixture.gaussian import expanded_features
from glad_jax.mixture.gaussian import log_joint
from glad_jax.mixture.gaussian import log_joint_params
from glad_jax.mixture.gaussian import mahalanobis_sq
from glad_jax.mixture.gaussian import mahalanobis_sq_expanded
from glad_jax.mixture.gaussian import precision_cholesky
from glad_jax.mixture.kmle import FitInfo
from glad_jax.mixture.kmle import KMLEConfig
from glad_jax.mixture.kmle import MixtureStats
from glad_jax.mixture.kmle import fit_kmle
from glad_jax.mixture.kmle import kmle_init
from glad_jax.mixture.kmle import kmle_step
from glad_jax.mixture.oas import oas_covariance
from glad_jax.mixture.oas import oas_shrinkage

__all__ = [
    "EMConfig",
    "FitInfo",
    "GaussianMixture",
    "KMLEConfig",
    "MixtureStats",
    "cholesky_log_det",
    "component_log_prob",
    "em_step",
    "expanded_features",
    "fit_em",
    "fit_kmle",
    "kmle_init",
    "kmle_step",
    "log_joint",
    "log_joint_params",
    "mahalanobis_sq",
    "mahalanobis_sq_expanded",
    "oas_covariance",
    "oas_shrinkage",
    "precision_cholesky",
]
