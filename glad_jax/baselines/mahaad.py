"""MahaAD (Rippel et al., ICPR 2020): one global Gaussian per backbone stage of pooled features.

Rippel, Mertens, Merhof, "Modeling the Distribution of Normal Data in Pre-Trained Deep Features
for Anomaly Detection". Each training image is reduced, at EVERY stage of the backbone, to its
globally average-pooled feature vector; a multivariate Gaussian with a Ledoit-Wolf shrunk
covariance is fitted to these vectors per stage; an image's score is the sum over stages of the
Mahalanobis distances (not squared, as in the authors' code) of its pooled vectors.

"Every stage": the paper pools the output of each of EfficientNet-B4's nine blocks. Our backbones
return four stages, 'layer1'..'layer4' (strides 4, 8, 16, 32; see
`glad_jax.backbones.registry`), so the default is all four (`mahaad_layers`), not GLAD's
three. (Earlier versions of this module used GLAD's layers 1-3; that variant is
``MahaADConfig(layers=("layer1", "layer2", "layer3"))``, no longer registered.)

MahaAD is image-level only. For pixel metrics this module also returns a map: every feature
vector of the (unpooled) grid is scored against its layer's Gaussian, the per-layer distance maps
are bilinearly upsampled to the output size and summed, then smoothed like PaDiM's maps. This map
is an extension made here, not part of the MahaAD paper; the image score ignores it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from glad_jax.backbones import registry
from glad_jax.baselines import common
from glad_jax.mixture.gaussian import mahalanobis_sq, precision_cholesky


# Every spatial stage our backbones return (each registry spec's outputs, minus the classifier).
MAHAAD_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def mahaad_layers(backbone: str) -> tuple[str, ...]:
  """Every spatial stage that `backbone` returns (its registry outputs, without 'logits').

  Raises:
    ValueError: for an unknown backbone name (listing the known ones).
  """
  return tuple(name for name in registry.get_spec(backbone).outputs if name != "logits")


@dataclasses.dataclass(frozen=True)
class MahaADConfig:
  """Hyperparameters of MahaAD; the defaults are the paper's where it has one.

  Attributes:
    layers: backbone stages, one Gaussian each; the paper uses every stage (default: all four
      that our backbones return, see `mahaad_layers`).
    shrinkage: Ledoit-Wolf shrinkage of the covariance (paper); False = sample covariance.
    eps: ridge added to the covariance diagonal; guards a singular covariance when `shrinkage`
      is off and N <= d (MahaAD always shrinks, so 0 by default).
    sigma: Gaussian blur (pixels) of the per-position map (not in the paper; 4 as PaDiM, so the
      pixel metrics of all baselines are comparable); 0 disables it.
  """

  layers: tuple[str, ...] = MAHAAD_LAYERS
  shrinkage: bool = True
  eps: float = 0.0
  sigma: float = 4.0

  def replace(self, **changes) -> "MahaADConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def for_backbone(cls, backbone: str, **changes) -> "MahaADConfig":
    """The paper's MahaAD on `backbone`: one Gaussian on every stage it returns."""
    return cls(**{"layers": mahaad_layers(backbone), **changes})


@struct.dataclass
class MahaADState:
  """A fitted MahaAD model: one Gaussian per layer.

  Attributes:
    means: {layer: array of shape (d_l,)}, mean of the pooled training features.
    prec_chol: {layer: array of shape (d_l, d_l)}, P = L^{-T} with Sigma = L L^T, so that
      Sigma^{-1} = P P^T (see `glad_jax.mixture.gaussian.precision_cholesky`).
    shrinkage: {layer: array of shape ()}, the Ledoit-Wolf coefficient used (0 when off).
    layer_shapes: static, (h_l, w_l, d_l) of every layer at fit time.
    config: static, the config the state was fitted with.
  """

  means: dict[str, jax.Array]
  prec_chol: dict[str, jax.Array]
  shrinkage: dict[str, jax.Array]
  layer_shapes: tuple[tuple[int, int, int], ...] = struct.field(pytree_node=False)
  config: MahaADConfig = struct.field(pytree_node=False)


