"""Local weight maps pi_k(x) of a fixed global mixture (paper Section 3.2, Eq. 10-12).

The means and covariances of the global mixture stay fixed; at every position x of a layer's
(h, w) feature grid, K-MLE re-estimates only the mixing weights from the samples u_m(y) of all
M training images at the positions y of the disk |y - x| <= r (clipped at the grid borders).
Each position is an independent K-MLE problem, so the fit works on chunks of grid rows: the
component log-densities of a chunk's samples (plus a halo of r rows) are computed once (the
centred expanded quadratic form of `glad_jax.mixture.gaussian`: a few matmuls), and only the
cheap weight updates are iterated. The first update is the same at every position (all start
from the global pi_k), so it assigns each sample once over all K components; after it, most
pi_k(x) are exactly 0 and stay 0, and the later updates of x run on its few non-zero
candidates only (exact, see `_fit_tile`).

The fitted map is mostly sparse (a position uses few components), and is stored as
`SparseLocalWeights`, a tiled layout prepared for `glad_jax.scoring.sparse_log_likelihood`:
the (component, position) non-zero pairs are sorted by component and each component's
position list is cut into tiles of T positions, padded with a dummy position (index h * w)
of log-weight -inf. Scoring then costs one (B * T, d) x (d, d) product per tile, i.e. it
follows the number of non-zeros, not K * h * w.

`held_out_log_likelihood` scores held-out images under weights fitted at several radii on a few bands of
grid rows (the log-densities of a band computed once for all of them): what `radius="auto"` chooses by
(`glad_jax.methods.glad.choose_radius`).

Pure math: no I/O, no prints; progress through an optional callback.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from glad_jax import sharding

from glad_jax.mixture.gaussian import (
    PACKED_MAX_DIM,
    GaussianMixture,
    log_joint_params,
    packed_features,
    quadratic_blocks,
    split_rows,
)
from glad_jax.mixture.kmle import default_chunk_size

DEFAULT_TILE_SIZE = 32
# Element budget (float32 words) that bounds the memory of one fit chunk.
# 2 GiB: at K ~ 1000 a chunk then holds ~10-40 grid rows of 64 (tire layer1, 210 images: 2 chunks;
# magnetic_tile layer1, 685 images, K = 988: 7 chunks of 10 rows, whose r-row halos cost 20% more
# log-densities, against 16 chunks of 4 rows and 50% at 2**28: 43 s instead of 50 s for the layer).
_DEFAULT_CHUNK_ELEMENTS = 2**29  # (M, rows + 2R, w + 2R, K) log-densities of a chunk
# Positions fitted together after the first update (see `_fit_tile`).
_TILE_POSITIONS = 32
# Slots per block of `_running_argmax`; K is padded to a multiple of it.
_ARGMAX_BLOCK = 8
# Full float32 in the log-density products (no TF32 on GPUs), as in gaussian.py.
_HIGHEST = jax.lax.Precision.HIGHEST


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
  """One K-MLE update of the local weights of a block of positions (Eq. 10-12), dense form.

  The reference form of the update over all K components; the fit runs the same arithmetic
  once per sample for the first update and on compact candidate sets after it (`_fit_chunk`).
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


def log_density_params(mixture: GaussianMixture
                       ) -> tuple[jax.Array, list[jax.Array], jax.Array]:
  """Centre and expanded-form weights of the K component log-densities (no mixing weights).

  log N(u; mu_k, Sigma_k) = log N(u - c; mu_k - c, Sigma_k) for any c. The expanded quadratic
  form (`gaussian.log_joint_params`) loses about eps * (u - c)^T Sigma_k^{-1} (u - c) to
  float32 cancellation, so c is the mixture's mean sum_k pi_k mu_k (the data mean of a fitted
  mixture): features far from the origin (e.g. all around 100) then cost no accuracy.

  Args:
    mixture: the fixed global mixture, K components of dimension d.

  Returns:
    centre: array of shape (d,), c = sum_k pi_k mu_k.
    w_pieces: the weights of `gaussian.log_joint_params` for the centred means: for
      d <= `gaussian.PACKED_MAX_DIM` one piece, the (`packed_size(d)`, K) weights of
      `gaussian.packed_features` (one matmul, each pair once: the bands repeat 16-26 % of the
      products at d = 40-24), above it the `gaussian.split_rows` pieces of the banded
      (F + d + 1, K) weights.
    bias: array of shape (K,), -(d log 2 pi + log|Sigma_k| + (mu_k - c)^T Sigma_k^{-1}
      (mu_k - c)) / 2, finite also for masked components (the caller applies the weights).
  """
  weights = mixture.weights
  centre = jnp.einsum("k,kd->d", weights / jnp.sum(weights), mixture.means, precision=_HIGHEST)
  # Unit weights: log_joint_params adds log pi_k = 0, leaving log N alone.
  unit = mixture.replace(weights=jnp.ones_like(weights), means=mixture.means - centre)
  if mixture.dim <= PACKED_MAX_DIM:
    w, bias = log_joint_params(unit, packed=True)
    return centre, [w], bias
  w, bias = log_joint_params(unit)
  return centre, split_rows(w, mixture.dim), bias


