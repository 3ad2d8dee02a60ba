"""Robustness protocols: PGD adversarial samples against a detector (OmniAL supp. Section 2).

Pixel-level attacks on the bounded anomaly map, one-sided attacks on the image score, and the
protocol driver `attack_suite` (`glad_jax.robustness.adversarial`). The other protocols (Rd- pose
randomisation, contaminated training sets) move data and live in `glad_jax.data.perturb`.
"""

from glad_jax.robustness.adversarial import OMNIAL_EPSILONS
from glad_jax.robustness.adversarial import OMNIAL_STEPS
from glad_jax.robustness.adversarial import ONE_SIDED_EPSILONS
from glad_jax.robustness.adversarial import TARGETED_EPSILON
from glad_jax.robustness.adversarial import AttackSuiteConfig
from glad_jax.robustness.adversarial import ImageScorer
from glad_jax.robustness.adversarial import MapStatistics
from glad_jax.robustness.adversarial import PGDConfig
from glad_jax.robustness.adversarial import attack_suite
from glad_jax.robustness.adversarial import average_precision
from glad_jax.robustness.adversarial import bounded_map
from glad_jax.robustness.adversarial import calibrated_threshold
from glad_jax.robustness.adversarial import directions_from_labels
from glad_jax.robustness.adversarial import image_attack
from glad_jax.robustness.adversarial import map_statistics
from glad_jax.robustness.adversarial import pgd_attack
from glad_jax.robustness.adversarial import pgd_maximise
from glad_jax.robustness.adversarial import pgd_step
from glad_jax.robustness.adversarial import pgd_sweep
from glad_jax.robustness.adversarial import pixel_attack
from glad_jax.robustness.adversarial import pixel_average_precision
from glad_jax.robustness.adversarial import pixel_bce
from glad_jax.robustness.adversarial import project_linf
from glad_jax.robustness.adversarial import score_in_batches
from glad_jax.robustness.adversarial import standardised_map

__all__ = (
    "OMNIAL_EPSILONS",
    "OMNIAL_STEPS",
    "ONE_SIDED_EPSILONS",
    "TARGETED_EPSILON",
    "AttackSuiteConfig",
    "ImageScorer",
    "MapStatistics",
    "PGDConfig",
    "attack_suite",
    "average_precision",
    "bounded_map",
    "calibrated_threshold",
    "directions_from_labels",
    "image_attack",
    "map_statistics",
    "pgd_attack",
    "pgd_maximise",
    "pgd_step",
    "pgd_sweep",
    "pixel_attack",
    "pixel_average_precision",
    "pixel_bce",
    "project_linf",
    "score_in_batches",
    "standardised_map",
)
