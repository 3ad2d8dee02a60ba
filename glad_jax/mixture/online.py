"""Online K-MLE: update a fitted global mixture with new samples (paper Section 5, future work).

The paper's conclusion names the model's "inability to evolve once learned" as a limitation and
proposes the online K-MLE of Saint-Jean & Nielsen (2015). There, every new observation is
assigned to its most likely component (Eq. 1) and that component's expectation parameters
(for a Gaussian: the mean and the second moment) move towards it with step 1 / n_k, i.e. they
become the count-weighted average of the old and the new samples. This module does the same in
batches, from per-component sufficient statistics kept with the fitted model.

Statistics (`ComponentStats`), computed once at fit time from the last hard assignment of the
fit's samples: K-MLE's own (`glad_jax.mixture.fit.FitInfo.final_stats`, the statistics of which
the fitted mixture is the M-step), or one more assignment under the fitted mixture
(`fit_statistics`; the two agree once no label changes):

* counts n_k, means m_k and the scatter about the mean M_k = sum_i (u_i - m_k)(u_i - m_k)^T
  (stored as its packed upper triangle: d (d + 1) / 2 numbers per component);
* the absolute covariance floor of the fit (``reg_covar``) and the `new_component_quantile`
  q-quantile of the training samples' log-likelihoods log p(u) = log sum_k pi_k N(u; k)
  (``loglik_threshold``, the rule for creating components below).

Merging rule (`merge_stats`, Chan et al.'s pairwise update): with forgetting factor lambda in
(0, 1] applied to the old statistics,

  n = lambda n_a + n_b,  m = (lambda n_a m_a + n_b m_b) / n,
  M = lambda M_a + M_b + (lambda n_a n_b / n) (m_a - m_b)(m_a - m_b)^T.

lambda = 1 (default): old and new samples weigh by their counts, and the merged statistics are
those of the union of the two samples. lambda < 1 weighs every old sample by lambda (an
exponential forgetting for drifting production lines when it is applied at every update).

Update (`update_mixture`):

1. New components: the new samples whose log-likelihood under the fitted mixture is below the
   stored ``loglik_threshold`` (the q-quantile, q = 0.1 % by default, of the training samples'
   log-likelihoods) are "poorly explained". When there are at least `OnlineConfig.min_new_samples`
   of them, a small K-MLE (`fit_kmle`, K = their number / `OnlineConfig.new_cluster_size`,
   clipped to [1, `OnlineConfig.max_new_components`]) clusters them, and its components join the
   mixture with no prior mass.
2. A few K-MLE iterations on the new samples only (`OnlineConfig.n_iter`): assignment (Eq. 1)
   to the current components, statistics of the new samples merged with the (forgotten) old
   ones, which stay a fixed prior mass (the old samples are not reassigned: they are not kept),
   then Eq. 2-3 from the merged statistics and OAS exactly as in the fit (Eq. 9 on the merged
   sample covariance M / n with the merged count n), plus the fit's floor ``reg_covar``.
   The iterations stop early when no label changes.
3. Components whose merged count is below the fit's ``min_cluster_size`` (e.g. after forgetting,
   or a new component that lost its samples) are dropped, like in the fit; the returned
   ``index`` maps each output component to its input component (-1 for a created one), which
   the local weights need (`glad_jax.online`).

Pure JAX math plus one host driver; no I/O. All matmuls run at HIGHEST precision.

References:
  Saint-Jean & Nielsen, "Online k-MLE for mixture modeling with exponential families", GSI 2015;
  Artola et al., GLAD (WACV 2023), Eq. 1-3, 9 and Section 5; Chan, Golub & LeVeque (1979).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax.mixture.gaussian import GaussianMixture, log_joint, log_joint_params
from glad_jax.mixture.oas import oas_covariance

_HIGHEST = jax.lax.Precision.HIGHEST
# Float32 words of the largest intermediate of one assignment chunk (features + scores).
_CHUNK_ELEMENTS = 1 << 22
DEFAULT_NEW_COMPONENT_QUANTILE = 1e-3


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triu(d: int) -> tuple[np.ndarray, np.ndarray]:
  return np.triu_indices(d)


def pack_scatter(scatter: jax.Array) -> jax.Array:
  """Upper triangles (row-major) of symmetric (..., d, d) matrices, shape (..., d (d + 1) / 2)."""
  rows, cols = _triu(scatter.shape[-1])
  return scatter[..., rows, cols]


def unpack_scatter(packed: jax.Array, d: int) -> jax.Array:
  """Symmetric (..., d, d) matrices from `pack_scatter`'s packed upper triangles."""
  rows, cols = _triu(d)
  pos = np.empty((d, d), np.int32)
  pos[rows, cols] = np.arange(rows.size)
  pos[cols, rows] = np.arange(rows.size)
  return packed[..., pos]


