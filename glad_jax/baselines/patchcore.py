"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

Roth, Pemula, Zepeda, Schoelkopf, Brox, Gehler, "Towards Total Recall in Industrial Anomaly
Detection".

- Locally aware patch features (Section 3.1): every layer is 3x3 average pooled (stride 1, zero
  padding counted in the average, as ``AvgPool2d(3, 1, 1)``), the deeper layers are bilinearly
  upsampled to the first layer's grid and all are concatenated (default layers 2 and 3).
- Coreset subsampling (Section 3.2, Algorithm 1): greedy k-center selection of a fraction of the
  patches (default 10%), distances measured after a random linear projection to d* = 128 dims
  (Johnson-Lindenstrauss) to make the selection cheaper.
- Scoring (Section 3.3, Eq. 6-7): a patch's score is its distance s* to its nearest neighbour
  m* in the memory bank; the anomaly map is the patch-score grid bilinearly upsampled and
  smoothed (sigma 4). The image score re-weights the largest patch score,
  s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) s*,
  where m_test,* is the patch reaching the maximum and N_b(m*) the b = 9 nearest neighbours of
  m* in the bank (m* itself included, as in anomalib). b = 1 disables the re-weighting.

All distance searches are chunked over queries and over the bank, so memory stays at
`query_chunk * bank_chunk` distances whatever the bank size (~100k x 1000 is fine).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from glad_jax.baselines import common


@dataclasses.dataclass(frozen=True)
class PatchcoreConfig:
  """Hyperparameters of PatchCore; defaults from the paper.

  Attributes:
    layers: backbone layers (paper: the 2nd and 3rd ResNet stages); the first sets the grid.
    patch_size: neighbourhood p of the local average pooling (paper: 3).
    coreset_ratio: fraction of all training patches kept in the memory bank (paper: 10%, also
      1% and 25%); 1.0 keeps every patch and skips the selection.
    projection_dim: d* of the random projection used only to measure coreset distances
      (paper: 128); None measures them on the full features.
    num_neighbors: b of the image-score re-weighting, Eq. 7 (paper: 9); 1 = plain maximum.
    sigma: Gaussian blur of the upsampled map in pixels (paper: 4); 0 disables it.
    query_chunk: test patches compared to the bank at once.
    bank_chunk: bank entries compared at once.
  """

  layers: tuple[str, ...] = ("layer2", "layer3")
  patch_size: int = 3
  coreset_ratio: float = 0.1
  projection_dim: int | None = 128
  num_neighbors: int = 9
  sigma: float = 4.0
  query_chunk: int = 1024
  bank_chunk: int = 8192

  def replace(self, **changes) -> "PatchcoreConfig":
    return dataclasses.replace(self, **changes)


@struct.dataclass
class PatchcoreState:
  """A fitted PatchCore model.

  Attributes:
    memory_bank: array of shape (M, D), the coreset of training patch features.
    layer_shapes: static, (h_l, w_l, d_l) of every layer at fit time.
    config: static, the config the state was fitted with.
  """

  memory_bank: jax.Array
  layer_shapes: tuple[tuple[int, int, int], ...] = struct.field(pytree_node=False)
  config: PatchcoreConfig = struct.field(pytree_node=False)


# ---------------------------------------------------------------------------------------------
# Patch features
# ---------------------------------------------------------------------------------------------


def local_average(x: jax.Array, patch_size: int) -> jax.Array:
  """p x p average pooling, stride 1, zero padding included in the mean; (N, h, w, d) -> same."""
  pad = patch_size // 2
  total = jax.lax.reduce_window(
      x, 0.0, jax.lax.add, window_dimensions=(1, patch_size, patch_size, 1),
      window_strides=(1, 1, 1, 1),
      padding=((0, 0), (pad, patch_size - 1 - pad), (pad, patch_size - 1 - pad), (0, 0)))
  return total / (patch_size * patch_size)


def patch_embedding(feats: dict[str, jax.Array], layers: tuple[str, ...],
                    patch_size: int) -> jax.Array:
  """Locally aware patch features (PatchCore Section 3.1).

  Args:
    feats: {layer: array of shape (N, h_l, w_l, d_l)}.
    layers: layers to use; the first one sets the grid (h, w).
    patch_size: neighbourhood of the local averaging.

  Returns:
    array of shape (N, h, w, D), D = sum of the layers' d_l.
  """
  h, w = feats[layers[0]].shape[1:3]
  parts = [common.resize_bilinear(local_average(feats[name], patch_size), (h, w))
           for name in layers]
  return jnp.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------
