"""Robustness protocols: PGD adversarial samples against a detector's image score (OmniAL).

The other protocols (Rd- pose randomisation, contaminated training sets) move data and live in
`glad_jax.data.perturb`.
"""

from glad_jax.robustness.adversarial import OMNIAL_EPSILONS
from glad_jax.robustness.adversarial import OMNIAL_STEPS
from glad_jax.robustness.adversarial import PGDConfig
from glad_jax.robustness.adversarial import directions_from_labels
from glad_jax.robustness.adversarial import pgd_attack
from glad_jax.robustness.adversarial import pgd_step
from glad_jax.robustness.adversarial import pgd_sweep
from glad_jax.robustness.adversarial import project_linf

__all__ = (
    "OMNIAL_EPSILONS",
    "OMNIAL_STEPS",
    "PGDConfig",
    "directions_from_labels",
    "pgd_attack",
    "pgd_step",
    "pgd_sweep",
    "project_linf",
)