@struct.dataclass
class ComponentStats:
  """Per-component sufficient statistics of a global mixture (what its M-step needs).

  Attributes:
    counts: array of shape (K,), n_k (hard counts; fractional after forgetting).
    means: array of shape (K, d), m_k, the mean of the component's samples (0 where n_k = 0).
    scatter_triu: array of shape (K, d (d + 1) / 2), packed upper triangle of the scatter about
      the mean M_k = sum_i (u_i - m_k)(u_i - m_k)^T (see `pack_scatter`).
    reg_covar: shape (), the absolute diagonal floor the fit added to every covariance.
    loglik_threshold: shape (), the q-quantile of the training samples' log p(u) under the
      fitted mixture: new samples below it are "poorly explained" (`update_mixture`).
  """

  counts: jax.Array
  means: jax.Array
  scatter_triu: jax.Array
  reg_covar: jax.Array
  loglik_threshold: jax.Array

  @property
  def n_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def scatter(self) -> jax.Array:
    """M_k, array of shape (K, d, d)."""
    return unpack_scatter(self.scatter_triu, self.dim)

  def take(self, index: np.ndarray) -> "ComponentStats":
    """Statistics of components `index` (int array of shape (K',), -1 = a component with none)."""
    index = np.asarray(index)
    keep = jnp.asarray(index >= 0)
    src = jnp.asarray(np.maximum(index, 0))
    return self.replace(counts=jnp.where(keep, self.counts[src], 0.0),
                        means=jnp.where(keep[:, None], self.means[src], 0.0),
                        scatter_triu=jnp.where(keep[:, None], self.scatter_triu[src], 0.0))


@functools.partial(jax.jit, static_argnames=("n_components", "chunk_size"))
def _moments(x, labels, *, n_components, chunk_size):
  k = n_components
  n, d = x.shape
  valid = (labels >= 0) & (labels < k)
  zc = jnp.where(valid, labels, 0)
  w = valid.astype(x.dtype)
  counts = jax.ops.segment_sum(w, zc, num_segments=k)
  safe = jnp.where(counts > 0, counts, 1.0)
  means = jax.ops.segment_sum(x * w[:, None], zc, num_segments=k) / safe[:, None]
  # Second pass about the (float32) means, then the residual mean: no E[uu^T] - mm^T cancellation.
  diff = (x - means[zc]) * w[:, None]
  resid = jax.ops.segment_sum(diff, zc, num_segments=k) / safe[:, None]
  n_chunks = n // chunk_size

  def body(acc, inputs):
    dc, zb = inputs
    outer = jnp.einsum("nd,ne->nde", dc, dc, precision=_HIGHEST)
    return acc + jax.ops.segment_sum(outer, zb, num_segments=k), None

  scatter, _ = jax.lax.scan(body, jnp.zeros((k, d, d), x.dtype),
                            (diff.reshape(n_chunks, chunk_size, d),
                             zc.reshape(n_chunks, chunk_size)))
  # Sum (u - m')(u - m')^T about the corrected mean m' = m + resid.
  scatter = scatter - counts[:, None, None] * resid[:, :, None] * resid[:, None, :]
  means = jnp.where(counts[:, None] > 0, means + resid, 0.0)
  return counts, means, pack_scatter(0.5 * (scatter + jnp.swapaxes(scatter, 1, 2)))


