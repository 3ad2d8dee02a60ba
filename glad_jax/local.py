"""Local weight maps pi_k(x) of a fixed global mixture (paper Section 3.2, Eq. 10-12).

The means and covariances of the global mixture stay fixed; at every position x of a layer's
(h, w) feature grid, K-MLE re-estimates only the mixing weights from the samples u_m(y) of all
M training images at the positions y of the disk |y - x| <= r (clipped at the grid borders).
Each position is an independent K-MLE problem, so the fit works on chunks of grid rows: the
component log-densities of a chunk's samples (plus a halo of r rows) are computed once, and
only the cheap weight updates are iterated.

The fitted map is mostly sparse (a position uses few components), and is stored as
`SparseLocalWeights`, a tiled layout prepared for `glad_jax.scoring.sparse_log_likelihood`:
the (component, position) non-zero pairs are sorted by component and each component's
position list is cut into tiles of T positions, padded with a dummy position (index h * w)
of log-weight -inf. Scoring then costs one (B * T, d) x (d, d) product per tile, i.e. it
follows the number of non-zeros, not K * h * w.

Pure math: no I/O, no prints; progress through an optional callback.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax.mixture.gaussian import (
    GaussianMixture,
    cholesky_log_det,
    component_log_prob,
    precision_cholesky,
)

DEFAULT_TILE_SIZE = 32
# Element budgets (float32 words) that bound the device memory of one fit chunk.
_DEFAULT_CHUNK_ELEMENTS = 2**26  # (M, rows + 2R, w + 2R, K) log-densities of a chunk: 256 MB
_DEFAULT_LOGPROB_ELEMENTS = 2**24  # (n, K, d) intermediate of `component_log_prob`: 64 MB


@struct.dataclass
class SparseLocalWeights:
  """Sparse local weight map of one layer, tiled by component for scoring.

  The non-zero pairs (k, x) are sorted by component k, then by flat position
  x = i * w + j; each component's list is cut into tiles of `tile_size` positions,
  the last tile padded with the dummy position h * w and log-weight -inf.

  Attributes:
    tile_component: int32 array of shape (n_tiles,), the component k of each tile.
    tile_position: int32 array of shape (n_tiles, T), flat positions i * w + j, or
      h * w on padding.
    tile_log_weight: float32 array of shape (n_tiles, T), log pi_k(x) of each entry, -inf
      on padding.
    grid_shape: (h, w) of the layer's feature grid (static).
    n_components: K of the global mixture (static).
  """

  tile_component: jax.Array
  tile_position: jax.Array
  tile_log_weight: jax.Array
  grid_shape: tuple[int, int] = struct.field(pytree_node=False)
  n_components: int = struct.field(pytree_node=False)

  @property
  def n_tiles(self) -> int:
    return self.tile_position.shape[0]

  @property
  def tile_size(self) -> int:
    return self.tile_position.shape[1]

  @property
  def n_positions(self) -> int:
    return self.grid_shape[0] * self.grid_shape[1]


class SparsityStats(NamedTuple):
  """Summary of a sparse weight map (for reports; see `nnz_map` for the per-position map).

  Attributes:
    mean_nnz: mean number of non-zero weights per position.
    min_nnz: smallest number of non-zero weights at a position.
    max_nnz: largest number of non-zero weights at a position.
    density: total non-zeros / (h * w * K).
    n_tiles: number of tiles the scoring processes.
    padding_fraction: fraction of tile entries that are padding.
  """

  mean_nnz: float
  min_nnz: int
  max_nnz: int
  density: float
  n_tiles: int
  padding_fraction: float


class LocalFitProgress(NamedTuple):
  """What `fit_local_weights` reports to its callback after each chunk of rows.

  Attributes:
    chunk: index of the chunk just fitted (0-based).
    n_chunks: number of chunks.
    rows: (first, last + 1) grid rows of the chunk.
    iterations: K-MLE iterations run on the chunk (the most any of its positions took).
    converged_fraction: fraction of the chunk's positions that met the tolerance.
    mean_log_likelihood: mean over the chunk's positions of the final mean classification
      log-likelihood of their disk samples.
  """

  chunk: int
  n_chunks: int
  rows: tuple[int, int]
  iterations: int
  converged_fraction: float
  mean_log_likelihood: float


def disk_offsets(radius: float) -> tuple[tuple[int, int], ...]:
  """Integer offsets (dy, dx) with dy^2 + dx^2 <= radius^2, the disk of Section 3.2.

  Args:
    radius: r >= 0 in feature-grid units (r = 1: the centre and its 4 neighbours).

  Returns:
    tuple of (dy, dx) pairs, row-major order, centre included.
  """
  reach = int(math.floor(radius))
  return tuple((dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
               if dy * dy + dx * dx <= radius * radius)


def _halo(offsets: tuple[tuple[int, int], ...]) -> int:
  return max(max(abs(dy), abs(dx)) for dy, dx in offsets)


def local_kmle_step(log_dens: jax.Array, valid: jax.Array, log_weights: jax.Array,
                    offsets: tuple[tuple[int, int], ...]) -> tuple[jax.Array, jax.Array]:
  """One K-MLE update of the local weights of a block of positions (Eq. 10-12).

  With R the halo (largest |dy|, |dx| of the offsets), position (i, j) of the block sees the
  samples at (i + R + dy, j + R + dx) of the padded sample grid. Every such valid sample
  u is assigned to

    z = argmin_k (u - mu_k)^T Sigma_k^{-1} (u - mu_k) + log|Sigma_k| - 2 log pi_k(x)    (10)
      = argmax_k log N(u; mu_k, Sigma_k) + log pi_k(x),

  and pi_k(x) = |C_k(x)| / n(x) (Eq. 11-12), with n(x) the number of valid samples in
  the disk of x. The paper prints "+ 2 log pi_k" in Eq. 10 (as in Eq. 1); that would
  penalise frequent components. K-MLE maximises the classification likelihood, and
  -2 log(pi_k N(u; mu_k, Sigma_k)) = maha_k(u) + log|Sigma_k| - 2 log pi_k + d log(2 pi),
  so the sign here is minus.

  Args:
    log_dens: array of shape (M, h + 2R, w + 2R, K), log N(u_m(y); mu_k, Sigma_k) of the
      samples of the padded block (any finite value where `valid` is False).
    valid: bool array of shape (h + 2R, w + 2R), False on padding outside the layer grid.
    log_weights: array of shape (h, w, K), the current log pi_k(x) (-inf for zero weights).
    offsets: static disk offsets (see `disk_offsets`).

  Returns:
    new_log_weights: array of shape (h, w, K), log pi_k(x) after the update (-inf where
      no sample was assigned).
    mean_log_likelihood: array of shape (h, w), mean over the disk samples of
      max_k [log N_k(u) + log pi_k(x)] under the *input* weights (the classification
      log-likelihood that K-MLE increases monotonically).
  """
  m, hp, wp, k = log_dens.shape
  reach = _halo(offsets)
  h, w = hp - 2 * reach, wp - 2 * reach
  flat_pos = jnp.arange(h * w, dtype=jnp.int32).reshape(1, h, w)
  counts = jnp.zeros((h * w * k,), log_dens.dtype)
  ll_sum = jnp.zeros((h, w), log_dens.dtype)
  n_samples = jnp.zeros((h, w), log_dens.dtype)
  for dy, dx in offsets:  # static and short (5 offsets for r = 1)
    y0, x0 = reach + dy, reach + dx
    shifted = jax.lax.slice(log_dens, (0, y0, x0, 0), (m, y0 + h, x0 + w, k))
    ok = jax.lax.slice(valid, (y0, x0), (y0 + h, x0 + w)).astype(log_dens.dtype)
    scores = shifted + log_weights[None]  # (M, h, w, K)
    z = jnp.argmax(scores, axis=-1)  # (M, h, w)
    best = jnp.max(scores, axis=-1)
    # Padding samples add 0 to the counts; where(...) keeps their -inf/garbage out of the sum.
    counts = counts.at[(flat_pos * k + z).reshape(-1)].add(
        jnp.broadcast_to(ok, (m, h, w)).reshape(-1))
    ll_sum = ll_sum + jnp.sum(jnp.where(ok[None] > 0, best, 0.0), axis=0)
    n_samples = n_samples + m * ok
  counts = counts.reshape(h, w, k)
  new_log_weights = jnp.log(counts) - jnp.log(n_samples)[..., None]  # log 0 = -inf: pi_k(x) = 0
  return new_log_weights, ll_sum / n_samples


def _relative_change(new: jax.Array, old: jax.Array) -> jax.Array:
  tiny = jnp.finfo(new.dtype).tiny
  return jnp.abs(new - old) / jnp.maximum(jnp.abs(old), tiny)


def _log_densities(x: jax.Array, means: jax.Array, prec_chol: jax.Array, log_det: jax.Array,
                   rows_per_batch: int) -> jax.Array:
  """component_log_prob over (N, d) in batches of rows; returns (N, K)."""
  n, d = x.shape
  n_batches = -(-n // rows_per_batch)
  padded = jnp.pad(x, ((0, n_batches * rows_per_batch - n), (0, 0)))
  out = jax.lax.map(lambda xb: component_log_prob(xb, means, prec_chol, log_det),
                    padded.reshape(n_batches, rows_per_batch, d))
  return out.reshape(n_batches * rows_per_batch, -1)[:n]


@functools.partial(jax.jit, static_argnames=("offsets", "rows", "max_iter", "rows_per_batch"))
def _fit_chunk(padded_feats: jax.Array, padded_valid: jax.Array, start: jax.Array,
               init_log_weights: jax.Array, means: jax.Array, prec_chol: jax.Array,
               log_det: jax.Array, tol: float, *, offsets: tuple[tuple[int, int], ...],
               rows: int, max_iter: int, rows_per_batch: int):
  """K-MLE of the local weights of `rows` grid rows starting at row `start`.

  Args:
    padded_feats: array of shape (M, H_pad + 2R, w + 2R, d), features padded by the halo R
      (and at the bottom up to a whole number of chunks).
    padded_valid: bool array of shape (H_pad + 2R, w + 2R).
    start: int32 scalar, first grid row of the chunk.
    init_log_weights: array of shape (K,), log of the global weights.
    means, prec_chol, log_det: the fixed global components, shapes (K, d), (K, d, d), (K,).
    tol: relative change of each position's mean log-likelihood that stops its iterations.

  Returns:
    log_weights (rows, w, K), n_iter (rows, w) int32, converged (rows, w) bool,
    mean_log_likelihood (rows, w), and the number of loop iterations run (int32 scalar).
  """
  m, _, wp, d = padded_feats.shape
  reach = _halo(offsets)
  w = wp - 2 * reach
  k = means.shape[0]
  window = jax.lax.dynamic_slice(padded_feats, (0, start, 0, 0), (m, rows + 2 * reach, wp, d))
  valid = jax.lax.dynamic_slice(padded_valid, (start, 0), (rows + 2 * reach, wp))
  # The log-densities do not depend on the weights: computed once, reused every iteration.
  log_dens = _log_densities(window.reshape(-1, d), means, prec_chol, log_det, rows_per_batch)
  log_dens = log_dens.reshape(m, rows + 2 * reach, wp, k)

  def cond(carry):
    it, _, _, _, done = carry
    return jnp.logical_and(it < max_iter, jnp.logical_not(jnp.all(done)))

  def body(carry):
    it, log_w, prev_ll, n_iter, done = carry
    new_log_w, ll = local_kmle_step(log_dens, valid, log_w, offsets)
    # Each position is its own K-MLE problem and stops on its own criterion, so the result
    # does not depend on how the grid is cut into chunks. Stopped positions stay frozen.
    log_w = jnp.where(done[..., None], log_w, new_log_w)
    # The first iteration has no previous log-likelihood to compare with.
    converged = jnp.logical_and(it > 0, _relative_change(ll, prev_ll) < tol)
    n_iter = jnp.where(done, n_iter, n_iter + 1)
    prev_ll = jnp.where(done, prev_ll, ll)
    return it + 1, log_w, prev_ll, n_iter, jnp.logical_or(done, converged)

  log_w0 = jnp.broadcast_to(init_log_weights, (rows, w, k))
  ll0 = jnp.full((rows, w), -jnp.inf, log_dens.dtype)
  # Rows below the grid (padding of the last chunk) have no samples (0 / 0 = NaN would never
  # converge): they start done and are dropped by the caller.
  outside = jnp.logical_not(valid[reach:reach + rows, reach:reach + w])
  carry = (jnp.int32(0), log_w0, ll0, jnp.zeros((rows, w), jnp.int32), outside)
  n_loops, log_w, ll, n_iter, done = jax.lax.while_loop(cond, body, carry)
  return log_w, n_iter, jnp.logical_and(done, jnp.logical_not(outside)), ll, n_loops


def fit_local_log_weights(features: jax.Array, mixture: GaussianMixture, radius: float = 1.0,
                          max_iter: int = 100, tol: float = 1e-6,
                          callback: Callable[[LocalFitProgress], None] | None = None,
                          max_chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
                          ) -> tuple[jax.Array, jax.Array]:
  """Dense local log-weights log pi_k(x) by K-MLE with fixed components (Eq. 10-12).

  The weights start from the global pi_k at every position. A position stops when the
  relative change of the mean (classification) log-likelihood of its disk samples between two
  iterations is below `tol`, or after `max_iter` iterations (the paper: <= ~10 in practice).
  Assumes valid input (see `fit_local_weights`).

  Args:
    features: array of shape (M, h, w, d), one layer's features of the M training images.
    mixture: the fixed global mixture (K components of dimension d).
    radius: radius r of the disk of samples around each position (grid units, >= 0).
    max_iter: iteration cap per position.
    tol: relative tolerance on the mean log-likelihood.
    callback: optional, called with a `LocalFitProgress` after each chunk of rows.
    max_chunk_elements: bound on M * (rows + 2R) * (w + 2R) * K, the log-densities held at
      once; sets how many grid rows a chunk has.

  Returns:
    log_weights: array of shape (h, w, K), log pi_k(x), -inf where pi_k(x) = 0.
    n_iter: int32 array of shape (h, w), the iterations each position took.
  """
  features = jnp.asarray(features)
  m, h, w, d = features.shape
  k = mixture.n_components
  offsets = disk_offsets(radius)
  reach = _halo(offsets)
  per_row = m * (w + 2 * reach) * k
  rows = int(max(1, min(h, max_chunk_elements // per_row - 2 * reach)))
  n_chunks = -(-h // rows)
  bottom = n_chunks * rows - h
  padded = jnp.pad(features, ((0, 0), (reach, reach + bottom), (reach, reach), (0, 0)))
  valid = np.zeros((h + 2 * reach + bottom, w + 2 * reach), bool)
  valid[reach:reach + h, reach:reach + w] = True
  rows_per_batch = int(max(1, _DEFAULT_LOGPROB_ELEMENTS // (k * d)))
  rows_per_batch = min(rows_per_batch, m * (rows + 2 * reach) * (w + 2 * reach))

  dtype = features.dtype
  prec_chol = precision_cholesky(mixture.cov_chol.astype(dtype))
  log_det = cholesky_log_det(mixture.cov_chol.astype(dtype))
  init = jnp.log(mixture.weights.astype(dtype))
  log_w_chunks, n_iter_chunks = [], []
  for c in range(n_chunks):
    log_w, n_iter, done, ll, n_loops = _fit_chunk(
        padded, jnp.asarray(valid), jnp.int32(c * rows), init, mixture.means.astype(dtype),
        prec_chol, log_det, tol, offsets=offsets, rows=rows, max_iter=max_iter,
        rows_per_batch=rows_per_batch)
    last = min(rows, h - c * rows)  # the bottom chunk may hold padding rows
    log_w_chunks.append(log_w[:last])
    n_iter_chunks.append(n_iter[:last])
    if callback is not None:
      callback(LocalFitProgress(
          chunk=c, n_chunks=n_chunks, rows=(c * rows, c * rows + last),
          iterations=int(n_loops),
          converged_fraction=float(jnp.mean(done[:last])),
          mean_log_likelihood=float(jnp.mean(ll[:last]))))
  return jnp.concatenate(log_w_chunks, axis=0), jnp.concatenate(n_iter_chunks, axis=0)


def sparsify(log_weights: jax.Array | np.ndarray,
             tile_size: int = DEFAULT_TILE_SIZE) -> SparseLocalWeights:
  """Tiled sparse form of a dense local log-weight map (host-side, once per fit).

  Args:
    log_weights: array of shape (h, w, K), log pi_k(x); -inf marks a zero weight.
    tile_size: T, positions per tile. Small T wastes less padding, large T makes
      bigger matrix products.

  Returns:
    SparseLocalWeights with n_tiles = sum_k ceil(nnz_k / T) (at least one tile).
  """
  lw = np.asarray(log_weights, dtype=np.float32)
  h, w, k = lw.shape
  n_pos = h * w
  flat = lw.reshape(n_pos, k)
  pos, comp = np.nonzero(np.isfinite(flat))
  order = np.lexsort((pos, comp))  # by component, then by position
  pos, comp = pos[order], comp[order]
  values = flat[pos, comp]
  nnz_k = np.bincount(comp, minlength=k)
  tiles_k = -(-nnz_k // tile_size)
  n_tiles = max(1, int(tiles_k.sum()))
  tile_component = np.zeros((n_tiles,), np.int32)
  tile_position = np.full((n_tiles, tile_size), n_pos, np.int32)
  tile_log_weight = np.full((n_tiles, tile_size), -np.inf, np.float32)
  # Entry e of component k goes to tile first_tile[k] + rank // T, slot rank % T.
  first_tile = np.concatenate([[0], np.cumsum(tiles_k)[:-1]])
  first_entry = np.concatenate([[0], np.cumsum(nnz_k)[:-1]])
  rank = np.arange(pos.size) - first_entry[comp]
  tile = first_tile[comp] + rank // tile_size
  slot = rank % tile_size
  tile_position[tile, slot] = pos
  tile_log_weight[tile, slot] = values
  tile_component[:int(tiles_k.sum())] = np.repeat(np.arange(k), tiles_k)
  return SparseLocalWeights(
      tile_component=jnp.asarray(tile_component), tile_position=jnp.asarray(tile_position),
      tile_log_weight=jnp.asarray(tile_log_weight), grid_shape=(h, w), n_components=k)


def to_dense(sparse: SparseLocalWeights) -> jax.Array:
  """Dense log-weight map of shape (h, w, K), -inf where pi_k(x) = 0."""
  h, w = sparse.grid_shape
  k = sparse.n_components
  comp = jnp.broadcast_to(sparse.tile_component[:, None], sparse.tile_position.shape)
  dense = jnp.full((h * w + 1, k), -jnp.inf, sparse.tile_log_weight.dtype)
  # Padding entries land in the dummy row h * w, dropped below.
  dense = dense.at[sparse.tile_position.reshape(-1), comp.reshape(-1)].set(
      sparse.tile_log_weight.reshape(-1))
  return dense[:h * w].reshape(h, w, k)


def nnz_map(sparse: SparseLocalWeights) -> np.ndarray:
  """Number of non-zero weights per position, int array of shape (h, w) (sparsity map)."""
  pos = np.asarray(sparse.tile_position).reshape(-1)
  real = np.isfinite(np.asarray(sparse.tile_log_weight).reshape(-1))
  counts = np.bincount(pos[real], minlength=sparse.n_positions)
  return counts.reshape(sparse.grid_shape)


def sparsity_stats(sparse: SparseLocalWeights) -> SparsityStats:
  """Summary numbers of a sparse weight map (see `SparsityStats`)."""
  nnz = nnz_map(sparse)
  total = int(nnz.sum())
  slots = sparse.n_tiles * sparse.tile_size
  return SparsityStats(
      mean_nnz=float(nnz.mean()), min_nnz=int(nnz.min()), max_nnz=int(nnz.max()),
      density=total / (sparse.n_positions * sparse.n_components), n_tiles=sparse.n_tiles,
      padding_fraction=1.0 - total / slots)


def fit_local_weights(features: jax.Array | np.ndarray, mixture: GaussianMixture,
                      radius: float = 1.0, max_iter: int = 100, tol: float = 1e-6,
                      callback: Callable[[LocalFitProgress], None] | None = None,
                      tile_size: int = DEFAULT_TILE_SIZE) -> SparseLocalWeights:
  """Fits the local weight map of one layer and returns its sparse form (Section 3.2).

  Public entry point: validates its input, then runs `fit_local_log_weights` and `sparsify`.

  Args:
    features: array of shape (M, h, w, d), one layer's training features.
    mixture: the fixed global mixture of that layer (dimension d).
    radius: disk radius r in feature-grid units (paper: 1).
    max_iter: iteration cap per position (paper: 100).
    tol: relative change of the mean log-likelihood that stops a position (paper: 1e-6).
    callback: optional progress callback, called with a `LocalFitProgress` per chunk.
    tile_size: positions per tile of the sparse layout.

  Returns:
    SparseLocalWeights of grid (h, w) and K = mixture.n_components.

  Raises:
    ValueError: on a features array that is not 4-D, a dimension d that differs from the
      mixture's, NaN or infinite features, or a bad radius / max_iter / tol / tile_size.
  """
  feats = np.asarray(features) if not isinstance(features, jax.Array) else features
  if feats.ndim != 4:
    raise ValueError(f"features should have shape (M, h, w, d), got shape {tuple(feats.shape)}")
  if feats.shape[-1] != mixture.dim:
    raise ValueError(f"features have dimension d={feats.shape[-1]} (shape "
                     f"{tuple(feats.shape)}) but the mixture has dimension {mixture.dim}")
  if min(feats.shape) == 0:
    raise ValueError(f"features are empty: shape {tuple(feats.shape)}")
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(feats)))):
    raise ValueError("features contain NaN or infinite values")
  if not (radius >= 0 and math.isfinite(radius)):
    raise ValueError(f"radius should be a finite number >= 0, got {radius}")
  if int(max_iter) != max_iter or max_iter < 1:
    raise ValueError(f"max_iter should be an integer >= 1, got {max_iter}")
  if not tol >= 0:
    raise ValueError(f"tol should be >= 0, got {tol}")
  if int(tile_size) != tile_size or tile_size < 1:
    raise ValueError(f"tile_size should be an integer >= 1, got {tile_size}")
  dtype = jnp.asarray(feats).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    feats = jnp.asarray(feats, jnp.float32)
  log_weights, _ = fit_local_log_weights(feats, mixture, radius=radius, max_iter=int(max_iter),
                                         tol=float(tol), callback=callback)
  return sparsify(log_weights, tile_size=int(tile_size))
