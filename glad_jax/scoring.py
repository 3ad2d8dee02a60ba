"""Log-likelihood maps of the global-local model, layer fusion, masks and image scores.

Section 3.3 of the paper: every feature vector u(x) of a test image gets the log-likelihood

  log p(u(x)) = logsumexp_k [log pi_k(x) + log N(u(x); mu_k, Sigma_k)]

under the mixture of its position, with the local weights pi_k(x) of Eq. 10-12 (or the global
pi_k in the global-only ablation). The per-layer maps are upsampled bilinearly to a common size
and summed (the product of the probabilities: the layers are taken as independent). The
anomaly map is minus the fused log-likelihood; the image score is minus its q-quantile
(q = 0.005, Section 4.1), so that higher means more anomalous in both.

Sparse scoring evaluates only the non-zero pi_k(x): the tiles of `SparseLocalWeights` (one
component, T positions each) are processed as one batched (B * T, d) x (d, d) product per
tile, and the per-position logsumexp is a scatter (segment max, then segment sum of exp).
The cost follows the number of non-zero weights, not K * h * w.

Masks: a boolean (H, W) array at the fused size, True where anomalies are looked for. Pixels
outside are left out of the quantile, and in the anomaly map they are set to the smallest
anomaly value inside the mask of the same image ("as normal as the most normal evaluated
pixel"): the map stays finite, its colour scale is not stretched by the background, and a
pixel-level metric counts them as normal, which is what ignoring them means.

Pure math: no I/O; validation happens once, in `score`.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax.local import SparseLocalWeights
from glad_jax.mixture.gaussian import (
    GaussianMixture,
    cholesky_log_det,
    component_log_prob,
    precision_cholesky,
)

DEFAULT_SIZE = (256, 256)  # backbone input size of the paper (Section 4.1)
DEFAULT_QUANTILE = 0.005  # q of the image score (Section 4.1)
# Bounds (in float32 words) of the largest intermediate of one scoring step.
_DEFAULT_BLOCK_ELEMENTS = 2**24  # sparse: (tiles, T, B, d) gathered features: 64 MB
_DEFAULT_DENSE_ELEMENTS = 2**24  # dense/global: (n, K, d) of `component_log_prob`: 64 MB


@struct.dataclass
class LayerModel:
  """What scoring needs for one layer, precomputed once per fitted model.

  Attributes:
    means: array of shape (K, d), mu_k.
    prec_chol: array of shape (K, d, d), precision factors P_k = L_k^{-T}.
    log_det: array of shape (K,), log|Sigma_k|.
    log_weights: array of shape (K,), log of the global weights pi_k.
    local: the sparse local weight map, or None for the global-only ablation.
    grid_shape: (h, w) of the layer's feature grid (static).
    radius: disk radius r the local weights were fitted with (static; None without local weights, or
      from a checkpoint written before the radius was stored per layer: then the config's).
  """

  means: jax.Array
  prec_chol: jax.Array
  log_det: jax.Array
  log_weights: jax.Array
  local: SparseLocalWeights | None
  grid_shape: tuple[int, int] = struct.field(pytree_node=False)
  radius: float | None = struct.field(pytree_node=False, default=None)

  @property
  def n_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def feature_shape(self) -> tuple[int, int, int]:
    """(h, w, d) that the layer's features must have."""
    return (*self.grid_shape, self.dim)


class Scores(NamedTuple):
  """Output of `score`.

  Attributes:
    anomaly_map: array of shape (B, H, W), minus the fused log-likelihood (higher = more
      anomalous); outside the mask, the smallest value inside it (see module docstring).
    image_score: array of shape (B,), minus the q-quantile of the fused log-likelihood over
      the (masked) pixels.
    log_likelihood: array of shape (B, H, W), the fused log-likelihood, unmasked.
  """

  anomaly_map: jax.Array
  image_score: jax.Array
  log_likelihood: jax.Array


def make_layer_model(mixture: GaussianMixture, grid_shape: tuple[int, int],
                     local: SparseLocalWeights | None = None, radius: float | None = None) -> LayerModel:
  """Precomputes the scoring state of one layer (precision factors, log-dets, log-weights).

  Args:
    mixture: the global mixture of the layer.
    grid_shape: (h, w) of the layer's feature grid.
    local: its sparse local weights (None: global-only scoring).
    radius: the disk radius `local` was fitted with (kept for online updates; ignored without `local`).

  Raises:
    ValueError: if `local` was fitted on another grid or another number of components.
  """
  grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
  if local is not None:
    if tuple(local.grid_shape) != grid_shape:
      raise ValueError(f"local weights have grid shape {tuple(local.grid_shape)}, "
                       f"expected {grid_shape}")
    if local.n_components != mixture.n_components:
      raise ValueError(f"local weights have K={local.n_components} components but the "
                       f"mixture has K={mixture.n_components}")
  return LayerModel(means=mixture.means, prec_chol=precision_cholesky(mixture.cov_chol),
                    log_det=cholesky_log_det(mixture.cov_chol),
                    log_weights=jnp.log(mixture.weights), local=local, grid_shape=grid_shape,
                    radius=None if local is None or radius is None else float(radius))


def _segment_logsumexp(values: jax.Array, segments: jax.Array, n_segments: int) -> jax.Array:
  """logsumexp of the rows of `values` (n, B) grouped by `segments` (n,); returns (S, B).

  Empty segments and segments of only -inf give -inf (never NaN).
  """
  top = jax.ops.segment_max(values, segments, num_segments=n_segments)
  # An empty or all -inf segment has top = -inf; shift it by 0 so exp(-inf - 0) = 0.
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  total = jax.ops.segment_sum(jnp.exp(values - shift[segments]), segments,
                              num_segments=n_segments)
  # The dummy padding position has total = 0: guard log(0) so its derivative is not 0/0 (NaN gradients
  # would otherwise reach the last feature position, e.g. in PGD through the scorer).
  positive = total > 0
  return jnp.where(positive, shift + jnp.log(jnp.where(positive, total, 1.0)), -jnp.inf)


def _sparse_block_size(batch: int, tile_size: int, dim: int, n_tiles: int,
                       max_elements: int) -> int:
  return int(max(1, min(n_tiles, max_elements // max(1, batch * tile_size * dim))))


@functools.partial(jax.jit, static_argnames=("max_elements",))
def sparse_log_likelihood(layer: LayerModel, features: jax.Array,
                          max_elements: int = _DEFAULT_BLOCK_ELEMENTS) -> jax.Array:
  """Log-likelihood map over the non-zero local weights only (Section 3.2-3.3).

  Per tile (component k, positions x_1..x_T): gather u(x_t) for all images, subtract mu_k,
  multiply by P_k (one (B * T, d) x (d, d) product, batched over a block of tiles), add
  log pi_k(x_t); then a per-position logsumexp by scatter. Cost: n_tiles * B * T * d^2,
  with n_tiles = sum_k ceil(nnz_k / T), independent of K for a fixed number of non-zeros.
  Assumes valid input (see `score`).

  Args:
    layer: a LayerModel whose `local` is not None.
    features: array of shape (B, h, w, d).
    max_elements: bound on the (tiles, T, B, d) gathered block; sets tiles per block.

  Returns:
    array of shape (B, h, w), log p(u(x)).
  """
  sp = layer.local
  b, h, w, d = features.shape
  n_pos = h * w
  # Position-major (P, B, d): a tile's gather is then one (T, B, d) slab per tile and the
  # product below a batched matmul with the tile as leading batch dimension.
  x = jnp.swapaxes(features.reshape(b, n_pos, d), 0, 1)
  n_tiles, t = sp.tile_position.shape
  block = _sparse_block_size(b, t, d, n_tiles, max_elements)
  n_blocks = -(-n_tiles // block)
  pad = n_blocks * block - n_tiles
  # Padding tiles: component 0, dummy position n_pos, log-weight -inf: they add nothing.
  comp = jnp.pad(sp.tile_component, (0, pad)).reshape(n_blocks, block)
  pos = jnp.pad(sp.tile_position, ((0, pad), (0, 0)), constant_values=n_pos)
  log_w = jnp.pad(sp.tile_log_weight, ((0, pad), (0, 0)), constant_values=-jnp.inf)
  const = d * math.log(2.0 * math.pi)

  def tile_block(args):
    c, p, lw = args  # (block,), (block, T), (block, T)
    # The dummy position reads a real feature (clipped index); its -inf weight discards it.
    u = jnp.take(x, jnp.minimum(p, n_pos - 1), axis=0)  # (block, T, B, d)
    diff = u.reshape(-1, t * b, d) - layer.means[c][:, None, :]  # (block, T * B, d)
    # HIGHEST: full float32 products (the default is TF32 on GPUs, ~1e-3 relative error).
    y = jnp.einsum("snd,sde->sne", diff, layer.prec_chol[c],  # one (T*B, d) x (d, d) per tile
                   precision=jax.lax.Precision.HIGHEST)
    maha = jnp.sum(jnp.square(y), axis=-1).reshape(-1, t, b)  # (block, T, B)
    return -0.5 * (const + layer.log_det[c][:, None, None] + maha) + lw[..., None]

  if n_blocks == 1:
    values = tile_block((comp[0], pos, log_w))[None]
  else:
    values = jax.lax.map(tile_block, (comp, pos.reshape(n_blocks, block, t),
                                      log_w.reshape(n_blocks, block, t)))
  # (n_blocks, block, T, B) -> (n_blocks * block * T, B), the row order of pos.reshape(-1).
  values = values.reshape(-1, b)
  ll = _segment_logsumexp(values, pos.reshape(-1), n_pos + 1)[:n_pos]  # drop the dummy
  return ll.T.reshape(b, h, w)


def _mixture_log_likelihood(x: jax.Array, table_index: jax.Array, log_w_table: jax.Array,
                            layer: LayerModel, max_elements: int) -> jax.Array:
  """logsumexp_k [log_w_table[i_n, k] + log N(x_n; mu_k, Sigma_k)] over all K, chunked.

  Args:
    x: array of shape (N, d).
    table_index: int array of shape (N,), the row of `log_w_table` of each sample.
    log_w_table: array of shape (R, K).

  Returns:
    array of shape (N,).
  """
  n, d = x.shape
  k = layer.n_components
  rows = int(max(1, min(n, max_elements // (k * d))))
  n_chunks = -(-n // rows)
  pad = n_chunks * rows - n
  xc = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, rows, d)
  ic = jnp.pad(table_index, (0, pad)).reshape(n_chunks, rows)

  def chunk(args):
    xb, ib = args
    lp = component_log_prob(xb, layer.means, layer.prec_chol, layer.log_det)  # (rows, K)
    return jax.nn.logsumexp(lp + log_w_table[ib], axis=-1)

  return jax.lax.map(chunk, (xc, ic)).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("max_elements",))
def dense_log_likelihood(layer: LayerModel, features: jax.Array, log_weights: jax.Array,
                         max_elements: int = _DEFAULT_DENSE_ELEMENTS) -> jax.Array:
  """Log-likelihood map with all K components and a dense weight map (reference path).

  Args:
    layer: the layer's model (its `local` is ignored).
    features: array of shape (B, h, w, d).
    log_weights: array of shape (h, w, K), log pi_k(x) (-inf for zero weights), e.g.
      `glad_jax.local.to_dense(layer.local)`.
    max_elements: bound on the (n, K, d) intermediate; sets the chunk size.

  Returns:
    array of shape (B, h, w).
  """
  b, h, w, d = features.shape
  index = jnp.tile(jnp.arange(h * w), b)
  ll = _mixture_log_likelihood(features.reshape(-1, d), index,
                               log_weights.reshape(h * w, -1), layer, max_elements)
  return ll.reshape(b, h, w)


@functools.partial(jax.jit, static_argnames=("max_elements",))
def global_log_likelihood(layer: LayerModel, features: jax.Array,
                          max_elements: int = _DEFAULT_DENSE_ELEMENTS) -> jax.Array:
  """Log-likelihood map under the global weights pi_k at every position (ablation).

  Args:
    layer: the layer's model (its `local` is ignored).
    features: array of shape (B, h, w, d).
    max_elements: bound on the (n, K, d) intermediate; sets the chunk size.

  Returns:
    array of shape (B, h, w).
  """
  b, h, w, d = features.shape
  ll = _mixture_log_likelihood(features.reshape(-1, d), jnp.zeros((b * h * w,), jnp.int32),
                               layer.log_weights[None], layer, max_elements)
  return ll.reshape(b, h, w)


def layer_log_likelihood(layer: LayerModel, features: jax.Array) -> jax.Array:
  """Sparse local scoring when the layer has local weights, global-only otherwise; (B, h, w)."""
  if layer.local is None:
    return global_log_likelihood(layer, features)
  return sparse_log_likelihood(layer, features)


def fuse_log_likelihoods(maps: Sequence[jax.Array], size: tuple[int, int] = DEFAULT_SIZE,
                         ) -> jax.Array:
  """Sum of the per-layer log-likelihood maps, each resized bilinearly to `size` (Sec. 3.3).

  Summing log-likelihoods is the product of the layers' probabilities, i.e. the layers are
  treated as independent. The resize is `jax.image.resize(..., "bilinear")`: half-pixel
  centres with the border values repeated, as PyTorch's interpolate(align_corners=False).

  Args:
    maps: sequence of arrays of shape (B, h_l, w_l).
    size: (H, W) of the fused map.

  Returns:
    array of shape (B, H, W).
  """
  fused = None
  for m in maps:
    up = jax.image.resize(m, (m.shape[0], *size), method="bilinear")
    fused = up if fused is None else fused + up
  return fused


def anomaly_map(log_likelihood: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Minus the fused log-likelihood; outside `mask`, each image's smallest value inside it.

  Args:
    log_likelihood: array of shape (B, H, W).
    mask: optional bool array of shape (H, W), True where anomalies are looked for.

  Returns:
    array of shape (B, H, W).
  """
  amap = -log_likelihood
  if mask is None:
    return amap
  inside_min = jnp.min(jnp.where(mask[None], amap, jnp.inf), axis=(1, 2), keepdims=True)
  return jnp.where(mask[None], amap, inside_min)


def _low_quantile(values: jax.Array, mask: jax.Array | None, quantile: float) -> jax.Array:
  """Row-wise q-quantile, NumPy's 'linear' rule, for q <= 1/2, from the k smallest values only.

  With n kept values, h = q (n - 1) and the quantile interpolates the order statistics
  floor(h) and floor(h) + 1, so only the k = floor(q (n_all - 1)) + 2 smallest values are needed
  (n <= n_all, the row length, bounds k statically even when the mask is traced): `lax.top_k`
  on k ~ 0.5 % of the pixels instead of sorting all of them (16.5 -> 0.3 ms per 256x256 map on
  a 2-core CPU).
  """
  b, n_all = values.shape
  k = min(n_all, int(math.floor(quantile * (n_all - 1))) + 2)
  if mask is None:
    n = jnp.float32(n_all)
    x = values
  else:
    keep = mask.reshape(1, -1)
    n = jnp.sum(keep).astype(jnp.float32)
    x = jnp.where(keep, values, jnp.inf)      # left out: never among the n smallest
  smallest = -jax.lax.top_k(-x, k)[0]         # (B, k), ascending
  h = quantile * (n - 1.0)
  lo = jnp.floor(h).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n.astype(jnp.int32) - 1)
  a, c = smallest[:, lo], smallest[:, hi]
  return jnp.where(n > 0, a + (h - lo) * (c - a), jnp.nan)


def image_score(log_likelihood: jax.Array, mask: jax.Array | None = None,
                quantile: float = DEFAULT_QUANTILE) -> jax.Array:
  """Minus the q-quantile of the log-likelihood over the (masked) pixels (Sec. 3.3, 4.1).

  The quantile interpolates linearly between order statistics, as `np.quantile`'s default. It
  is computed from the few extreme values it needs (`lax.top_k`), not a sort of the map, so q
  must be a Python float (static under jit).

  Args:
    log_likelihood: array of shape (B, H, W).
    mask: optional bool array of shape (H, W); pixels outside are left out.
    quantile: q in [0, 1], a Python float.

  Returns:
    array of shape (B,), higher = more anomalous (NaN for an empty mask).
  """
  b = log_likelihood.shape[0]
  flat = log_likelihood.reshape(b, -1)
  q = float(quantile)
  if q <= 0.5:
    return -_low_quantile(flat, mask, q)
  # The q-quantile of x is minus the (1 - q)-quantile of -x under the linear rule.
  return _low_quantile(-flat, mask, 1.0 - q)


@functools.partial(jax.jit, static_argnames=("quantile", "size"))
def score_unchecked(layers: dict[str, LayerModel], features: dict[str, jax.Array],
                    mask: jax.Array | None, quantile: float, size: tuple[int, int]) -> Scores:
  """`score` without input validation: the jitted core, for callers that validated already
  (e.g. the fused backbone + scoring function of `glad_jax.model`, which compose it under jit)."""
  names = sorted(layers)
  maps = [layer_log_likelihood(layers[n], features[n]) for n in names]
  fused = fuse_log_likelihoods(maps, size)
  return Scores(anomaly_map=anomaly_map(fused, mask),
                image_score=image_score(fused, mask, quantile), log_likelihood=fused)


def _check_score_inputs(layers: Mapping[str, LayerModel], features: Mapping[str, object],
                        size: tuple[int, int], mask: object,
                        quantile: float) -> tuple[dict, dict, jax.Array | None]:
  if not layers:
    raise ValueError("no layer models given")
  missing = sorted(set(layers) - set(features))
  extra = sorted(set(features) - set(layers))
  if missing:
    raise ValueError(f"features missing for layer(s) {missing}; got layers {sorted(features)}")
  if extra:
    raise ValueError(f"features given for unknown layer(s) {extra}; the model has layers "
                     f"{sorted(layers)}")
  feats, batch = {}, None
  for name in sorted(layers):
    f = features[name]
    f = f if isinstance(f, jax.Array) else np.asarray(f)
    expected = layers[name].feature_shape
    if f.ndim != 4 or tuple(f.shape[1:]) != expected:
      raise ValueError(f"layer '{name}': features have shape {tuple(f.shape)}, expected "
                       f"(B, h, w, d) with (h, w, d) = {expected} as fitted")
    if batch is None:
      batch = (name, f.shape[0])
    elif f.shape[0] != batch[1]:
      raise ValueError(f"layer '{name}' has batch size {f.shape[0]} but layer '{batch[0]}' "
                       f"has {batch[1]}")
    if not jnp.issubdtype(f.dtype, jnp.floating):
      f = f.astype(np.float32)
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(f)))):
      raise ValueError(f"layer '{name}': features contain NaN or infinite values")
    feats[name] = jnp.asarray(f, layers[name].means.dtype)
  if batch[1] == 0:
    raise ValueError("features hold no image (batch size 0)")
  if (len(size) != 2 or any(int(s) != s or s < 1 for s in size)):
    raise ValueError(f"size should be two positive integers (H, W), got {size}")
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile should be in [0, 1], got {quantile}")
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != tuple(size):
      raise ValueError(f"mask has shape {mask.shape} but the fused maps have size {tuple(size)}")
    if mask.dtype != bool:
      raise ValueError(f"mask should be a boolean array, got dtype {mask.dtype}")
    if not mask.any():
      raise ValueError("mask is empty: no pixel left to score")
    mask = jnp.asarray(mask)
  return dict(layers), feats, mask


def score(layers: Mapping[str, LayerModel], features: Mapping[str, jax.Array | np.ndarray],
          size: tuple[int, int] = DEFAULT_SIZE, mask: jax.Array | np.ndarray | None = None,
          quantile: float = DEFAULT_QUANTILE) -> Scores:
  """Anomaly maps and image scores of a batch of images (Section 3.3).

  Public entry point: validates the input once, then runs one jit-compiled function
  (compiled once per model, batch size and output size).

  Args:
    layers: {layer name: LayerModel}.
    features: {layer name: array of shape (B, h, w, d)}, the same names as `layers`.
    size: (H, W) of the fused maps (default: the backbone input size, 256 x 256).
    mask: optional bool array of shape (H, W), True where anomalies are looked for.
    quantile: q of the image score (paper: 0.005).

  Returns:
    Scores(anomaly_map (B, H, W), image_score (B,), log_likelihood (B, H, W)).

  Raises:
    ValueError: on missing or unknown layers, features whose (h, w, d) differ from the fitted
      model's (the message names the layer and both shapes), different batch sizes, NaN or
      infinite features, a bad size, quantile or mask.
  """
  size = tuple(size)
  layers, feats, mask = _check_score_inputs(layers, features, size, mask, quantile)
  return score_unchecked(layers, feats, mask, float(quantile),
                tuple(int(s) for s in size))
