"""PaDiM (Defard et al., ICPR workshops 2021): one Gaussian per position of the feature grid.

Defard, Setkov, Loesch, Audigier, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization". The layers are brought to the resolution of the first one by
nearest upsampling and concatenated; a seeded random subset of d' channels is kept; at every
position (i, j) a Gaussian N(mu_ij, Sigma_ij) is fitted over the N training images with
Sigma_ij = sample covariance (1 / (N - 1)) + 0.01 I. A test feature's score is its Mahalanobis
distance to its position's Gaussian; the distance map is bilinearly upsampled to the image size
and smoothed by a Gaussian of sigma 4, and the image score is the map's maximum.

The model stores, per position, the precision Cholesky factor P_ij = L_ij^{-T} (Sigma_ij = L L^T)
so that scoring is a batched matmul (`glad_jax.mixture.gaussian.mahalanobis_sq`, vmapped over
positions); its size is h_1 * w_1 * d'^2 floats, e.g. 4096 * 550^2 * 4 B = 5 GB for WRN50-2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax.baselines import common
from glad_jax.mixture.gaussian import mahalanobis_sq, precision_cholesky

# Defaults from the paper (random dimensionality reduction to d' = 100 channels for ResNet18 and
# d' = 550 for WideResNet50-2); other backbones use 100. Always capped at the available number
# of channels.
_N_FEATURES_DEFAULTS = {
    "resnet18": 100,
    "wide_resnet50_2": 550,
}
_N_FEATURES_FALLBACK = 100


@dataclasses.dataclass(frozen=True)
class PadimConfig:
  """Hyperparameters of PaDiM; defaults from the paper (ResNet18 setting).

  Attributes:
    layers: backbone layers; the first one sets the resolution of the model's grid.
    n_features: d', size of the random channel subset (capped at the concatenated channel
      count); None keeps every channel. See `PadimConfig.for_backbone`.
    epsilon: ridge added to every covariance (paper: 0.01).
    sigma: Gaussian blur of the upsampled map in pixels (paper: 4); 0 disables it.
    position_chunk: positions fitted at once (bounds the memory of the fit, not the result).
  """

  layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
  n_features: int | None = _N_FEATURES_DEFAULTS["resnet18"]
  epsilon: float = 0.01
  sigma: float = 4.0
  position_chunk: int = 1024

  def replace(self, **changes) -> "PadimConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def for_backbone(cls, backbone: str, **changes) -> "PadimConfig":
    """The paper's d' for a backbone registry name ('resnet18': 100, 'wide_resnet50_2': 550).

    Anti-aliased variants (any name containing one of these) get the same value; other
    backbones get 100.
    """
    name = backbone.lower().replace("-", "_")
    n = _N_FEATURES_FALLBACK
    for known, value in _N_FEATURES_DEFAULTS.items():
      if known in name:
        n = value
    return cls(n_features=n).replace(**changes)


@struct.dataclass
class PadimState:
  """A fitted PaDiM model on a (h, w) grid with d' channels.

  Attributes:
    means: array of shape (h * w, d'), mu_ij.
    prec_chol: array of shape (h * w, d', d'), P_ij = L_ij^{-T}.
    channel_idx: int32 array of shape (d',), sorted indices of the kept channels in the
      concatenation of the layers (in `config.layers` order).
    layer_shapes: static, (h_l, w_l, d_l) of every layer at fit time.
    layer_counts: static, how many of the kept channels come from each layer.
    config: static, the config the state was fitted with.
  """

  means: jax.Array
  prec_chol: jax.Array
  channel_idx: jax.Array
  layer_shapes: tuple[tuple[int, int, int], ...] = struct.field(pytree_node=False)
  layer_counts: tuple[int, ...] = struct.field(pytree_node=False)
  config: PadimConfig = struct.field(pytree_node=False)

  @property
  def grid(self) -> tuple[int, int]:
    return self.layer_shapes[0][:2]


def select_channels(key: jax.Array, layer_dims: tuple[int, ...],
                    n_features: int | None) -> np.ndarray:
  """Seeded random subset of the concatenated channels, sorted (order is irrelevant to a
  Mahalanobis distance; sorted indices let each layer be sliced before upsampling).

  Returns:
    int32 array of shape (min(n_features, sum(layer_dims)),).
  """
  total = int(sum(layer_dims))
  n = total if n_features is None else min(int(n_features), total)
  idx = jax.random.choice(key, total, (n,), replace=False)
  return np.sort(np.asarray(idx)).astype(np.int32)


def padim_embedding(feats: dict[str, jax.Array], layers: tuple[str, ...],
                    channel_idx: jax.Array, layer_counts: tuple[int, ...]) -> jax.Array:
  """Concatenated, channel-subsampled features on the first layer's grid.

  Same as upsampling every layer to the first layer's (h, w) with nearest neighbours,
  concatenating and keeping the channels `channel_idx`, but subsamples each layer first, so the
  full concatenation is never materialised.

  Args:
    feats: {layer: array of shape (N, h_l, w_l, d_l)}.
    layers: the layers, in concatenation order.
    channel_idx: sorted int array of shape (d',) into the concatenated channels.
    layer_counts: static number of entries of `channel_idx` falling in each layer.

  Returns:
    array of shape (N, h_1, w_1, d').
  """
  h, w = feats[layers[0]].shape[1:3]
  parts = []
  start, offset = 0, 0
  for name, count in zip(layers, layer_counts):
    x = feats[name]
    if count:
      local = channel_idx[start:start + count] - offset
      parts.append(common.upsample_nearest(jnp.take(x, local, axis=-1), (h, w)))
    start += count
    offset += x.shape[-1]
  return jnp.concatenate(parts, axis=-1)


def _fit_position(x: jax.Array, epsilon: float):
  """Mean and precision Cholesky factor of the samples x (N, d') of one position."""
  n, d = x.shape
  mean = jnp.mean(x, axis=0)
  xc = x - mean
  cov = jnp.matmul(xc.T, xc, precision=common.HIGHEST) / (n - 1)  # unbiased, as np.cov
  cov = cov + epsilon * jnp.eye(d, dtype=x.dtype)
  chol = jnp.linalg.cholesky(cov)
  with jax.default_matmul_precision("highest"):
    prec = precision_cholesky(chol[None])[0]
  return mean, prec


@functools.partial(jax.jit, static_argnames=("layer_counts", "config"))
def _fit(feats, channel_idx, layer_counts, config: PadimConfig):
  emb = padim_embedding(feats, config.layers, channel_idx, layer_counts)
  n, h, w, d = emb.shape
  per_position = jnp.transpose(emb.reshape(n, h * w, d), (1, 0, 2))  # (P, N, d')
  fit = functools.partial(_fit_position, epsilon=config.epsilon)
  # lax.map over chunks of positions: the vmapped Cholesky of one chunk at a time bounds the
  # working memory at position_chunk * d'^2 floats on top of the result.
  return jax.lax.map(fit, per_position, batch_size=min(config.position_chunk, h * w))


def fit_padim(features: common.Features, config: PadimConfig = PadimConfig(),
              key: jax.Array | None = None) -> PadimState:
  """Fits one Gaussian per position of the first layer's grid.

  Args:
    features: {layer: array of shape (N, h_l, w_l, d_l)} of N >= 2 normal training images.
    config: hyperparameters.
    key: PRNG key of the random channel subset (None: `jax.random.key(0)`).

  Returns:
    the fitted `PadimState`.

  Raises:
    ValueError: on missing layers, bad shapes, fewer than 2 images, a bad config value, or a
      covariance that is not positive definite.
  """
  _check_config(config)
  feats = common.check_features(features, config.layers, min_samples=2)
  if key is None:
    key = jax.random.key(0)
  dims = tuple(int(feats[name].shape[-1]) for name in config.layers)
  idx = select_channels(key, dims, config.n_features)
  offsets = np.cumsum((0,) + dims)
  counts = tuple(int(np.sum((idx >= lo) & (idx < hi))) for lo, hi in zip(offsets[:-1],
                                                                          offsets[1:]))
  means, precs = _fit(feats, jnp.asarray(idx), counts, config)
  if not bool(jnp.all(jnp.isfinite(precs))):
    raise ValueError(f"a per-position covariance is not positive definite (N = "
                     f"{feats[config.layers[0]].shape[0]} images, d' = {idx.size}, epsilon = "
                     f"{config.epsilon}): raise epsilon and check the features for non-finite "
                     f"values")
  shapes = tuple(tuple(int(s) for s in feats[name].shape[1:]) for name in config.layers)
  return PadimState(means=means, prec_chol=precs, channel_idx=jnp.asarray(idx),
                    layer_shapes=shapes, layer_counts=counts, config=config)


def _position_distances(emb: jax.Array, means: jax.Array, prec: jax.Array) -> jax.Array:
  """Mahalanobis distance of emb (B, P, d') to the Gaussian of each position; returns (B, P)."""

  def one_position(x, mean, p):  # x (B, d'), mean (d',), p (d', d') -> (B,)
    return mahalanobis_sq(x - mean, jnp.zeros_like(mean)[None], p[None])[:, 0]

  with jax.default_matmul_precision("highest"):
    d2 = jax.vmap(one_position, in_axes=(1, 0, 0), out_axes=1)(emb, means, prec)
  return common.safe_sqrt(d2)


@functools.partial(jax.jit, static_argnames=("out_size",))
def _score(state: PadimState, feats, out_size: int):
  config = state.config
  emb = padim_embedding(feats, config.layers, state.channel_idx, state.layer_counts)
  b, h, w, d = emb.shape
  dist = _position_distances(emb.reshape(b, h * w, d), state.means, state.prec_chol)
  maps = common.finish_maps(dist.reshape(b, h, w), out_size, config.sigma)
  return jnp.max(maps, axis=(1, 2)), maps


def score_padim(state: PadimState, features: common.Features,
                out_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Scores images with a fitted PaDiM model; higher = more anomalous.

  Args:
    state: from `fit_padim`.
    features: {layer: array of shape (B, h_l, w_l, d_l)}, same layers/shapes as for fitting.
    out_size: side of the returned anomaly maps.

  Returns:
    image_scores: array of shape (B,), the maximum of each anomaly map.
    anomaly_maps: array of shape (B, out_size, out_size): per-position Mahalanobis distances,
      bilinearly upsampled and blurred (sigma = config.sigma).
  """
  feats = common.check_features(features, state.config.layers)
  common.check_layer_shapes(feats, state.config.layers, state.layer_shapes)
  return _score(state, feats, common.check_out_size(out_size))


def _check_config(config: PadimConfig) -> None:
  if not isinstance(config, PadimConfig):
    raise ValueError(f"config should be a PadimConfig, got {type(config).__name__}")
  if config.n_features is not None and config.n_features < 1:
    raise ValueError(f"PadimConfig.n_features should be >= 1 or None, got {config.n_features}")
  if config.epsilon < 0:
    raise ValueError(f"PadimConfig.epsilon should be >= 0, got {config.epsilon}")
  if config.sigma < 0:
    raise ValueError(f"PadimConfig.sigma should be >= 0, got {config.sigma}")
  if config.position_chunk < 1:
    raise ValueError(f"PadimConfig.position_chunk should be >= 1, got {config.position_chunk}")
