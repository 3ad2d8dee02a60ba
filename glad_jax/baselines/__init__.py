"""Comparison methods on GLAD's backbone features: MahaAD, PaDiM, PatchCore.

Every method has ``fit_<name>(features, config, key) -> state`` and
``score_<name>(state, features, out_size=256) -> (image_scores (B,), anomaly_maps (B, S, S))``
(higher = more anomalous), and is registered under its name, so a comparison loops as::

  for name in BASELINES:
    method = get_baseline(name)
    state = method.fit(train_features, method.config_cls(), key)
    scores, maps = method.score(state, test_features, out_size=256)
"""

from glad_jax.baselines.common import Baseline
from glad_jax.baselines.common import gaussian_blur
from glad_jax.baselines.common import model_size_bytes
from glad_jax.baselines.common import resize_bilinear
from glad_jax.baselines.common import upsample_nearest
from glad_jax.baselines.mahaad import MahaADConfig
from glad_jax.baselines.mahaad import MahaADState
from glad_jax.baselines.mahaad import fit_mahaad
from glad_jax.baselines.mahaad import ledoit_wolf
from glad_jax.baselines.mahaad import score_mahaad
from glad_jax.baselines.padim import PadimConfig
from glad_jax.baselines.padim import PadimState
from glad_jax.baselines.padim import fit_padim
from glad_jax.baselines.padim import score_padim
from glad_jax.baselines.patchcore import PatchcoreConfig
from glad_jax.baselines.patchcore import PatchcoreState
from glad_jax.baselines.patchcore import fit_patchcore
from glad_jax.baselines.patchcore import greedy_coreset
from glad_jax.baselines.patchcore import nearest_neighbors
from glad_jax.baselines.patchcore import score_patchcore

BASELINES: dict[str, Baseline] = {
    "mahaad": Baseline("mahaad", MahaADConfig, fit_mahaad, score_mahaad),
    "padim": Baseline("padim", PadimConfig, fit_padim, score_padim),
    "patchcore": Baseline("patchcore", PatchcoreConfig, fit_patchcore, score_patchcore),
}


def get_baseline(name: str) -> Baseline:
  """The `Baseline` registered under `name` ("mahaad", "padim" or "patchcore").

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  try:
    return BASELINES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown baseline {name!r}; known baselines: {sorted(BASELINES)}") from None


__all__ = (
    "BASELINES",
    "Baseline",
    "MahaADConfig",
    "MahaADState",
    "PadimConfig",
    "PadimState",
    "PatchcoreConfig",
    "PatchcoreState",
    "fit_mahaad",
    "fit_padim",
    "fit_patchcore",
    "gaussian_blur",
    "get_baseline",
    "greedy_coreset",
    "ledoit_wolf",
    "model_size_bytes",
    "nearest_neighbors",
    "resize_bilinear",
    "score_mahaad",
    "score_padim",
    "score_patchcore",
    "upsample_nearest",
)
