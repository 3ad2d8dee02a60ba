"""Online update of the local weights pi_k(x) of a fitted layer (paper Eq. 10-12, Section 5).

The local weights are normalised local counts: pi_k(x) = |C_k(x)| / n(x), with C_k(x) the disk
samples of position x assigned to component k and n(x) = M |disk(x) inside the grid| the number
of samples in the disk (M training images). Keeping n(x) per position (`local_totals`, an (h, w)
array: fractional once forgetting has been applied) turns the sparse log-weights back into counts,
c_k(x) = exp(log pi_k(x)) n(x), and new images add theirs:

1. Remap (`remap_counts`): the global update (`glad_jax.mixture.online.update_mixture`) returns,
   for every output component, the input component it continues (-1 for a created one). The old
   counts follow that index; counts of dropped components leave the position's total, created
   components start at 0. Old counts and totals are multiplied by the forgetting factor lambda.
2. K-MLE per position, warm-started, with the old counts as a fixed prior mass (the same
   scheme as the global update). The M' new images contribute n'(x) = M' |disk(x)| samples.
   Their share of the mass starts at the global weights, as in the fit (where every position
   starts from pi_k): pi^0_k(x) = (c_k(x) + n'(x) pi_k) / (n(x) + n'(x)); this lets a new
   sample reach a component that had no weight at x. Then, up to `max_iter` times: every new
   disk sample u is assigned to argmax_k log N(u; mu_k, Sigma_k) + log pi^t_k(x) (Eq. 10, with
   the likelihood-correct sign, see `glad_jax.local`), giving new counts c'_k(x), and
   pi^{t+1}_k(x) = (c_k(x) + c'_k(x)) / (n(x) + n'(x)) (Eq. 11-12). A position stops when its
   new counts no longer change.
3. Re-sparsify: components with no count at x get pi_k(x) = 0 (log -inf); the map is stored in
   the `SparseLocalWeights` tiled layout again, with n(x) + n'(x) as the new totals.

Simplification (documented): the old samples are not re-assigned under the updated components
(they are not kept); their counts stay where the fit put them, as in online K-MLE.

Model level (`update_state`): per layer, the global mixture is updated first
(`glad_jax.mixture.online.update_mixture`, on the new vectors subsampled at the fit's rate
n_global / n_all, so that old and new images weigh the same per image), then the local weights
as above on every new vector, and the layer's scoring model is rebuilt. The statistics an update
needs are `LayerUpdateStats`, computed at fit time (`layer_update_stats`) and kept in the state.

Pure math: no I/O; validation at the entry points `update_local_weights` and `update_state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax import local as local_lib
from glad_jax import scoring
from glad_jax.mixture import online as mixture_online
from glad_jax.mixture.gaussian import GaussianMixture

_HIGHEST = jax.lax.Precision.HIGHEST
# Float32 words of the (K, M', rows + 2R, w + 2R) log-densities of one chunk of grid rows.
_CHUNK_ELEMENTS = 1 << 25


class LocalUpdateInfo(NamedTuple):
  """What `update_local_weights` did.

  Attributes:
    n_iter: the most K-MLE iterations any position took.
    converged_fraction: fraction of positions whose new counts stopped changing.
    mean_nnz: mean non-zero weights per position after the update.
  """

  n_iter: int
  converged_fraction: float
  mean_nnz: float


def local_totals(grid_shape: tuple[int, int], n_images: int, radius: float) -> np.ndarray:
  """n(x) = n_images * |disk(x) inside the grid|, the sample count of every position (Eq. 12).

  Args:
    grid_shape: (h, w) of the layer.
    n_images: M, the number of images.
    radius: disk radius r (grid units).

  Returns:
    float32 array of shape (h, w).
  """
  h, w = grid_shape
  out = np.zeros((h, w), np.float32)
  for dy, dx in local_lib.disk_offsets(radius):
    ys = slice(max(0, -dy), min(h, h - dy))
    xs = slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] += 1.0
  return out * np.float32(n_images)


def remap_counts(log_weights: jax.Array, totals: jax.Array, index: np.ndarray,
                 forgetting: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Old local counts c_k(x) in the updated component order, scaled by lambda (step 1).

  Args:
    log_weights: array of shape (h, w, K_in), log pi_k(x) (-inf for 0).
    totals: array of shape (h, w), n(x).
    index: int array of shape (K_out,), input component of each output one (-1: created).
    forgetting: lambda in (0, 1].

  Returns:
    counts: array of shape (h, w, K_out); totals: array of shape (h, w), their sum (what is left
    of n(x) after dropping components).
  """
  index = np.asarray(index)
  counts = jnp.exp(log_weights) * (forgetting * totals)[..., None]
  keep = jnp.asarray(index >= 0)
  counts = jnp.where(keep, counts[..., np.maximum(index, 0)], 0.0)
  return counts, jnp.sum(counts, axis=-1)