# Coreset
# ---------------------------------------------------------------------------------------------


def random_projection(x: jax.Array, key: jax.Array, dim: int | None) -> jax.Array:
  """Johnson-Lindenstrauss projection x (N, D) -> (N, dim) with N(0, 1/dim) entries.

  Returns x unchanged when dim is None or not smaller than D.
  """
  if dim is None or dim >= x.shape[-1]:
    return x
  mat = jax.random.normal(key, (x.shape[-1], dim), x.dtype) / jnp.sqrt(float(dim))
  return jnp.matmul(x, mat, precision=common.HIGHEST)


@functools.partial(jax.jit, static_argnames=("n_select",))
def greedy_coreset(x: jax.Array, n_select: int, start: jax.Array | int = 0) -> jax.Array:
  """Greedy k-center selection (PatchCore Algorithm 1).

  Starting from `start`, repeatedly adds the point farthest (Euclidean) from the points chosen
  so far. Each step needs the distances of all N points to the newest centre only: one
  matrix-vector product with precomputed norms (||x||^2 - 2 x.c + ||c||^2), so the memory is
  O(N) besides x, and no (N, N) matrix is ever formed.

  Args:
    x: array of shape (N, d) (usually already projected, see `random_projection`).
    n_select: number of points to select, 1 <= n_select <= N (static).
    start: index of the first centre.

  Returns:
    int32 array of shape (n_select,), the selected indices in selection order.
  """
  start = jnp.asarray(start, jnp.int32)
  sq_norms = jnp.sum(jnp.square(x), axis=-1)

  def sq_dist_to(i):
    # Matvec form: ~4x faster on CPU than summing (x - x[i])^2, and memory-bound alike on GPU.
    cross = jnp.matmul(x, x[i], precision=common.HIGHEST)
    return jnp.maximum(sq_norms - 2.0 * cross + sq_norms[i], 0.0)

  def body(t, carry):
    min_d, chosen = carry
    nxt = jnp.argmax(min_d).astype(jnp.int32)
    chosen = chosen.at[t].set(nxt)
    return jnp.minimum(min_d, sq_dist_to(nxt)), chosen

  chosen = jnp.zeros((n_select,), jnp.int32).at[0].set(start)
  carry = (sq_dist_to(start), chosen)
  _, chosen = jax.lax.fori_loop(1, n_select, body, carry)
  return chosen


def coreset_size(n_patches: int, ratio: float) -> int:
  """Number of patches a coreset of `ratio` keeps: int(ratio * N), at least 1."""
  return max(1, min(n_patches, int(n_patches * ratio)))


@functools.partial(jax.jit, static_argnames=("config", "n_select"))
def _fit(feats, key, config: PatchcoreConfig, n_select: int):
  emb = patch_embedding(feats, config.layers, config.patch_size)
  flat = emb.reshape(-1, emb.shape[-1])
  if n_select >= flat.shape[0]:
    return flat
  key_proj, key_start = jax.random.split(key)
  z = random_projection(flat, key_proj, config.projection_dim)
  start = jax.random.randint(key_start, (), 0, flat.shape[0])
  return flat[greedy_coreset(z, n_select, start)]


def fit_patchcore(features: common.Features, config: PatchcoreConfig = PatchcoreConfig(),
                  key: jax.Array | None = None) -> PatchcoreState:
  """Builds the memory bank: patch features of every training image, coreset-subsampled.

  Args:
    features: {layer: array of shape (N, h_l, w_l, d_l)} of normal training images.
    config: hyperparameters.
    key: PRNG key of the projection and of the first coreset centre (None: key(0)).

  Returns:
    the fitted `PatchcoreState` with a bank of `coreset_size(N * h * w, ratio)` patches.
  """
  _check_config(config)
  feats = common.check_features(features, config.layers)
  if key is None:
    key = jax.random.key(0)
  first = feats[config.layers[0]]
  n_patches = first.shape[0] * first.shape[1] * first.shape[2]
  bank = _fit(feats, key, config, coreset_size(n_patches, config.coreset_ratio))
  shapes = tuple(tuple(int(s) for s in feats[name].shape[1:]) for name in config.layers)
  return PatchcoreState(memory_bank=bank, layer_shapes=shapes, config=config)