def ledoit_wolf(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004), as scikit-learn's ``LedoitWolf``.

  Sigma = (1 - rho) S + rho (tr(S) / d) I, where S is the maximum-likelihood (1/N) covariance
  and rho minimises the asymptotic Frobenius risk (estimated from the data, clipped to [0, 1]).

  Args:
    x: array of shape (N, d).

  Returns:
    (mean (d,), covariance (d, d), rho ()).
  """
  n, d = x.shape
  mean = jnp.mean(x, axis=0)
  xc = x - mean
  s = jnp.matmul(xc.T, xc, precision=common.HIGHEST) / n
  tr = jnp.trace(s)
  mu = tr / d
  # beta: estimated variance of the entries of S (how noisy S is), = sum_n ||x_n||^4 / N^2 ...
  sq_norms = jnp.sum(jnp.square(xc), axis=1)
  sum_s2 = jnp.sum(jnp.square(s))  # ||S||_F^2
  beta = (jnp.sum(jnp.square(sq_norms)) / n - sum_s2) / (d * n)
  # ... delta: distance of S to the shrinkage target mu I, ||S - mu I||_F^2 / d.
  delta = (sum_s2 - 2.0 * mu * tr + d * mu**2) / d
  beta = jnp.minimum(beta, delta)
  rho = jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)
  cov = (1.0 - rho) * s + rho * mu * jnp.eye(d, dtype=x.dtype)
  return mean, cov, rho


def _fit_layer(pooled: jax.Array, config: MahaADConfig):
  if config.shrinkage:
    mean, cov, rho = ledoit_wolf(pooled)
  else:
    n = pooled.shape[0]
    mean = jnp.mean(pooled, axis=0)
    xc = pooled - mean
    cov = jnp.matmul(xc.T, xc, precision=common.HIGHEST) / n  # ML estimate, like LedoitWolf's S
    rho = jnp.zeros((), pooled.dtype)
  cov = cov + config.eps * jnp.eye(cov.shape[0], dtype=cov.dtype)
  chol = jnp.linalg.cholesky(cov)
  with jax.default_matmul_precision("highest"):
    prec = precision_cholesky(chol[None])[0]
  return mean, prec, rho


@functools.partial(jax.jit, static_argnames=("config",))
def _fit(feats: dict[str, jax.Array], config: MahaADConfig):
  means, precs, rhos = {}, {}, {}
  for name in config.layers:
    pooled = jnp.mean(feats[name], axis=(1, 2))  # (N, d): global average pooling, as MahaAD
    means[name], precs[name], rhos[name] = _fit_layer(pooled, config)
  return means, precs, rhos


def fit_mahaad(features: common.Features, config: MahaADConfig = MahaADConfig(),
               key: jax.Array | None = None) -> MahaADState:
  """Fits one Gaussian per layer to the spatially pooled training features.

  Args:
    features: {layer: array of shape (N, h_l, w_l, d_l)} of N >= 2 normal training images.
    config: hyperparameters.
    key: unused (MahaAD is deterministic); accepted for the uniform `Baseline` interface.

  Returns:
    the fitted `MahaADState`.

  Raises:
    ValueError: on missing layers, bad shapes, fewer than 2 images, or a covariance that is
      not positive definite.
  """
  del key
  _check_config(config)
  feats = common.check_features(features, config.layers, min_samples=2)
  means, precs, rhos = _fit(feats, config)
  for name in config.layers:
    if not bool(jnp.all(jnp.isfinite(precs[name]))):
      raise ValueError(
          f"the covariance of layer {name!r} is not positive definite (N = "
          f"{feats[name].shape[0]} images, d = {feats[name].shape[-1]}): keep shrinkage=True "
          f"or set eps > 0, and check the features for constant or non-finite values")
  shapes = tuple(tuple(int(s) for s in feats[name].shape[1:]) for name in config.layers)
  return MahaADState(means=means, prec_chol=precs, shrinkage=rhos, layer_shapes=shapes,
                     config=config)


def _distance(x: jax.Array, mean: jax.Array, prec: jax.Array) -> jax.Array:
  """Mahalanobis distance of each row of x (M, d) to N(mean, (P P^T)^{-1}); returns (M,)."""
  with jax.default_matmul_precision("highest"):
    # Centre first: x^T P - mu^T P would subtract two large, nearly equal numbers.
    d2 = mahalanobis_sq(x - mean, jnp.zeros_like(mean)[None], prec[None])[:, 0]
  return common.safe_sqrt(d2)


@functools.partial(jax.jit, static_argnames=("out_size",))
def _score(state: MahaADState, feats: dict[str, jax.Array], out_size: int):
  config = state.config
  scores = 0.0
  maps = 0.0
  for name in config.layers:
    x = feats[name]
    b, h, w, d = x.shape
    mean, prec = state.means[name], state.prec_chol[name]
    scores = scores + _distance(jnp.mean(x, axis=(1, 2)), mean, prec)
    grid = _distance(x.reshape(b * h * w, d), mean, prec).reshape(b, h, w)
    maps = maps + common.resize_bilinear(grid, (out_size, out_size))
  return scores, common.gaussian_blur(maps, config.sigma)


def score_mahaad(state: MahaADState, features: common.Features,
                 out_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Scores images with a fitted MahaAD model; higher = more anomalous.

  Args:
    state: from `fit_mahaad`.
    features: {layer: array of shape (B, h_l, w_l, d_l)}, same layers/shapes as for fitting.
    out_size: side of the returned anomaly maps.

  Returns:
    image_scores: array of shape (B,), sum over layers of the Mahalanobis distance of the
      pooled feature vector (MahaAD's score).
    anomaly_maps: array of shape (B, out_size, out_size), the per-position distance maps summed
      over layers (see the module docstring: an extension for pixel metrics).
  """
  feats = common.check_features(features, state.config.layers)
  common.check_layer_shapes(feats, state.config.layers, state.layer_shapes)
  return _score(state, feats, common.check_out_size(out_size))


def _check_config(config: MahaADConfig) -> None:
  if not isinstance(config, MahaADConfig):
    raise ValueError(f"config should be a MahaADConfig, got {type(config).__name__}")
  if config.eps < 0:
    raise ValueError(f"MahaADConfig.eps should be >= 0, got {config.eps}")
  if config.sigma < 0:
    raise ValueError(f"MahaADConfig.sigma should be >= 0, got {config.sigma}")