def _chunk_rows(n: int, width: int) -> int:
  rows = max(8, _CHUNK_ELEMENTS // max(1, width))
  rows = 2 ** int(math.floor(math.log2(rows)))
  return int(min(rows, max(8, 2 ** math.ceil(math.log2(max(n, 1))))))


def _pad_rows(x: jax.Array, multiple: int, value=0) -> jax.Array:
  n = x.shape[0]
  n_pad = -(-n // multiple) * multiple
  if n_pad == n:
    return x
  widths = [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


def component_statistics(x: jax.Array, labels: jax.Array, n_components: int, *,
                         reg_covar: float | jax.Array = 0.0,
                         loglik_threshold: float | jax.Array = -jnp.inf) -> ComponentStats:
  """Counts, means and scatter about the mean of hard-assigned samples (Eq. 2-3's sums).

  Args:
    x: array of shape (N, d).
    labels: int array of shape (N,), the component of each sample; values outside [0, K) are
      ignored.
    n_components: K.
    reg_covar: stored as is (the fit's absolute covariance floor).
    loglik_threshold: stored as is (see `ComponentStats`).

  Returns:
    `ComponentStats` with K components.
  """
  x = jnp.asarray(x, jnp.float32)
  n, d = x.shape
  cs = _chunk_rows(n, d * d)
  xp = _pad_rows(x, cs)
  zp = _pad_rows(jnp.asarray(labels, jnp.int32), cs, value=-1)
  counts, means, packed = _moments(xp, zp, n_components=int(n_components), chunk_size=cs)
  return ComponentStats(counts=counts, means=means, scatter_triu=packed,
                        reg_covar=jnp.asarray(reg_covar, jnp.float32),
                        loglik_threshold=jnp.asarray(loglik_threshold, jnp.float32))


def scale_stats(stats: ComponentStats, forgetting: float | jax.Array) -> ComponentStats:
  """Statistics with every sample weighted by `forgetting` (counts and scatter scaled)."""
  return stats.replace(counts=forgetting * stats.counts,
                       scatter_triu=forgetting * stats.scatter_triu)


def merge_stats(old: ComponentStats, new: ComponentStats,
                forgetting: float | jax.Array = 1.0) -> ComponentStats:
  """Statistics of the union of two samples, the old one weighted by `forgetting` (see module doc).

  Args:
    old: statistics of the earlier samples (K components); its ``reg_covar`` and
      ``loglik_threshold`` are kept.
    new: statistics of the new samples, same K and d.
    forgetting: lambda in (0, 1], the weight of every old sample.

  Returns:
    the merged `ComponentStats`.
  """
  na = forgetting * old.counts
  nb = new.counts
  n = na + nb
  safe = jnp.where(n > 0, n, 1.0)
  means = jnp.where((n > 0)[:, None], (na[:, None] * old.means + nb[:, None] * new.means)
                    / safe[:, None], 0.0)
  delta = old.means - new.means
  cross = pack_scatter(delta[:, :, None] * delta[:, None, :]) * (na * nb / safe)[:, None]
  return old.replace(counts=n, means=means,
                     scatter_triu=forgetting * old.scatter_triu + new.scatter_triu + cross)


def mixture_from_stats(stats: ComponentStats, *, use_oas: bool = True,
                       min_cluster_size: float = 2.0) -> tuple[GaussianMixture, jax.Array]:
  """The M-step (Eq. 2-3) and OAS (Eq. 9) from statistics, as in the fit.

  pi_k = n_k / sum_j n_j over kept components, mu_k = m_k, Sigma_k = OAS(M_k / n_k, n_k)
  + reg_covar I (the plain sample covariance without OAS).

  Args:
    stats: `ComponentStats` (K components).
    use_oas: shrink with Eq. 9 (n = the merged count).
    min_cluster_size: components with a smaller count, or a covariance that is not numerically
      positive definite, are masked (weight 0, mean 0, identity factor).

  Returns:
    (mixture with K rows, bool array of shape (K,): the live components).
  """
  counts = stats.counts
  d = stats.dim
  safe = jnp.where(counts > 0, counts, 1.0)
  cov = stats.scatter / safe[:, None, None]
  if use_oas:
    cov = oas_covariance(cov, counts)
  eye = jnp.eye(d, dtype=cov.dtype)
  chol = jnp.linalg.cholesky(cov + stats.reg_covar * eye)
  live = (counts >= min_cluster_size) & jnp.all(jnp.isfinite(chol), axis=(-2, -1))
  kept = jnp.where(live, counts, 0.0)
  weights = kept / jnp.maximum(jnp.sum(kept), 1e-30)
  mixture = GaussianMixture(weights=weights, means=jnp.where(live[:, None], stats.means, 0.0),
                            cov_chol=jnp.where(live[:, None, None], chol, eye))
  return mixture, live


# ----------------------------------------------------------------------------------------------
# Assignment (Eq. 1) with per-sample log-likelihoods.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _assign(mixture, x, *, chunk_size):
  # Centre on the mixture's mean: the expanded quadratic form then loses little to float32.
  centre = jnp.einsum("k,kd->d", mixture.weights, mixture.means, precision=_HIGHEST)
  w, b = log_joint_params(mixture.replace(means=mixture.means - centre))
  n, d = x.shape

  def body(xb):
    lj = log_joint(xb - centre, w, b)
    return jnp.argmax(lj, axis=1).astype(jnp.int32), jax.nn.logsumexp(lj, axis=1)

  z, ll = jax.lax.map(body, x.reshape(n // chunk_size, chunk_size, d))
  return z.reshape(-1), ll.reshape(-1)


def assign(mixture: GaussianMixture, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 1 (argmax_k log pi_k + log N(u; k)) and log p(u) = log sum_k pi_k N(u; k) per sample.

  Args:
    mixture: K components (masked ones never win).
    x: array of shape (N, d).

  Returns:
    labels: int32 array of shape (N,); log_likelihood: array of shape (N,).
  """
  x = jnp.asarray(x, jnp.float32)
  n, d = x.shape
  width = (d * (d + 1)) // 2 + d + 1 + 2 * mixture.n_components
  cs = _chunk_rows(n, width)
  z, ll = _assign(mixture, _pad_rows(x, cs), chunk_size=cs)
  return z[:n], ll[:n]


def fit_statistics(mixture: GaussianMixture, x: Any, *, reg_covar: float,
                   quantile: float = DEFAULT_NEW_COMPONENT_QUANTILE) -> ComponentStats:
  """Statistics of a fitted mixture, from the final hard assignment of its training samples.

  Args:
    mixture: the fitted global mixture (K components).
    x: array of shape (N, d), the samples the mixture was fitted on.
    reg_covar: the absolute covariance floor the fit used (the relative ``KMLEConfig.reg_covar``
      times the mean variance of x, see `relative_floor`).
    quantile: q of the stored log-likelihood threshold (new components, `update_mixture`).

  Returns:
    `ComponentStats` (K components; a component that wins no sample in the final assignment
    has count 0 and is dropped at the first update).
  """
  x = jnp.asarray(x, jnp.float32)
  z, ll = assign(mixture, x)
  threshold = jnp.quantile(ll, quantile)
  return component_statistics(x, z, mixture.n_components, reg_covar=reg_covar,
                              loglik_threshold=threshold)


def relative_floor(x: Any, reg_covar: float = 1e-6) -> float:
  """The absolute floor ``reg_covar * v`` of the fit (v = mean variance of x: trace(cov) / d)."""
  x = np.asarray(x, np.float64)
  return float(reg_covar * np.mean(np.var(x, axis=0)))


# ----------------------------------------------------------------------------------------------
# The update.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """Hyper-parameters of `update_mixture`.

  Attributes:
    forgetting: lambda in (0, 1], the weight of every old sample (1: all samples weigh the same).
    n_iter: at most this many K-MLE iterations over the new samples (stop when no label changes).
    use_oas: OAS shrinkage (Eq. 9), as in the fit.
    min_cluster_size: components with a smaller merged count are dropped (the fit's value).
    new_components: create components where the new data is poorly explained (module doc).
    min_new_samples: fewest poorly explained samples that get new components (at least d + 1
      are needed too: a full covariance needs n >= d).
    new_cluster_size: poorly explained samples per created component (K of the small K-MLE).
    max_new_components: cap on the components created by one update.
    new_max_iter: iteration cap of the small K-MLE.
  """

  forgetting: float = 1.0
  n_iter: int = 5
  use_oas: bool = True
  min_cluster_size: int = 2
  new_components: bool = True
  min_new_samples: int = 20
  new_cluster_size: int = 50
  max_new_components: int = 32
  new_max_iter: int = 20

  def replace(self, **changes) -> "OnlineConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class UpdateInfo:
  """What `update_mixture` did.

  Attributes:
    n_samples: new samples used.
    n_iter: K-MLE iterations run.
    converged: True when an iteration changed no label.
    n_poorly_explained: new samples below the stored log-likelihood threshold (fitted mixture).
    n_added: components created (kept after the update).
    n_dropped: input components dropped.
    index: int array of shape (K_out,), the input component of each output component, -1 for a
      created one.
  """

  n_samples: int
  n_iter: int
  converged: bool
  n_poorly_explained: int
  n_added: int
  n_dropped: int
  index: np.ndarray


def _validate(mixture: GaussianMixture, stats: ComponentStats, x: Any,
              config: OnlineConfig) -> jax.Array:
  if not 0.0 < config.forgetting <= 1.0:
    raise ValueError(f"forgetting must be in (0, 1], got {config.forgetting!r}")
  if not isinstance(config.n_iter, (int, np.integer)) or config.n_iter < 1:
    raise ValueError(f"n_iter must be a positive integer, got {config.n_iter!r}")
  if config.min_cluster_size < 2:
    raise ValueError(f"min_cluster_size must be >= 2, got {config.min_cluster_size!r}")
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"new samples must be a non-empty (N, d) array, got shape {tuple(x.shape)}")
  if x.shape[1] != mixture.dim:
    raise ValueError(f"new samples have dimension {x.shape[1]}, the mixture {mixture.dim}")
  if stats.n_components != mixture.n_components or stats.dim != mixture.dim:
    raise ValueError(f"statistics ({stats.n_components} components, d={stats.dim}) do not match "
                     f"the mixture ({mixture.n_components}, d={mixture.dim})")
  x = jnp.asarray(x, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError("new samples contain NaN or infinite values")
  return x


def _new_components(x_out: jax.Array, stats: ComponentStats, config: OnlineConfig,
                    key: jax.Array) -> GaussianMixture | None:
  """Small K-MLE on the poorly explained samples (None when too few)."""
  from glad_jax.mixture import KMLEConfig, fit_kmle

  n, d = x_out.shape
  if n < max(config.min_new_samples, d + 1, 2 * config.min_cluster_size):
    return None
  k = int(np.clip(n // max(1, config.new_cluster_size), 1, config.max_new_components))
  k = max(1, min(k, n // max(d + 1, config.min_cluster_size)))
  cfg = KMLEConfig(n_components=k, max_iter=config.new_max_iter, use_oas=config.use_oas,
                   min_cluster_size=config.min_cluster_size, assignment="dense")
  try:
    sub, _ = fit_kmle(x_out, cfg, key)
  except ValueError:       # every small component dropped, or degenerate outliers: add none
    return None
  return sub


def update_mixture(mixture: GaussianMixture, stats: ComponentStats, x: Any,
                   config: OnlineConfig = OnlineConfig(), key: jax.Array | None = None
                   ) -> tuple[GaussianMixture, ComponentStats, UpdateInfo]:
  """Online K-MLE update of a fitted mixture with new samples (module doc: steps 1-3).

  Args:
    mixture: the fitted mixture (K components, no masked rows).
    stats: its `ComponentStats` (from `fit_statistics` or an earlier update).
    x: array of shape (N, d), the new samples.
    config: an `OnlineConfig`.
    key: `jax.random` key of the small K-MLE of new components (default key 0).

  Returns:
    (updated mixture with K_out live components, its merged statistics, `UpdateInfo`).

  Raises:
    ValueError: bad x (shape, dimension, NaN), statistics of another mixture, a bad config, or
      every component dropped.

  References:
    Saint-Jean & Nielsen (2015); Artola et al. (2023), Eq. 1-3, 9.
  """
  x = _validate(mixture, stats, x, config)
  key = jax.random.key(0) if key is None else key
  k0 = mixture.n_components
  lam = float(config.forgetting)
  prior = stats
  index = np.arange(k0)
  current = mixture
  n_out = 0
  if config.new_components:
    _, ll0 = assign(mixture, x)
    out = np.asarray(ll0 < stats.loglik_threshold)
    n_out = int(out.sum())
    sub = _new_components(x[np.nonzero(out)[0]], stats, config, key) if n_out else None
    if sub is not None:
      k_new = sub.n_components
      index = np.concatenate([index, np.full((k_new,), -1)])
      prior = stats.take(index)
      # Starting weights: the old components' (forgotten) mass, the new ones' share of the
      # poorly explained samples.
      mass = np.concatenate([lam * np.asarray(stats.counts), n_out * np.asarray(sub.weights)])
      current = GaussianMixture(
          weights=jnp.asarray(mass / mass.sum(), jnp.float32),
          means=jnp.concatenate([mixture.means, sub.means]),
          cov_chol=jnp.concatenate([mixture.cov_chol, sub.cov_chol]))
  k1 = current.n_components
  labels = None
  converged = False
  n_iter = 0
  merged = prior
  live = np.ones((k1,), bool)
  for _ in range(config.n_iter):
    z, _ = assign(current, x)
    n_iter += 1
    if labels is not None and bool(jnp.all(z == labels)):
      converged = True
      break
    labels = z
    new = component_statistics(x, z, k1)
    merged = merge_stats(prior, new, lam)
    current, live_j = mixture_from_stats(merged, use_oas=config.use_oas,
                                         min_cluster_size=config.min_cluster_size)
    live = np.asarray(live_j)
  if not live.any():
    raise ValueError("every component was dropped by the update (merged counts below "
                     f"min_cluster_size={config.min_cluster_size}): increase forgetting "
                     f"({config.forgetting}) or refit")
  keep = np.nonzero(live)[0]
  out_mixture = GaussianMixture(weights=current.weights[keep] / jnp.sum(current.weights[keep]),
                                means=current.means[keep], cov_chol=current.cov_chol[keep])
  out_stats = merged.take(keep)
  out_index = index[keep]
  info = UpdateInfo(n_samples=int(x.shape[0]), n_iter=n_iter, converged=converged,
                    n_poorly_explained=n_out, n_added=int(np.sum(out_index < 0)),
                    n_dropped=int(k0 - np.sum(out_index >= 0)), index=out_index)
  return out_mixture, out_stats, info