# ---------------------------------------------------------------------------------------------
# Nearest neighbours
# ---------------------------------------------------------------------------------------------


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  extra = (-x.shape[0]) % multiple
  return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


@functools.partial(jax.jit, static_argnames=("k", "query_chunk", "bank_chunk"))
def nearest_neighbors(queries: jax.Array, bank: jax.Array, k: int = 1, query_chunk: int = 1024,
                      bank_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
  """Exact k nearest neighbours (Euclidean) of every query in the bank, chunked.

  Neighbours are searched with ||q||^2 - 2 q.m + ||m||^2 (one matmul per chunk pair, a running
  top-k across bank chunks); the returned distances are then recomputed as ||q - m|| from the
  differences, which is exact and differentiable with respect to the queries.

  Args:
    queries: array of shape (Q, D).
    bank: array of shape (M, D), k <= M.
    k: neighbours per query (static).
    query_chunk: queries per step (static).
    bank_chunk: bank rows per step (static).

  Returns:
    distances: array of shape (Q, k), ascending.
    indices: int32 array of shape (Q, k) into `bank`.
  """
  n_q, dim = queries.shape
  n_bank = bank.shape[0]
  if not 1 <= k <= n_bank:  # static shapes: raised at trace time, never from XLA
    raise ValueError(f"k should be in [1, {n_bank}] (the bank size), got {k}")
  qc = min(query_chunk, n_q)
  bc = min(bank_chunk, n_bank)
  bank_p = _pad_rows(bank, bc)
  n_chunks = bank_p.shape[0] // bc
  bank_chunks = bank_p.reshape(n_chunks, bc, dim)
  bank_sq = jnp.sum(jnp.square(bank_p), axis=-1).reshape(n_chunks, bc)
  row_ids = jnp.arange(n_chunks * bc, dtype=jnp.int32).reshape(n_chunks, bc)
  q_search = jax.lax.stop_gradient(queries)

  def search(q):  # q (qc, D) -> indices (qc, k)
    q_sq = jnp.sum(jnp.square(q), axis=-1)

    def step(carry, chunk):
      best_d, best_i = carry
      m, m_sq, ids = chunk
      d2 = q_sq[:, None] - 2.0 * jnp.matmul(q, m.T, precision=common.HIGHEST) + m_sq[None]
      d2 = jnp.where(ids[None] < n_bank, d2, jnp.inf)  # padded rows never win
      cand_d = jnp.concatenate([best_d, d2], axis=1)
      cand_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, d2.shape)], axis=1)
      neg, pos = jax.lax.top_k(-cand_d, k)
      return (-neg, jnp.take_along_axis(cand_i, pos, axis=1)), None

    init = (jnp.full((q.shape[0], k), jnp.inf, q.dtype), jnp.zeros((q.shape[0], k), jnp.int32))
    (_, idx), _ = jax.lax.scan(step, init, (bank_chunks, bank_sq, row_ids))
    return idx

  q_p = _pad_rows(q_search, qc)
  idx = jax.lax.map(search, q_p.reshape(-1, qc, dim)).reshape(-1, k)[:n_q]
  dist = common.safe_sqrt(jnp.sum(jnp.square(queries[:, None, :] - bank[idx]), axis=-1))
  # The search's float32 cancellation can swap near ties; re-sort on the exact distances.
  order = jnp.argsort(jax.lax.stop_gradient(dist), axis=1)
  return jnp.take_along_axis(dist, order, axis=1), jnp.take_along_axis(idx, order, axis=1)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def reweighted_image_score(patch_feats: jax.Array, patch_scores: jax.Array,
                           nn_idx: jax.Array, bank: jax.Array, num_neighbors: int,
                           query_chunk: int = 1024, bank_chunk: int = 8192) -> jax.Array:
  """Image score of PatchCore Eq. 7 from the patch scores of a batch.

  Args:
    patch_feats: array of shape (B, P, D), the test patch features.
    patch_scores: array of shape (B, P), s of every patch (distance to its nearest neighbour).
    nn_idx: int array of shape (B, P), index in `bank` of each patch's nearest neighbour.
    bank: array of shape (M, D).
    num_neighbors: b; 1 returns the plain maximum.

  Returns:
    array of shape (B,).
  """
  s_star = jnp.max(patch_scores, axis=1)
  if num_neighbors <= 1:
    return s_star
  b = patch_feats.shape[0]
  worst = jnp.argmax(jax.lax.stop_gradient(patch_scores), axis=1)  # m_test,*
  m_test = patch_feats[jnp.arange(b), worst]  # (B, D)
  m_star = bank[nn_idx[jnp.arange(b), worst]]  # (B, D)
  k = min(num_neighbors, bank.shape[0])
  _, support = nearest_neighbors(jax.lax.stop_gradient(m_star), bank, k, query_chunk,
                                 bank_chunk)  # N_b(m*), (B, k)
  dists = common.safe_sqrt(jnp.sum(jnp.square(m_test[:, None, :] - bank[support]), axis=-1))
  # exp(s*) / sum exp(||m_test - m||), computed in log space against overflow.
  weight = 1.0 - jnp.exp(s_star - jax.nn.logsumexp(dists, axis=1))
  return weight * s_star