@functools.partial(jax.jit, static_argnames=("offsets", "max_iter"))
def _chunk_update(window, valid, old_counts, old_total, log_global, centre, w_pieces, bias, *,
                  offsets, max_iter):
  """Step 2 on the positions of one chunk of rows.

  Args:
    window: array of shape (M', rows + 2R, w + 2R, d), the new features, zero-padded by R.
    valid: bool array of shape (rows + 2R, w + 2R), False on the padding.
    old_counts: (rows, w, K); old_total: (rows, w); log_global: (K,) log pi_k.
    centre, w_pieces, bias: `local.log_density_params` of the updated mixture.

  Returns:
    counts (rows, w, K) old + new, totals (rows, w), n_iter (rows, w), converged (rows, w).
  """
  m, hp, wp, d = window.shape
  k = bias.shape[0]
  reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
  rows, w = hp - 2 * reach, wp - 2 * reach
  # Component-major log-densities (K, M', hp, wp): the argmax over K then reduces the major axis.
  ld = jax.lax.map(lambda f: local_lib.log_densities(f.reshape(-1, d), (centre, w_pieces, bias)),
                   window)                                        # (M', K, hp * wp)
  ld = jnp.moveaxis(ld, 1, 0).reshape(k, m, hp, wp)
  oks = [jax.lax.slice(valid, (reach + dy, reach + dx), (reach + dy + rows, reach + dx + w))
         for dy, dx in offsets]
  n_new = m * sum(ok.astype(window.dtype) for ok in oks)         # n'(x)
  total = old_total + n_new
  pos = jnp.arange(rows * w, dtype=jnp.int32).reshape(1, rows, w)

  def new_counts(log_pi):                                         # log_pi: (K, rows, w)
    c = jnp.zeros((k * rows * w,), window.dtype)
    for (dy, dx), ok in zip(offsets, oks):                        # static, 5 offsets for r = 1
      y0, x0 = reach + dy, reach + dx
      s = jax.lax.slice(ld, (0, 0, y0, x0), (k, m, y0 + rows, x0 + w)) + log_pi[:, None]
      z = jnp.argmax(s, axis=0).astype(jnp.int32)                 # (M', rows, w), Eq. 10
      c = c.at[(z * (rows * w) + pos).reshape(-1)].add(
          jnp.broadcast_to(ok.astype(window.dtype), (m, rows, w)).reshape(-1))
    return c.reshape(k, rows, w)

  prior = jnp.moveaxis(old_counts, -1, 0)                         # (K, rows, w)
  log_total = jnp.log(total)
  log_pi0 = jnp.log(prior + n_new[None] * jnp.exp(log_global)[:, None, None]) - log_total

  def cond(carry):
    it, _, _, done, _ = carry
    return (it < max_iter) & ~jnp.all(done)

  def body(carry):
    it, log_pi, prev, done, n_iter = carry
    c = new_counts(log_pi)
    same = jnp.all(c == prev, axis=0)
    # Positions are independent problems: a stopped one keeps its weights.
    c = jnp.where(done[None], prev, c)
    new_log_pi = jnp.log(prior + c) - log_total                    # Eq. 11-12
    n_iter = jnp.where(done, n_iter, n_iter + 1)
    return it + 1, jnp.where(done[None], log_pi, new_log_pi), c, done | same, n_iter

  init = (jnp.int32(0), log_pi0, jnp.full((k, rows, w), -1.0, window.dtype),
          jnp.zeros((rows, w), bool), jnp.zeros((rows, w), jnp.int32))
  _, _, c, done, n_iter = jax.lax.while_loop(cond, body, init)
  return jnp.moveaxis(prior + c, 0, -1), total, n_iter, done