def log_densities(x: jax.Array, params: tuple[jax.Array, list[jax.Array], jax.Array]
                  ) -> jax.Array:
  """log N(x_n; mu_k, Sigma_k) of all samples and components, component-major.

  The band-by-band products of `gaussian.log_joint` on centred samples, with the output
  transposed inside the matmuls (free there; transposing log_joint's (N, K) result cost 2-4x
  on CPU). Component-major log-densities make the fit's per-candidate gathers contiguous.

  Args:
    x: array of shape (N, d).
    params: `log_density_params` (K may be padded with zero columns and bias entries); one
      weight piece is the packed layout, several the banded one.

  Returns:
    array of shape (K, N). Memory (N, F) with F ~ d (d + 1) / 2: callers chunk N.
  """
  centre, w_pieces, bias = params
  xc = x - centre
  if len(w_pieces) == 1:          # packed (`log_density_params`)
    return (jnp.einsum("nf,fk->kn", packed_features(xc), w_pieces[0], precision=_HIGHEST)
            + bias[:, None])
  out = jnp.einsum("nd,dk->kn", xc, w_pieces[-2], precision=_HIGHEST) + bias[:, None]
  for block, wb in zip(quadratic_blocks(xc), w_pieces[:-2]):
    out = out + jnp.einsum("nf,fk->kn", block, wb, precision=_HIGHEST)
  return out


def _running_argmax(block: Callable[[jax.Array], jax.Array], n_blocks: jax.Array,
                    shape: tuple[int, ...], dtype) -> tuple[jax.Array, jax.Array]:
  """max and first argmax over a leading axis read in blocks of `_ARGMAX_BLOCK` slots.

  jnp.argmax over a (short or long) axis is a slow variadic reduction on XLA:CPU (~0.1-0.3 G
  elements/s); a running (max, argmax) over blocks, each reduced along its major axis, is
  elementwise over the other axes and ~10x faster. Ties keep the first (smallest) slot, as
  jnp.argmax: within a block by jnp.argmax, across blocks by the strict '>'.

  Args:
    block: i -> array of shape (`_ARGMAX_BLOCK`,) + shape, the scores of slots
      [i * B, (i + 1) * B).
    n_blocks: int32 scalar (may be traced), the number of blocks to read.
    shape: shape of the reduced result.
    dtype: dtype of the scores.

  Returns:
    best: array of `shape`, the max (-inf if every score is -inf).
    z: int32 array of `shape`, the slot of the first max (0 if every score is -inf).
  """
  def body(i, carry):
    best, z = carry
    scores = block(i)
    block_best = jnp.max(scores, axis=0)
    block_z = jnp.argmax(scores, axis=0).astype(jnp.int32) + i * _ARGMAX_BLOCK
    better = block_best > best
    return jnp.where(better, block_best, best), jnp.where(better, block_z, z)

  init = (jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, jnp.int32))
  return jax.lax.fori_loop(0, n_blocks, body, init)


def _sample_positions(start: jax.Array, window_start: jax.Array, rows: int,
                      grid: tuple[int, int], window: int, offsets: tuple[tuple[int, int], ...]
                      ) -> tuple[jax.Array, jax.Array]:
  """Where the disk samples of a chunk's positions lie in its window of computed samples.

  Args:
    start: int32 scalar, first grid row of the chunk.
    window_start: int32 scalar, first grid row of the window (rows whose log-densities exist).
    rows: rows of the chunk (static).
    grid: (h, w) of the whole layer (static).
    window: rows of the window (static).
    offsets: static disk offsets.

  Returns:
    index: int32 array of shape (n_offsets, rows * w), window position r * w + c of the
      samples at offset o of position p = i * w + j (clipped into the window where the
      sample falls outside the grid).
    ok: bool array of shape (n_offsets, rows * w), False where the sample falls outside the grid.
  """
  h, w = grid
  i = start + jnp.arange(rows, dtype=jnp.int32)[:, None]
  j = jnp.arange(w, dtype=jnp.int32)[None, :]
  index, ok = [], []
  for dy, dx in offsets:
    y, x = i + dy, j + dx
    ok.append(((y >= 0) & (y < h) & (x >= 0) & (x < w)).reshape(-1))
    r = jnp.clip(y - window_start, 0, window - 1)
    index.append((r * w + jnp.clip(x, 0, w - 1)).reshape(-1))
  return jnp.stack(index), jnp.stack(ok)