@functools.partial(jax.jit, static_argnames=("out_size",))
def _score(state: PatchcoreState, feats, out_size: int):
  config = state.config
  emb = patch_embedding(feats, config.layers, config.patch_size)
  b, h, w, d = emb.shape
  patches = emb.reshape(b * h * w, d)
  dist, idx = nearest_neighbors(patches, state.memory_bank, 1, config.query_chunk,
                                config.bank_chunk)
  patch_scores = dist[:, 0].reshape(b, h * w)
  scores = reweighted_image_score(emb.reshape(b, h * w, d), patch_scores,
                                  idx[:, 0].reshape(b, h * w), state.memory_bank,
                                  config.num_neighbors, config.query_chunk, config.bank_chunk)
  maps = common.finish_maps(patch_scores.reshape(b, h, w), out_size, config.sigma)
  return scores, maps


def score_patchcore(state: PatchcoreState, features: common.Features,
                    out_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Scores images with a fitted PatchCore model; higher = more anomalous.

  Args:
    state: from `fit_patchcore`.
    features: {layer: array of shape (B, h_l, w_l, d_l)}, same layers/shapes as for fitting.
    out_size: side of the returned anomaly maps.

  Returns:
    image_scores: array of shape (B,), the re-weighted maximum patch score (Eq. 7).
    anomaly_maps: array of shape (B, out_size, out_size): nearest-neighbour distances of the
      patches, bilinearly upsampled and blurred (sigma = config.sigma).
  """
  feats = common.check_features(features, state.config.layers)
  common.check_layer_shapes(feats, state.config.layers, state.layer_shapes)
  return _score(state, feats, common.check_out_size(out_size))


def _check_config(config: PatchcoreConfig) -> None:
  if not isinstance(config, PatchcoreConfig):
    raise ValueError(f"config should be a PatchcoreConfig, got {type(config).__name__}")
  if config.patch_size < 1:
    raise ValueError(f"PatchcoreConfig.patch_size should be >= 1, got {config.patch_size}")
  if not 0.0 < config.coreset_ratio <= 1.0:
    raise ValueError(f"PatchcoreConfig.coreset_ratio should be in (0, 1], got "
                     f"{config.coreset_ratio}")
  if config.projection_dim is not None and config.projection_dim < 1:
    raise ValueError(f"PatchcoreConfig.projection_dim should be >= 1 or None, got "
                     f"{config.projection_dim}")
  if config.num_neighbors < 1:
    raise ValueError(f"PatchcoreConfig.num_neighbors should be >= 1, got "
                     f"{config.num_neighbors}")
  if config.sigma < 0:
    raise ValueError(f"PatchcoreConfig.sigma should be >= 0, got {config.sigma}")
  for name in ("query_chunk", "bank_chunk"):
    if getattr(config, name) < 1:
      raise ValueError(f"PatchcoreConfig.{name} should be >= 1, got {getattr(config, name)}")