def update_local_log_weights(log_weights: jax.Array, totals: jax.Array, features: jax.Array,
                             mixture: GaussianMixture, index: np.ndarray, *,
                             forgetting: float = 1.0, radius: float = 1.0, max_iter: int = 10,
                             max_chunk_elements: int = _CHUNK_ELEMENTS
                             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Steps 1-2 (module doc) on dense maps; assumes valid input (see `update_local_weights`).

  Args:
    log_weights: array of shape (h, w, K_in), the fitted log pi_k(x).
    totals: array of shape (h, w), n(x).
    features: array of shape (M', h, w, d), the new images' features of this layer.
    mixture: the updated global mixture (K_out components).
    index: int array of shape (K_out,), see `remap_counts`.
    forgetting: lambda in (0, 1].
    radius: disk radius r of the fit.
    max_iter: iteration cap per position.
    max_chunk_elements: bound on K_out * M' * (rows + 2R) * (w + 2R) per chunk of rows.

  Returns:
    log_weights (h, w, K_out), totals (h, w), n_iter (h, w) int32, converged (h, w) bool.
  """
  m, h, w, d = features.shape
  k = mixture.n_components
  offsets = local_lib.disk_offsets(radius)
  reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
  counts, old_total = remap_counts(log_weights, totals, index, forgetting)
  feats = jnp.pad(jnp.asarray(features, jnp.float32),
                  ((0, 0), (reach, reach), (reach, reach), (0, 0)))
  valid = jnp.pad(jnp.ones((h, w), bool), reach)
  mixture = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mixture)
  centre, w_pieces, bias = local_lib.log_density_params(mixture)
  log_global = jnp.log(mixture.weights)
  per_row = k * m * (w + 2 * reach)
  rows = int(max(1, min(h, max_chunk_elements // per_row - 2 * reach)))
  outs = []
  for first in range(0, h, rows):
    # The last chunk is shifted up to end at the last row (recomputed rows give the same result).
    start = min(first, h - rows)
    out = _chunk_update(feats[:, start:start + rows + 2 * reach],
                        valid[start:start + rows + 2 * reach], counts[start:start + rows],
                        old_total[start:start + rows], log_global, centre, w_pieces, bias,
                        offsets=offsets, max_iter=int(max_iter))
    outs.append([a[first - start:] for a in out])
  c, total, n_iter, done = (jnp.concatenate(parts, axis=0) for parts in zip(*outs))
  new_log = jnp.where(c > 0, jnp.log(jnp.where(c > 0, c, 1.0)) - jnp.log(total)[..., None],
                      -jnp.inf)
  return new_log, total, n_iter, done


def update_local_weights(local: local_lib.SparseLocalWeights, totals: jax.Array | np.ndarray,
                         features: jax.Array | np.ndarray, mixture: GaussianMixture,
                         index: np.ndarray, *, forgetting: float = 1.0, radius: float = 1.0,
                         max_iter: int = 10
                         ) -> tuple[local_lib.SparseLocalWeights, jax.Array, LocalUpdateInfo]:
  """Adds new images' local counts to a fitted sparse local map (module doc, steps 1-3).

  Args:
    local: the fitted `SparseLocalWeights` (grid (h, w), K_in components).
    totals: array of shape (h, w), n(x) of that map (`local_totals` at fit time).
    features: array of shape (M', h, w, d), the new images' features of this layer.
    mixture: the updated global mixture (K_out components, dimension d).
    index: int array of shape (K_out,), the input component of each output component (-1 for a
      created one), from `glad_jax.mixture.online.UpdateInfo.index`.
    forgetting: lambda in (0, 1], the weight of every old sample.
    radius: the fit's disk radius.
    max_iter: iteration cap per position.

  Returns:
    (updated `SparseLocalWeights` with K_out components, new totals (h, w), `LocalUpdateInfo`).

  Raises:
    ValueError: features of another grid or dimension, an index of another length, or a bad
      forgetting / max_iter.
  """
  feats = jnp.asarray(features)
  h, w = local.grid_shape
  index = np.asarray(index)
  if feats.ndim != 4 or feats.shape[1:3] != (h, w) or feats.shape[3] != mixture.dim:
    raise ValueError(f"new features should have shape (M, {h}, {w}, {mixture.dim}), got "
                     f"{tuple(feats.shape)}")
  if feats.shape[0] == 0:
    raise ValueError("no new images (features of shape (0, ...))")
  if index.shape != (mixture.n_components,) or index.max(initial=-1) >= local.n_components:
    raise ValueError(f"index should map the {mixture.n_components} updated components into the "
                     f"{local.n_components} fitted ones, got shape {index.shape}")
  if np.shape(totals) != (h, w):
    raise ValueError(f"totals should have shape ({h}, {w}), got {np.shape(totals)}")
  if not 0.0 < forgetting <= 1.0:
    raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
  if int(max_iter) != max_iter or max_iter < 1:
    raise ValueError(f"max_iter should be an integer >= 1, got {max_iter}")
  if not bool(jnp.all(jnp.isfinite(feats))):
    raise ValueError("new features contain NaN or infinite values")
  new_log, new_totals, n_iter, done = update_local_log_weights(
      local_lib.to_dense(local), jnp.asarray(totals, jnp.float32), feats, mixture, index,
      forgetting=float(forgetting), radius=radius, max_iter=int(max_iter))
  sparse = local_lib.sparsify(new_log, tile_size=local.tile_size)
  info = LocalUpdateInfo(n_iter=int(jnp.max(n_iter)), converged_fraction=float(jnp.mean(done)),
                         mean_nnz=float(local_lib.sparsity_stats(sparse).mean_nnz))
  return sparse, new_totals, info


# ------------------------------------------------------------------------------------- model level


@struct.dataclass
class LayerUpdateStats:
  """What updating one layer needs, kept in the fitted state (computed at fit time).

  Attributes:
    mixture: `glad_jax.mixture.online.ComponentStats` of the global mixture (counts, means,
      packed scatter about the means, the fit's covariance floor and log-likelihood threshold).
    local_totals: float32 array of shape (h, w), n(x) of the local weights (None: global only).
    sample_rate: float32 array of shape (), the share n_global / n_all of the layer's vectors that
      the global statistics count; new vectors are subsampled at this rate.
    n_images: float32 array of shape (), the images the layer has seen (fit + updates, forgotten
      by lambda like the counts).
  """

  mixture: mixture_online.ComponentStats
  local_totals: jax.Array | None
  sample_rate: jax.Array
  n_images: jax.Array


# Rows of the global fit's vectors whose log-likelihoods give the new-component threshold when
# the fit's own statistics are used (its 1e-3 quantile is then about the 16th smallest).
THRESHOLD_SAMPLE_ROWS = 16_384


def layer_update_stats(mixture: GaussianMixture, x_global: Any, *, n_all: int, n_images: int,
                       grid_shape: tuple[int, int], radius: float, local: bool = True,
                       reg_covar: float = 1e-6,
                       quantile: float = mixture_online.DEFAULT_NEW_COMPONENT_QUANTILE,
                       fit_stats: mixture_online.ComponentStats | None = None
                       ) -> LayerUpdateStats:
  """The update statistics of a freshly fitted layer.

  Args:
    mixture: the fitted global mixture.
    x_global: array of shape (n_global, d), the vectors the global fit ran on.
    n_all: all vectors of the layer (n_images * h * w).
    n_images: M, the training images.
    grid_shape: (h, w).
    radius: the local weights' disk radius.
    local: whether the layer has local weights.
    reg_covar: the fit's relative covariance floor (`KMLEConfig.reg_covar`).
    quantile: q of the log-likelihood threshold for new components.
    fit_stats: the K-MLE fit's own statistics (`FitInfo.final_stats`: the last assignment, of
      which `mixture` is the M-step). Given, they are kept as they are and only the threshold
      is computed, from the log-likelihoods of at most `THRESHOLD_SAMPLE_ROWS` evenly spaced
      rows of x_global (x_global is already a seeded subset); this saves a full assignment pass
      over x_global (4-5 s at d = 112 on a 2-core CPU). None: one more assignment of every row
      of x_global under `mixture` (`mixture_online.fit_statistics`, also EM's route).
  """
  if fit_stats is None:
    floor = mixture_online.relative_floor(x_global, reg_covar)
    stats = mixture_online.fit_statistics(mixture, x_global, reg_covar=floor, quantile=quantile)
  else:
    if fit_stats.n_components != mixture.n_components:
      raise ValueError(f"fit_stats has {fit_stats.n_components} components but the mixture has "
                       f"{mixture.n_components}")
    n = np.shape(x_global)[0]
    rows = x_global[::max(1, n // THRESHOLD_SAMPLE_ROWS)][:THRESHOLD_SAMPLE_ROWS]
    _, ll = mixture_online.assign(mixture, rows)
    stats = fit_stats.replace(loglik_threshold=jnp.quantile(ll, quantile))
  totals = jnp.asarray(local_totals(grid_shape, n_images, radius)) if local else None
  return LayerUpdateStats(mixture=stats, local_totals=totals,
                          sample_rate=jnp.float32(np.shape(x_global)[0] / n_all),
                          n_images=jnp.float32(n_images))


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Hyper-parameters of `update_state`.

  Attributes:
    forgetting: lambda in (0, 1], the weight of every old sample (global and local counts).
    n_iter: K-MLE iterations of the global update (`OnlineConfig.n_iter`).
    local_max_iter: iteration cap of the local update per position.
    new_components: create global components where new data is poorly explained.
    seed: seeds the subsample of new vectors and the small K-MLE of new components.
  """

  forgetting: float = 1.0
  n_iter: int = 5
  local_max_iter: int = 10
  new_components: bool = True
  seed: int = 0

  def replace(self, **changes) -> "UpdateConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class LayerUpdateInfo:
  """What `update_state` did to one layer.

  Attributes:
    n_images: new images.
    n_samples_global: new vectors the global update used.
    global_info: `glad_jax.mixture.online.UpdateInfo`.
    local_info: `LocalUpdateInfo` (None: global only).
    n_components: K after the update.
  """

  n_images: int
  n_samples_global: int
  global_info: mixture_online.UpdateInfo
  local_info: LocalUpdateInfo | None
  n_components: int


def layer_radius(model: scoring.LayerModel, config: Any) -> float:
  """The disk radius of a layer's local weights: stored per layer since radius="auto"; a model stored
  before that has its configuration's (a number then)."""
  if model.radius is not None:
    return float(model.radius)
  if config.radius == "auto":
    raise ValueError("this model's local weights do not say which radius they were fitted with: refit it")
  return float(config.radius)


def update_layer(model: scoring.LayerModel, mixture: GaussianMixture, stats: LayerUpdateStats,
                 features: Any, config: UpdateConfig, *, use_oas: bool, radius: float,
                 key: jax.Array) -> tuple[scoring.LayerModel, LayerUpdateStats, LayerUpdateInfo]:
  """Global then local update of one layer (module doc).

  Args:
    model: the layer's scoring model (its local map is updated).
    mixture: the layer's global mixture in covariance form.
    stats: its `LayerUpdateStats`.
    features: array of shape (M', h, w, d), the new images' features.
    config: an `UpdateConfig`.
    use_oas, radius: the fit's settings.
    key: `jax.random` key.
  """
  feats = jnp.asarray(features, jnp.float32)
  m, h, w, d = feats.shape
  x = feats.reshape(-1, d)
  k_sub, k_new = jax.random.split(key)
  n_use = int(min(x.shape[0], max(1, round(float(stats.sample_rate) * x.shape[0]))))
  if n_use < x.shape[0]:
    idx = jnp.sort(jax.random.choice(k_sub, x.shape[0], (n_use,), replace=False))
    x = x[idx]
  cfg = mixture_online.OnlineConfig(forgetting=config.forgetting, n_iter=config.n_iter,
                                    use_oas=use_oas, new_components=config.new_components)
  new_mix, new_stats, ginfo = mixture_online.update_mixture(mixture, stats.mixture, x, cfg, k_new)
  local, totals, linfo = None, None, None
  if model.local is not None:
    if stats.local_totals is None:
      raise ValueError("the update statistics of a layer with local weights have no local totals")
    local, totals, linfo = update_local_weights(
        model.local, stats.local_totals, feats, new_mix, ginfo.index, forgetting=config.forgetting,
        radius=radius, max_iter=config.local_max_iter)
  new_model = scoring.make_layer_model(new_mix, model.grid_shape, local, radius=radius)
  new_stats = LayerUpdateStats(mixture=new_stats, local_totals=totals,
                               sample_rate=stats.sample_rate,
                               n_images=config.forgetting * stats.n_images + m)
  return new_model, new_stats, LayerUpdateInfo(
      n_images=m, n_samples_global=int(x.shape[0]), global_info=ginfo, local_info=linfo,
      n_components=int(new_mix.n_components))


NO_STATS_MESSAGE = ("it has no update statistics (fitted before `glad update` existed, or saved without "
                    "them): refit it with `glad fit` (or GLAD(config).fit(images)) to update it later")


@dataclasses.dataclass(frozen=True)
class UpdateRecord:
  """One entry of a model's update history (kept in the state, shown by `glad info`).

  Attributes:
    date: UTC time of the update, ISO 8601.
    n_images: new images the model was updated with.
    forgetting: the lambda used.
    n_components: ((layer, K after the update), ...).
    n_added: components created, all layers.
    n_dropped: components dropped, all layers.
    recalibrated: True when the thresholds were recalibrated on held-out new images.
  """

  date: str
  n_images: int
  forgetting: float
  n_components: tuple[tuple[str, int], ...]
  n_added: int
  n_dropped: int
  recalibrated: bool = False


def update_state(state: Any, features: Mapping[str, Any], config: UpdateConfig = UpdateConfig(),
                 key: jax.Array | None = None, *, date: str | None = None
                 ) -> tuple[Any, dict[str, LayerUpdateInfo]]:
  """Updates every layer of a fitted GLAD state with new good images' features.

  Args:
    state: a `glad_jax.methods.glad.GLADState` with ``update_stats``.
    features: {layer: array (M', h, w, d)} of the new images (aligned like the training images).
    config: an `UpdateConfig`.
    key: `jax.random` key (default: from ``config.seed``); layer i uses ``fold_in(key, i)``.
    date: the history entry's date (default: now, UTC).

  Returns:
    (the updated state: new layers, update statistics and one more `UpdateRecord`; thresholds
    kept), {layer: `LayerUpdateInfo`}.

  Raises:
    ValueError: no update statistics, missing layers, features of another grid or dimension,
      an empty batch, or a bad config.
  """
  import datetime

  if getattr(state, "update_stats", None) is None:
    raise ValueError(f"cannot update this model: {NO_STATS_MESSAGE}")
  if not 0.0 < config.forgetting <= 1.0:
    raise ValueError(f"forgetting must be in (0, 1], got {config.forgetting!r}")
  c = state.config
  missing = [name for name in state.layers if name not in features]
  if missing:
    raise ValueError(f"features are missing layer(s) {missing}; got {sorted(features)}")
  n_images = None
  for name, lm in state.layers.items():
    shape = tuple(np.shape(features[name]))
    want = (lm.grid_shape[0], lm.grid_shape[1], lm.dim)
    if len(shape) != 4 or shape[1:] != want:
      raise ValueError(f"features of layer {name} should have shape (M, {want[0]}, {want[1]}, "
                       f"{want[2]}), got {shape}")
    if shape[0] == 0:
      raise ValueError("no new images to update the model with (empty batch)")
    if n_images is not None and shape[0] != n_images:
      raise ValueError(f"layers have different numbers of images ({n_images} and {shape[0]})")
    n_images = shape[0]
  key = jax.random.key(config.seed) if key is None else key
  layers, stats, infos = {}, {}, {}
  for i, name in enumerate(state.layers):
    layers[name], stats[name], infos[name] = update_layer(
        state.layers[name], state.mixture(name), state.update_stats[name], features[name], config,
        use_oas=c.use_oas, radius=layer_radius(state.layers[name], c), key=jax.random.fold_in(key, i))
  record = UpdateRecord(
      date=date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      n_images=int(n_images), forgetting=float(config.forgetting),
      n_components=tuple((name, info.n_components) for name, info in infos.items()),
      n_added=sum(info.global_info.n_added for info in infos.values()),
      n_dropped=sum(info.global_info.n_dropped for info in infos.values()))
  new_state = state.replace(layers=layers, update_stats=stats,
                            update_history=tuple(state.update_history) + (record,))
  return new_state, infos