def _count_update(z: jax.Array, best: jax.Array, ok: jax.Array, n_slots: int,
                  image_mask: jax.Array | None = None, axis_name: str | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Eq. 11-12 from the assignments of the disk samples of P positions.

  Args:
    z: int32 array of shape (n_offsets, P, M), the slot (component or candidate) each sample
      is assigned to.
    best: array of shape (n_offsets, P, M), the maximised score of each sample.
    ok: bool array of shape (n_offsets, P), False for samples outside the grid.
    n_slots: number of slots per position.
    image_mask: optional bool array of shape (M,), False on padding images (they count for
      nothing).
    axis_name: inside `shard_map` over images: the mesh axis whose devices hold the other
      images; the counts, log-likelihood sums and sample counts are added over it (one
      ``psum``), so every device gets the weights of all images.

  Returns:
    log_weights: array of shape (P, n_slots), log |C_k(x)| / n(x) (-inf for empty slots).
    mean_log_likelihood: array of shape (P,), mean of `best` over the valid samples.
  """
  n_off, p, m = z.shape
  okf = ok.astype(best.dtype)
  slot = jnp.arange(p, dtype=jnp.int32)[None, :, None] * n_slots + z
  if image_mask is None:
    sample_ok, valid, n_images = okf[..., None], ok[..., None], m
  else:
    imf = image_mask.astype(best.dtype)
    sample_ok = okf[..., None] * imf
    valid = ok[..., None] & image_mask
    n_images = jnp.sum(imf)
  # Padding samples add 0 to the counts; where(...) keeps them out of the sum.
  counts = jnp.zeros((p * n_slots,), best.dtype).at[slot.reshape(-1)].add(
      jnp.broadcast_to(sample_ok, z.shape).reshape(-1))
  ll_sum = jnp.zeros((p,), best.dtype)
  n_samples = jnp.zeros((p,), best.dtype)
  for o in range(n_off):  # offset by offset, like `local_kmle_step`
    ll_sum = ll_sum + jnp.sum(jnp.where(valid[o], best[o], 0.0), axis=-1)
    n_samples = n_samples + n_images * okf[o]
  if axis_name is not None:
    counts, ll_sum, n_samples = jax.lax.psum((counts, ll_sum, n_samples), axis_name)
  log_weights = jnp.log(counts.reshape(p, n_slots)) - jnp.log(n_samples)[:, None]
  return log_weights, ll_sum / n_samples


def _fit_tile(buffer: jax.Array, log_dens: jax.Array, samples: tuple[jax.Array, jax.Array],
              ok: jax.Array, active: jax.Array, log_w1: jax.Array, ll1: jax.Array,
              tol: jax.Array, max_iter: int, image_mask: jax.Array | None = None,
              axis_name: str | None = None):
  """Iterations 2.. of the local K-MLE of a tile of T positions, on their candidates only.

  Exactness: a component with pi_k(x) = 0 (log-weight -inf) never wins the argmax of Eq. 10
  at x, so its count stays 0 and its weight 0 for good. After the first update the iterations
  at x therefore only need the candidates k with pi_k(x) > 0 (J(x) of them, ~50-75 of K ~ 1000
  on real features), kept in increasing k so that ties go to the smallest k as with the full
  argmax: the result is the full-K iteration's, not an approximation. The tile's samples'
  log-densities at the candidates are gathered once (slot j of position t holds its j-th
  candidate, slots past J(t) sit at log-weight -inf), and each update reads the slots
  j < max_t J(t) only: a traced trip count, so tiles of positions with few candidates cost
  little and no shape (no compilation) depends on the data.

  Args:
    buffer: array of shape (K', n_offsets, T, M), scratch for the gathered log-densities (its
      content on entry is ignored; returned for reuse by the next tile).
    log_dens: array of shape (n_batches, K', q, M), log N(u; k) of the window samples (window
      position s at [s // q, :, s % q]), K' = K padded to a multiple of `_ARGMAX_BLOCK`.
    samples: (batch, within) int32 arrays of shape (n_offsets, T), where the disk samples of
      the tile's positions are in `log_dens`.
    ok: bool array of shape (n_offsets, T), False for samples outside the grid.
    active: bool array of shape (T,), False on padding entries of the tile.
    log_w1: array of shape (T, K'), log-weights after the first update.
    ll1: array of shape (T,), mean log-likelihood of the first update.
    tol: relative tolerance on the mean log-likelihood.
    max_iter: iteration cap (static, >= 2).
    image_mask, axis_name: as in `_count_update` (images split over devices).

  Returns:
    buffer, log_weights (T, K'), n_iter (T,) int32, converged (T,) bool,
    mean_log_likelihood (T,).
  """
  t, k = log_w1.shape
  n_off = ok.shape[0]
  m = log_dens.shape[-1]
  batch, within = samples
  finite = jnp.isfinite(log_w1)
  n_cand = jnp.max(jnp.where(active, jnp.sum(finite, axis=-1), 0))
  # Candidates first, in increasing k (stable sort); zero-weight components follow at -inf.
  cand = jnp.argsort(jnp.logical_not(finite), axis=-1, stable=True).astype(jnp.int32)
  log_w = jnp.take_along_axis(log_w1, cand, axis=-1)

  def gather(j, buf):
    vals = log_dens[batch, cand[:, j][None, :], within]  # (n_offsets, T, M): contiguous M
    return jax.lax.dynamic_update_slice(buf, vals[None], (j, 0, 0, 0))

  buffer = jax.lax.fori_loop(0, n_cand, gather, buffer)
  n_blocks = (n_cand + _ARGMAX_BLOCK - 1) // _ARGMAX_BLOCK

  def update(log_w):
    log_w_t = log_w.T  # (K', T)

    def block(i):
      j = i * _ARGMAX_BLOCK
      g = jax.lax.dynamic_slice_in_dim(buffer, j, _ARGMAX_BLOCK, axis=0)
      lw = jax.lax.dynamic_slice_in_dim(log_w_t, j, _ARGMAX_BLOCK, axis=0)
      return g + lw[:, None, :, None]  # Eq. 10: log N(u; k) + log pi_k(x)

    best, z = _running_argmax(block, n_blocks, (n_off, t, m), log_w.dtype)
    return _count_update(z, best, ok, k, image_mask, axis_name)

  def cond(carry):
    it, _, _, _, done = carry
    return jnp.logical_and(it < max_iter, jnp.logical_not(jnp.all(done)))

  def body(carry):
    it, log_w, prev_ll, n_iter, done = carry
    new_log_w, ll = update(log_w)
    # Each position is its own K-MLE problem and stops on its own criterion, so the result
    # does not depend on how positions are grouped. Stopped positions stay frozen.
    log_w = jnp.where(done[:, None], log_w, new_log_w)
    converged = _relative_change(ll, prev_ll) < tol
    n_iter = jnp.where(done, n_iter, n_iter + 1)
    prev_ll = jnp.where(done, prev_ll, ll)
    return it + 1, log_w, prev_ll, n_iter, jnp.logical_or(done, converged)

  # The first update ran on all components (`_fit_chunk`); padding entries start done.
  carry = (jnp.int32(1), log_w, ll1, jnp.ones((t,), jnp.int32), jnp.logical_not(active))
  _, log_w, ll, n_iter, done = jax.lax.while_loop(cond, body, carry)
  # Back to component order: slot j of position t is component cand[t, j].
  dense = jnp.zeros_like(log_w).at[jnp.arange(t)[:, None], cand].set(log_w)
  return buffer, dense, n_iter, done, ll


def _window_log_densities(x: jax.Array, centre: jax.Array, w_pieces: list, bias: jax.Array,
                          init_log_weights: jax.Array, *, per_batch: int):
  """Log-densities and first assignments (Eq. 10 under the global weights) of a window of samples.

  Args:
    x: array of shape (M, window, w, d), the features of the window's grid rows.
    centre, w_pieces, bias, init_log_weights: as in `_fit_chunk_body`.
    per_batch: window positions per batch of the log-density products.

  Returns:
    log_dens (n_batches, K', per_batch, M), z0 and best0 (n_batches, per_batch, M): window position s
    at [s // per_batch, ..., s % per_batch].
  """
  m, window, w, d = x.shape
  k = bias.shape[0]
  # Samples ordered (window position, image): the M images of a position are contiguous.
  x = jnp.moveaxis(x, 0, 2).reshape(window * w, m, d)
  n_batches = -(-(window * w) // per_batch)
  # Padding positions at the end are computed but never read.
  x = jnp.pad(x, ((0, n_batches * per_batch - window * w), (0, 0), (0, 0)))
  x = x.reshape(n_batches, per_batch * m, d)

  def densities(xb):
    # The log-densities do not depend on the weights: computed once, reused every iteration.
    ld = log_densities(xb, (centre, w_pieces, bias))  # (K', per_batch * M)
    # First update (Eq. 10) of every position at once: all positions start from the same
    # global weights, so a sample's assignment is the same in every disk that holds it.
    best, z = _running_argmax(
        lambda i: jax.lax.dynamic_slice_in_dim(ld, i * _ARGMAX_BLOCK, _ARGMAX_BLOCK, axis=0)
        + jax.lax.dynamic_slice_in_dim(init_log_weights, i * _ARGMAX_BLOCK, _ARGMAX_BLOCK)[:, None],
        k // _ARGMAX_BLOCK, (per_batch * m,), ld.dtype)
    return ld.reshape(k, per_batch, m), z.reshape(per_batch, m), best.reshape(per_batch, m)

  return jax.lax.map(densities, x)


def _fit_window_rows(log_dens: jax.Array, z0: jax.Array, best0: jax.Array, start: jax.Array,
                     window_start: jax.Array, tol: jax.Array, image_mask: jax.Array | None, *,
                     offsets: tuple[tuple[int, int], ...], rows: int, grid: tuple[int, int],
                     window: int, per_batch: int, tile: int, max_iter: int,
                     axis_name: str | None = None):
  """K-MLE of the local weights of grid rows [start, start + rows) from their window's
  `_window_log_densities` (the window must hold every disk sample of those rows).

  Returns:
    log_weights (rows * w, K'), n_iter (rows * w,) int32, converged (rows * w,) bool,
    mean_log_likelihood (rows * w,).
  """
  k = log_dens.shape[1]
  m = log_dens.shape[-1]
  w = grid[1]
  index, ok = _sample_positions(start, window_start, rows, grid, window, offsets)
  samples = (index // per_batch, index % per_batch)
  log_w1, ll1 = _count_update(z0[samples], best0[samples], ok, k, image_mask, axis_name)
  p = rows * w
  if max_iter == 1:
    return log_w1, jnp.ones((p,), jnp.int32), jnp.zeros((p,), bool), ll1

  # Tiles of positions with similar numbers of candidates (an update costs ~ their max).
  nnz = jnp.sum(jnp.isfinite(log_w1), axis=-1)
  order = jnp.argsort(-nnz, stable=True).astype(jnp.int32)
  n_tiles = -(-p // tile)
  # Padding entries (inactive, done from the start) repeat position 0.
  tiles = jnp.pad(order, (0, n_tiles * tile - p)).reshape(n_tiles, tile)
  active = (jnp.arange(n_tiles * tile) < p).reshape(n_tiles, tile)

  def tile_step(buffer, inputs):
    pos, act = inputs
    buffer, lw, n_iter, done, ll = _fit_tile(
        buffer, log_dens, (samples[0][:, pos], samples[1][:, pos]), ok[:, pos], act,
        log_w1[pos], ll1[pos], tol, max_iter, image_mask, axis_name)
    return buffer, (lw, n_iter, done, ll)

  buffer = jnp.zeros((k, len(offsets), tile, m), log_dens.dtype)
  _, outputs = jax.lax.scan(tile_step, buffer, (tiles, active))
  # Back to position order (padding entries dropped).
  return tuple(jnp.zeros((p,) + a.shape[2:], a.dtype).at[order].set(
      a.reshape((n_tiles * tile,) + a.shape[2:])[:p]) for a in outputs)


def _fit_chunk_body(features: jax.Array, start: jax.Array, centre: jax.Array, w_pieces: list,
                    bias: jax.Array, init_log_weights: jax.Array, tol: jax.Array,
                    image_mask: jax.Array | None = None, *,
                    offsets: tuple[tuple[int, int], ...], rows: int, window: int,
                    per_batch: int, tile: int, max_iter: int, axis_name: str | None = None):
  """K-MLE of the local weights of the `rows` grid rows starting at row `start`.

  The log-densities of the samples of the window of rows [start - R, start + rows + R)
  (clipped to the grid) are computed once (centred expanded form, component-major); the first
  update runs on all K components, the others on each position's candidates only
  (`_fit_tile`), tile by tile, positions sorted by their number of candidates.

  Args:
    features: array of shape (M, h, w, d), the layer's features.
    start: int32 scalar, first grid row of the chunk (start + rows <= h).
    centre, w_pieces, bias: `log_density_params`, K padded to K' (a multiple of
      `_ARGMAX_BLOCK`) with zero columns.
    init_log_weights: array of shape (K',), log of the global weights (-inf on padding).
    tol: relative change of each position's mean log-likelihood that stops its iterations.
    per_batch: window positions per batch of the log-density products (all M images of a
      position in one batch).
    image_mask: optional bool array of shape (M,), False on padding images.
    axis_name: when run per device under `shard_map` with the images split over this mesh
      axis: every count is added over the devices (`_count_update`), so each device follows
      the same iterations and returns the weights of all images.

  Returns:
    log_weights (rows * w, K'), n_iter (rows * w,) int32, converged (rows * w,) bool,
    mean_log_likelihood (rows * w,).
  """
  m, h, w, d = features.shape
  reach = _halo(offsets)
  window_start = jnp.clip(start - reach, 0, h - window)
  x = jax.lax.dynamic_slice(features, (0, window_start, 0, 0), (m, window, w, d))
  log_dens, z0, best0 = _window_log_densities(x, centre, w_pieces, bias, init_log_weights,
                                              per_batch=per_batch)
  return _fit_window_rows(log_dens, z0, best0, start, window_start, tol, image_mask, offsets=offsets,
                          rows=rows, grid=(h, w), window=window, per_batch=per_batch, tile=tile,
                          max_iter=max_iter, axis_name=axis_name)


_CHUNK_STATICS = ("offsets", "rows", "window", "per_batch", "tile", "max_iter")
_fit_chunk = jax.jit(_fit_chunk_body, static_argnames=_CHUNK_STATICS)


@functools.lru_cache(maxsize=16)
def _sharded_fit_chunk(mesh: Mesh, **statics):
  """`_fit_chunk` with the images split over `mesh`: each device computes the log-densities
  of its own images and the counts are added with ``psum`` (outputs replicated)."""
  axis = mesh.axis_names[0]
  body = functools.partial(_fit_chunk_body, axis_name=axis, **statics)
  rep, rows = PartitionSpec(), PartitionSpec(axis)
  # check_vma=False: the body is single-device code (scans and while loops whose carries start
  # as constants); the psums make every output the same on all devices.
  return jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(rows, rep, rep, rep, rep, rep, rep, rows),
                               out_specs=(rep, rep, rep, rep), check_vma=False))


def _place_images(features, image_mask, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """Features split by images over `mesh` (padded with masked images), and their mask."""
  if image_mask is None:
    return sharding.place_samples(features, mesh)
  if isinstance(features, jax.Array) and not features.is_fully_addressable:
    # A `distributed.to_global` array: already split by images, with its own mask.
    if features.shape[0] % sharding.mesh_size(mesh):
      raise ValueError(f"a multi-process features array should have a multiple of "
                       f"{sharding.mesh_size(mesh)} images, got shape {tuple(features.shape)}")
    return features, image_mask
  feats, pad_mask = sharding.place_samples(features, mesh)
  mask = jnp.pad(jnp.asarray(image_mask, bool), (0, feats.shape[0] - features.shape[0]))
  return feats, jax.device_put(jnp.logical_and(mask, pad_mask), pad_mask.sharding)


@functools.partial(jax.jit, static_argnames=("dtype", "k_pad"))
def _padded_density_params(mixture: GaussianMixture, dtype, k_pad: int):
  """`log_density_params` and the log global weights, K padded to `k_pad` with components
  that have zero products and log-weight -inf (never assigned, never candidates).

  One jitted function rather than ~40 eager operations: each of those compiles on first
  use, which cost ~2 s per layer on a 2-core CPU."""
  k = mixture.n_components
  mixture = jax.tree_util.tree_map(lambda a: a.astype(dtype), mixture)
  centre, w_pieces, bias = log_density_params(mixture)
  w_pieces = [jnp.pad(piece, ((0, 0), (0, k_pad - k))) for piece in w_pieces]
  bias = jnp.pad(bias, (0, k_pad - k))
  init = jnp.pad(jnp.log(mixture.weights), (0, k_pad - k), constant_values=-jnp.inf)
  return centre, w_pieces, bias, init


def _padded_k(k: int) -> int:
  """K padded to a multiple of `_ARGMAX_BLOCK` (`_padded_density_params`)."""
  return -(-int(k) // _ARGMAX_BLOCK) * _ARGMAX_BLOCK


def _batch_and_tile(m: int, window_positions: int, positions: int, d: int, k_pad: int, n_offsets: int,
                    max_chunk_elements: int) -> tuple[int, int]:
  """(per_batch, tile) of a window of `window_positions` grid positions whose `positions` are fitted: about
  `default_chunk_size` samples per log-density product, whole positions (all M images) each; tiles of at
  most `_TILE_POSITIONS` positions whose (K', n_offsets, T, M) scratch stays within a quarter of
  `max_chunk_elements`."""
  per_batch = int(max(1, min(window_positions, default_chunk_size(d) // m)))
  tile = int(max(1, min(_TILE_POSITIONS, positions, max_chunk_elements // (4 * k_pad * m * n_offsets))))
  return per_batch, tile


def fit_local_log_weights(features: jax.Array, mixture: GaussianMixture, radius: float = 1.0,
                          max_iter: int = 100, tol: float = 1e-6,
                          callback: Callable[[LocalFitProgress], None] | None = None,
                          max_chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
                          mesh: Mesh | None = None, image_mask: jax.Array | None = None,
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
      once; sets how many grid rows a chunk has. A chunk also holds a (K, n_offsets, T, M)
      scratch of at most a quarter of this size: about 5 * max_chunk_elements bytes in all
      (float32), per device with a mesh (the images of one device).
    mesh: optional 1-D mesh: the images are split over its devices (`sharding.place_samples`;
      a global array from `glad_jax.distributed.to_global` is used as it is) and the counts
      of Eq. 11-12 are added across devices, which gives the one-device weights.
    image_mask: optional bool array of shape (M,), False on padding images (e.g. the mask of
      `distributed.to_global`); default: every image counts.

  Returns:
    log_weights: array of shape (h, w, K), log pi_k(x), -inf where pi_k(x) = 0 (replicated
      over the mesh).
    n_iter: int32 array of shape (h, w), the iterations each position took.
  """
  if mesh is not None:
    features, image_mask = _place_images(features, image_mask, mesh)
  else:
    features = jnp.asarray(features)
    image_mask = None if image_mask is None else jnp.asarray(image_mask, bool)
  m, h, w, d = features.shape
  k = mixture.n_components
  offsets = disk_offsets(radius)
  reach = _halo(offsets)
  # Memory bounds per device: each holds the log-densities of its own images only.
  m = -(-m // sharding.mesh_size(mesh))
  per_row = m * (w + 2 * reach) * k
  rows = int(max(1, min(h, max_chunk_elements // per_row - 2 * reach)))
  n_chunks = -(-h // rows)
  window = min(h, rows + 2 * reach)
  k_pad = _padded_k(k)
  per_batch, tile = _batch_and_tile(m, window * w, rows * w, d, k_pad, len(offsets), max_chunk_elements)

  if mesh is not None:
    mixture = sharding.to_local(mixture, mesh)
  dtype = features.dtype
  centre, w_pieces, bias, init = _padded_density_params(mixture, dtype, k_pad)
  statics = dict(offsets=offsets, rows=rows, window=window, per_batch=per_batch, tile=tile,
                 max_iter=max_iter)
  if mesh is None:
    fit_chunk = functools.partial(_fit_chunk, **statics)
  else:
    fit_chunk = _sharded_fit_chunk(mesh, **statics)
    centre, w_pieces, bias, init = sharding.replicate((centre, w_pieces, bias, init), mesh)
  log_w_chunks, n_iter_chunks = [], []
  for c in range(n_chunks):
    first, last = c * rows, min(h, (c + 1) * rows)
    # The last chunk is shifted up to end at the grid's last row (its first rows repeat the
    # previous chunk's, with identical results: positions are independent problems).
    start = min(first, h - rows)
    log_w, n_iter, done, ll = fit_chunk(
        features, jnp.int32(start), centre, w_pieces, bias, init, jnp.asarray(tol, dtype),
        image_mask)
    keep = slice((first - start) * w, (last - start) * w)
    log_w_chunks.append(log_w[keep, :k].reshape(last - first, w, k))
    n_iter_chunks.append(n_iter[keep].reshape(last - first, w))
    if callback is not None:
      callback(LocalFitProgress(
          chunk=c, n_chunks=n_chunks, rows=(first, last),
          iterations=int(jnp.max(n_iter[keep])),
          converged_fraction=float(jnp.mean(done[keep])),
          mean_log_likelihood=float(jnp.mean(ll[keep]))))
  return jnp.concatenate(log_w_chunks, axis=0), jnp.concatenate(n_iter_chunks, axis=0)


class RadiusBand(NamedTuple):
  """Grid rows [start, start + rows) on which candidate radii are compared, and the window of rows
  [window_start, window_start + window) that holds every disk sample of the largest candidate."""

  start: int
  rows: int
  window_start: int
  window: int


def radius_bands(grid_shape: tuple[int, int], max_radius: float, positions: int,
                 n_bands: int = 2) -> tuple[RadiusBand, ...]:
  """`n_bands` evenly spaced bands of whole grid rows holding about `positions` positions in all.

  Whole rows because the local fit works on row windows (the log-densities of a band's window are
  computed once for every candidate radius); several bands so that the comparison sees the top and
  the bottom of an image, not only its middle. A grid too short for separate windows is one band of
  all its rows."""
  h, w = int(grid_shape[0]), int(grid_shape[1])
  reach = _halo(disk_offsets(max_radius))
  rows = max(1, -(-int(positions) // (n_bands * w)))
  if n_bands * (rows + 2 * reach) >= h:
    return (RadiusBand(0, h, 0, h),)
  bands = []
  for i in range(n_bands):
    start = int(np.clip(round((i + 0.5) * h / n_bands - rows / 2), 0, h - rows))
    window = min(h, rows + 2 * reach)
    window_start = int(np.clip(start - reach, 0, h - window))
    bands.append(RadiusBand(start, rows, window_start, window))
  return tuple(bands)


@functools.partial(jax.jit, static_argnames=("radii_offsets", "rows", "grid", "window", "per_batch",
                                             "tile", "max_iter"))
def _held_out_band(fit_window: jax.Array, held_rows: jax.Array, start: jax.Array,
                   window_start: jax.Array, centre: jax.Array, w_pieces: list, bias: jax.Array,
                   init_log_weights: jax.Array, tol: jax.Array, *, radii_offsets, rows: int,
                   grid: tuple[int, int], window: int, per_batch: int, tile: int, max_iter: int
                   ) -> jax.Array:
  """log p(u) = log sum_k pi_k(x) N(u; mu_k, Sigma_k) of held-out samples u at the positions x of a band,
  with the local weights fitted (Eq. 10-12) at each candidate radius on the fit images' window.

  Returns:
    array of shape (n_radii, M_held, rows * w).
  """
  log_dens, z0, best0 = _window_log_densities(fit_window, centre, w_pieces, bias, init_log_weights,
                                              per_batch=per_batch)
  m_held, _, w, d = held_rows.shape
  k = bias.shape[0]
  held = log_densities(held_rows.reshape(-1, d), (centre, w_pieces, bias)).reshape(k, m_held, rows * w)
  out = []
  for offsets in radii_offsets:  # static and short (the candidate radii)
    log_w = _fit_window_rows(log_dens, z0, best0, start, window_start, tol, None, offsets=offsets,
                             rows=rows, grid=grid, window=window, per_batch=per_batch, tile=tile,
                             max_iter=max_iter)[0]  # (rows * w, K')
    out.append(jax.nn.logsumexp(held + log_w.T[:, None, :], axis=0))
  return jnp.stack(out)


def max_band_images(bands: Sequence[RadiusBand], width: int, n_components: int,
                    max_chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS) -> int:
  """How many fit images `held_out_log_likelihood` may take within the local fit's memory bound: a band's
  (M, window, w, K') log-densities are held at once, as a chunk's in `fit_local_log_weights`."""
  return max(1, max_chunk_elements // (max(b.window for b in bands) * int(width) * _padded_k(n_components)))


def held_out_log_likelihood(fit_windows: Sequence[jax.Array | np.ndarray],
                            held_rows: Sequence[jax.Array | np.ndarray], bands: Sequence[RadiusBand],
                            mixture: GaussianMixture, radii: Sequence[float], grid_shape: tuple[int, int],
                            max_iter: int = 100, tol: float = 1e-6,
                            max_chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
  """Per-image mean log-likelihood of held-out good images under local weights fitted at each radius.

  For every band of `radius_bands`, the local weights of the band's positions are fitted at every
  candidate radius on the fit images (the same K-MLE as `fit_local_log_weights`: the weights of a
  position depend only on its own disk samples, so a band gives those positions' full-grid weights),
  and the held-out images' samples at those positions are scored by the local mixture
  sum_k pi_k(x) N(u; mu_k, Sigma_k) (Section 3.3's per-position likelihood).

  Args:
    fit_windows: per band, array of shape (M_fit, band.window, w, d): the fit images' features of the
      band's window rows.
    held_rows: per band, array of shape (M_held, band.rows, w, d): the held-out images' features of the
      band's rows.
    bands: the bands (`radius_bands` with the largest candidate radius).
    mixture: the layer's global mixture.
    radii: candidate radii (the bands' windows must hold the largest one's disks).
    grid_shape: (h, w) of the whole layer (the bands' disks are clipped at its borders).
    max_iter, tol: as in `fit_local_log_weights`.
    max_chunk_elements: memory bound of one band's log-densities, as in `fit_local_log_weights`.

  Returns:
    float64 array of shape (n_radii, M_held): each held-out image's mean log p over the bands' positions.
  """
  h, w = int(grid_shape[0]), int(grid_shape[1])
  k_pad = _padded_k(mixture.n_components)
  radii_offsets = tuple(disk_offsets(r) for r in radii)
  n_off = max(len(o) for o in radii_offsets)
  dtype = jnp.asarray(fit_windows[0]).dtype
  centre, w_pieces, bias, init = _padded_density_params(mixture, dtype, k_pad)
  sums, count = 0.0, 0
  for band, fit_window, held in zip(bands, fit_windows, held_rows):
    m, window, _, d = fit_window.shape
    if window != band.window or held.shape[1] != band.rows:
      raise ValueError(f"band {band} does not match its features: window {tuple(fit_window.shape)}, "
                       f"held-out rows {tuple(held.shape)}")
    per_batch, tile = _batch_and_tile(m, window * w, band.rows * w, d, k_pad, n_off, max_chunk_elements)
    ll = _held_out_band(jnp.asarray(fit_window), jnp.asarray(held), jnp.int32(band.start),
                        jnp.int32(band.window_start), centre, w_pieces, bias, init, jnp.asarray(tol, dtype),
                        radii_offsets=radii_offsets, rows=band.rows, grid=(h, w), window=window,
                        per_batch=per_batch, tile=tile, max_iter=int(max_iter))
    ll = np.asarray(ll, np.float64)
    sums = sums + ll.sum(axis=-1)
    count += ll.shape[-1]
  return sums / count


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
                      tile_size: int = DEFAULT_TILE_SIZE, *, mesh: Mesh | None = None,
                      image_mask: jax.Array | np.ndarray | None = None) -> SparseLocalWeights:
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
    mesh: optional 1-D mesh: the images are split over its devices and the per-position
      counts over training images are added across them (same weights as one device). The
      features may be a multi-process global array (`glad_jax.distributed.to_global`).
    image_mask: optional bool array of shape (M,), False on padding images (e.g. the mask
      that comes with `distributed.to_global`); default: all images count.

  Returns:
    SparseLocalWeights of grid (h, w) and K = mixture.n_components (host arrays, the same
    on every process).

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
  if not (bool(jnp.all(jnp.isfinite(feats))) if isinstance(feats, jax.Array)
          else bool(np.all(np.isfinite(feats)))):
    raise ValueError("features contain NaN or infinite values")
  if not (radius >= 0 and math.isfinite(radius)):
    raise ValueError(f"radius should be a finite number >= 0, got {radius}")
  if int(max_iter) != max_iter or max_iter < 1:
    raise ValueError(f"max_iter should be an integer >= 1, got {max_iter}")
  if not tol >= 0:
    raise ValueError(f"tol should be >= 0, got {tol}")
  if int(tile_size) != tile_size or tile_size < 1:
    raise ValueError(f"tile_size should be an integer >= 1, got {tile_size}")
  if image_mask is not None:
    if tuple(image_mask.shape) != (feats.shape[0],):
      raise ValueError(f"image_mask should have shape ({feats.shape[0]},) (one entry per image), "
                       f"got {tuple(image_mask.shape)}")
    if not bool(jnp.any(jnp.asarray(image_mask))):
      raise ValueError("image_mask marks no image as valid: nothing to fit")
  dtype = feats.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    feats = feats.astype(np.float32)
  log_weights, _ = fit_local_log_weights(feats, mixture, radius=radius, max_iter=int(max_iter),
                                         tol=float(tol), callback=callback, mesh=mesh,
                                         image_mask=image_mask)
  return sparsify(log_weights, tile_size=int(tile_size))
