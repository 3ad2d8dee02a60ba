"""Configuration of a GLAD model: one frozen dataclass, the paper's defaults (Section 4.1)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class GLADConfig:
  """Everything that defines a fitted GLAD model.

  Defaults are the paper's (Section 4.1) except the backbone (the paper's anti-aliased
  WideResNet50-2 has no weights that install offline, so the embedded default is
  EfficientNet-Lite0), for speed, the global fit's sample caps (`max_samples`,
  `max_sample_work`) and its extra label-change stop (`label_tol`), and, for accuracy, the local
  radius chosen per layer from held-out training images (`radius="auto"`, paper: r = 1);
  `paper()` restores the paper's fit and radius. README says how each was chosen.

  Attributes:
    backbone: registry name of the feature extractor (see `glad_jax.backbones`).
    layers: names of the backbone layers modelled (one mixture per layer).
    weights: optional path of a checkpoint file for the backbone (None: packaged default).
    image_size: images are resized to (image_size, image_size) before the backbone.
    n_components: initial K of the global mixture (paper: 1000).
    algorithm: 'kmle' (paper, Eq. 1-3) or 'em' (ablation).
    use_oas: OAS shrinkage of the covariances (Eq. 9); False = plain sample covariance.
    max_iter: iteration cap of the global fit (paper: 100).
    tol: relative change of the mean log-likelihood that stops the fit (paper: 1e-6).
    max_samples: how many feature vectors the global fit uses per layer; the local weights always
      use every vector. Default 100,000: a seeded subset in which every image and every grid
      position keeps its share (`glad_jax.mixture.budget.stratified_subsample`), the largest
      round count whose default fit of a 200-350 image category stays within 5 minutes on a
      2-core CPU (README "Speed"); layers with fewer vectors use them all. None: every vector
      (the paper's fit). "auto": as many as `fit_budget_s` allows on this machine, from the
      measured speed of the layer's own fit step (`glad_jax.mixture.budget`), drawn the same way.
    max_sample_work: a second cap on each layer's global-fit vectors n: n * (d (d + 1) / 2 + d + 1)
      <= max_sample_work, the dense assignment's multiply-adds per component and iteration, so that
      wide layers get fewer vectors (default 3e8: 100,000 at d = 24 and 40, 43,900 at Lite0's
      layer 3, d = 112, whose pruned assignment fails on some data, e.g. magnetic_tile, and costs
      8.5 s per iteration at 100,000 vectors here). None: no such cap. Ignored with max_samples
      None (every vector) or "auto".
    label_tol: a stopping rule added to the paper's (`tol`): the global K-MLE fit also stops when at
      most this fraction of its vectors changed component in an iteration (default 1e-3; None: the
      paper's rule alone). Chosen on training vectors only (README "Speed"): on tire and
      magnetic_tile's layers 1-2 the paper's rule stops first anyway; on layer 3 (d = 112) it halves
      the iterations for a final classification log-likelihood 1.6e-4 (relative) below the paper's.
    fit_budget_s: seconds the global fits of all layers may take together when max_samples="auto"
      (the time a layer did not use passes to the next ones). The local weight fits are not
      included: they always use every vector.
    local: learn position-dependent weights pi_k(x) (Eq. 10-12); False = global-only ablation.
    radius: radius r of the disk of samples used at each position (feature-grid units), or "auto"
      (default): per layer, local weights are fitted at each of `radius_candidates` on the training
      images less a seeded `radius_holdout` share (two bands of grid rows), and from the smallest
      radius up the next one is taken while the held-out images' per-position log-likelihood (Section
      3.3) gains more than 2 standard errors (`glad_jax.methods.glad.choose_radius`). The paper's is a
      fixed radius of 1. Training images only: README "Benchmark" says how the rule was found.
    radius_candidates: the radii "auto" chooses from, tried from the smallest up.
    radius_holdout: share of the training images held out to choose the radius (at least one
      image; the local weights are then fitted on all training images at the chosen radius).
    local_max_iter: iteration cap of the local weight fit.
    quantile: q of the image score, the q-quantile of the log-likelihood map (paper: 0.005).
    align: motion model used to align images on the reference ('none', 'translation',
      'euclidean', 'similarity', 'affine', 'homography'), or 'auto': 'none' or 'euclidean', whichever
      detects synthetic defects in held-out training images better in a small probe fit
      (`glad_jax.align_choice`; the paper aligns object images). Training images only.
    mask: 'none', 'object' (crude object mask from the aligned training images) or
      'margin' (texture margin of 1/16 of the image size).
    seed: seeds initialisation and subsampling.
    backbone_dtype: computation dtype of the backbone, 'float32' or 'bfloat16' (faster on
      GPU/TPU; features are returned as float32 and all mixture math stays float32).
  """

  backbone: str = "efficientnet_lite0"
  layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
  weights: str | None = None
  image_size: int = 256
  n_components: int = 1000
  algorithm: Literal["kmle", "em"] = "kmle"
  use_oas: bool = True
  max_iter: int = 100
  tol: float = 1e-6
  max_samples: int | Literal["auto"] | None = 100_000
  max_sample_work: float | None = 3e8
  label_tol: float | None = 1e-3
  fit_budget_s: float = 150.0
  local: bool = True
  radius: float | Literal["auto"] = "auto"
  radius_candidates: tuple[float, ...] = (1.0, 2.0, 3.0)
  radius_holdout: float = 0.1
  local_max_iter: int = 100
  quantile: float = 0.005
  align: str = "none"
  mask: Literal["none", "object", "margin"] = "none"
  seed: int = 0
  backbone_dtype: Literal["float32", "bfloat16"] = "float32"

  def replace(self, **changes) -> "GLADConfig":
    return dataclasses.replace(self, **changes)

  def paper(self) -> "GLADConfig":
    """This configuration with the paper's fit: every vector, the paper's stopping rule alone, r = 1."""
    return self.replace(max_samples=None, max_sample_work=None, label_tol=None, radius=1.0)


def parse_max_samples(text: str) -> int | str | None:
  """The command-line form of `GLADConfig.max_samples`: "auto", "all" (None: every vector) or an int >= 1."""
  value = str(text).strip().lower()
  if value == "auto":
    return "auto"
  if value in ("all", "none"):
    return None
  try:
    n = int(value.replace(",", "").replace("_", ""))
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"max_samples must be 'auto', 'all' or a positive integer, got {text!r}")
  return n


def parse_radius(text: str) -> float | str:
  """The command-line form of `GLADConfig.radius`: "auto" or a number >= 0."""
  value = str(text).strip().lower()
  if value == "auto":
    return "auto"
  try:
    r = float(value)
  except ValueError:
    r = -1.0
  if not (r >= 0 and r != float("inf")):
    raise ValueError(f"radius must be 'auto' or a number >= 0, got {text!r}")
  return r
