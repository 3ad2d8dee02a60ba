"""GLAD as a registry method: ``fit(features, config, key) -> GLADState``, ``score(state, features)``.

Paper pipeline on backbone features (Fig. 1): per layer, a global mixture (K-MLE + OAS, Eq. 1-3 and 9,
or EM for the ablation) on a seeded subset of at most ``max_samples`` feature vectors, then local
weights pi_k(x) on every vector (Eq. 10-12), stored sparsely; scoring is the sparse log-likelihood
per layer, fused over layers, masked, and minus its q-quantile as the image score (Section 3.3).

`GLADState` holds every array of the fitted model: per layer a `glad_jax.scoring.LayerModel` (the
global mixture in the precision form scoring reads -- means, precision factors, log-dets,
log-weights -- and the sparse local weights), the alignment reference, the mask and the calibrated
thresholds; the configuration is a static field.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from glad_jax import align as align_lib
from glad_jax import local as local_lib
from glad_jax import online as online_lib
from glad_jax import scoring
from glad_jax.config import GLADConfig
from glad_jax.mixture.gaussian import GaussianMixture

Progress = Callable[[str, Mapping[str, Any]], None]

REASON_ALL = "all"
REASON_MAX_SAMPLES = "max_samples cap"
REASON_MAX_WORK = "max_sample_work cap"
REASON_BUDGET = "time budget"


@dataclasses.dataclass
class LayerFitInfo:
  """What the fit of one layer did (for reports, plots and `glad info`)."""

  n_samples: int  # feature vectors of the layer (all training images, all positions)
  n_samples_global: int  # of which used by the global fit
  dim: int
  grid_shape: tuple[int, int]
  n_components: int  # after pruning
  n_iter: int
  converged: bool
  log_likelihood: list[float]
  seconds_global: float
  seconds_local: float
  mean_nnz: float | None  # mean non-zero local weights per position
  global_reason: str = REASON_ALL  # why n_samples_global: "all" / "max_samples cap" / "max_sample_work cap" /
  #                                   "time budget"
  radius: float | None = None  # the local weights' disk radius (None: global-only)
  radius_choice: dict | None = None  # radius="auto": what chose it (`choose_radius`'s record)
  # seconds_local includes the radius choice.


@struct.dataclass
class GLADState:
  """A fitted GLAD model as a pytree.

  Attributes:
    layers: {layer: `scoring.LayerModel`}: the layer's global mixture (means (K, d), precision
      factors (K, d, d), log-dets (K,), log-weights (K,)) and sparse local weights (None in the
      global-only ablation).
    reference: uint8 array of shape (S, S, 3), the alignment reference; None without alignment.
    mask: bool array of shape (S, S), True where anomalies are looked for; None for no mask.
    image_threshold: float32 array of shape (), calibrated image threshold; NaN before calibration.
    pixel_threshold: float32 array of shape (), calibrated pixel threshold; NaN before calibration.
    config: the `GLADConfig` (static).
    update_stats: {layer: `glad_jax.online.LayerUpdateStats`}, what `update` needs (per-component
      counts, means and scatter of the global mixture, local sample totals), computed at fit time;
      None for a state without them (it cannot be updated).
    update_history: (`glad_jax.online.UpdateRecord`, ...), one entry per update (static).
    source_shape: (H, W, C) of the training images before resizing when they all had one shape,
      else None; updates refuse images of another shape (static).
  """

  layers: dict[str, scoring.LayerModel]
  reference: jax.Array | None
  mask: jax.Array | None
  image_threshold: jax.Array
  pixel_threshold: jax.Array
  config: GLADConfig = struct.field(pytree_node=False)
  update_stats: dict[str, Any] | None = None
  update_history: tuple = struct.field(pytree_node=False, default=())
  source_shape: tuple[int, int, int] | None = struct.field(pytree_node=False, default=None)

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  @property
  def aligns(self) -> bool:
    """True when images are aligned on `reference` before scoring."""
    return self.config.align != "none" and self.reference is not None

  def align(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 images (B, S, S, 3) -> (aligned on the reference, motions (B, 3, 3)); pure, jittable."""
    return align_lib.align_to_reference(self.reference, images, self.config.align)

  def unwarp(self, maps: jax.Array, motions: jax.Array) -> jax.Array:
    """Maps (B, S, S) in the reference frame -> the input images' frames."""
    return align_lib.unwarp_maps(maps, motions)

  def mixture(self, layer: str) -> GaussianMixture:
    """The layer's global mixture in covariance form (weights, means, Cholesky factors of Sigma_k),
    recovered from the stored precision factors: L_k = P_k^{-T} (float32 rounding)."""
    lm = self.layers[layer]
    d = lm.means.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=lm.prec_chol.dtype), lm.prec_chol.shape)
    # P_k is upper triangular with Sigma^-1 = P P^T, so L = P^{-T} is lower triangular.
    inv_p = jax.scipy.linalg.solve_triangular(lm.prec_chol, eye, lower=False)
    return GaussianMixture(weights=jnp.exp(lm.log_weights), means=lm.means,
                           cov_chol=jnp.swapaxes(inv_p, -1, -2))


def _nan() -> jax.Array:
  return jnp.full((), jnp.nan, jnp.float32)


def threshold_value(x: Any) -> float | None:
  """A state's threshold as a Python float, None when not calibrated (NaN)."""
  v = float(np.asarray(x))
  return None if np.isnan(v) else v


# ------------------------------------------------------------------------------------ validation


def check_config(c: GLADConfig) -> None:
  """Raises ValueError naming the first invalid field of a `GLADConfig`."""
  if not isinstance(c, GLADConfig):
    raise TypeError(f"config must be a GLADConfig, got {type(c).__name__}")
  if not c.layers:
    raise ValueError("config.layers is empty: name at least one backbone layer")
  if c.n_components < 1:
    raise ValueError(f"config.n_components must be >= 1, got {c.n_components}")
  if c.algorithm not in ("kmle", "em"):
    raise ValueError(f"config.algorithm must be 'kmle' or 'em', got {c.algorithm!r}")
  if not 0.0 <= c.quantile <= 1.0:
    raise ValueError(f"config.quantile must be in [0, 1], got {c.quantile}")
  if c.mask not in ("none", "object", "margin"):
    raise ValueError(f"config.mask must be 'none', 'object' or 'margin', got {c.mask!r}")
  if c.align not in ("none", "auto") + align_lib.MODELS:
    raise ValueError(f"config.align: unknown motion model {c.align!r}; expected 'none', 'auto' or one of "
                     f"{', '.join(align_lib.MODELS)}")
  if c.max_samples is not None and c.max_samples != "auto" and (
      isinstance(c.max_samples, bool) or not isinstance(c.max_samples, (int, np.integer)) or c.max_samples < 1):
    raise ValueError(f"config.max_samples must be 'auto', None or an int >= 1, got {c.max_samples!r}")
  if c.max_samples == "auto" and not c.fit_budget_s > 0:
    raise ValueError(f"config.fit_budget_s must be > 0 seconds, got {c.fit_budget_s!r}")
  if c.max_sample_work is not None and not c.max_sample_work >= 1:
    raise ValueError(f"config.max_sample_work must be >= 1 or None, got {c.max_sample_work!r}")
  if c.label_tol is not None and not 0.0 <= c.label_tol < 1.0:
    raise ValueError(f"config.label_tol must be in [0, 1) or None, got {c.label_tol!r}")
  if c.radius != "auto" and (isinstance(c.radius, (str, bool)) or not c.radius >= 0):
    raise ValueError(f"config.radius must be 'auto' or a number >= 0, got {c.radius!r}")
  if c.radius == "auto":
    cands = tuple(c.radius_candidates)
    if not cands or any(isinstance(r, (str, bool)) or not 0 <= r < float("inf") for r in cands):
      raise ValueError(f"config.radius_candidates must be numbers >= 0 (at least one), got {cands!r}")
    if not 0.0 < c.radius_holdout < 1.0:
      raise ValueError(f"config.radius_holdout must be in (0, 1), got {c.radius_holdout!r}")
  if c.backbone_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.backbone_dtype must be 'float32' or 'bfloat16', got {c.backbone_dtype!r}")


# ------------------------------------------------------------------------------------------- fit


def _as_layer_features(x: Any) -> Any:
  """Device arrays stay on the device (no host round trip in the fit); anything else becomes NumPy."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


def make_mask(config: GLADConfig, aligned_images: np.ndarray | None) -> np.ndarray | None:
  """The configured mask: None, the texture margin, or the object mask of the aligned training images."""
  if config.mask == "none":
    return None
  from glad_jax import masks

  if config.mask == "margin":
    return np.asarray(masks.margin_mask((config.image_size, config.image_size)))
  return np.asarray(masks.object_mask(np.asarray(aligned_images)))


def _global_samples(c: GLADConfig, shape: tuple[int, int, int, int], key: jax.Array, rows: Callable, mesh,
                    seconds_budget: float | None, *, distributed_plan: bool = False
                    ) -> tuple[np.ndarray | None, str, dict[str, float]]:
  """Which of a layer's n_images * h * w vectors the global fit uses: (sorted flat indices, or None for
  all; the reason; the plan's estimate {est_seconds, est_mb} for the progress line, or {}).

  max_samples="auto": when the layer has more vectors than the larger of `budget.PROBE_SIZES`, two short
  probe fits (the layer's own algorithm and pruning path, `budget.PROBE_ITERATIONS` timed iterations on
  stratified probes of both sizes) measure the iteration cost as fixed + per-vector seconds;
  `budget.plan_samples` turns `seconds_budget` into a vector count, drawn by `budget.stratified_subsample`
  (every image and grid position keeps its share).
  In a multi-process fit process 0's plan is used by all (the clocks differ). An int: a seeded subset of at
  most that many (and of at most ``max_sample_work / expanded_size(d)``), drawn the same stratified way.
  None: every vector.
  """
  from glad_jax.mixture import budget, em, kmle

  n_images, h, w, d = shape
  n_all = n_images * h * w
  if c.max_samples == "auto":
    small, large = budget.PROBE_SIZES
    if n_all <= large or seconds_budget is None:
      return None, REASON_ALL, {}
    k = min(c.n_components, n_all)

    def probe_fit_of(n):
      probe_x = rows(budget.stratified_subsample(jax.random.fold_in(key, n), n_images, h, w, n))
      settings = dict(n_components=min(k, n), use_oas=c.use_oas,  # the full fit's K: the cost grows with it
                      max_iter=budget.PROBE_ITERATIONS + 1, tol=0.0)

      def probe_fit(callback):
        if c.algorithm == "kmle":
          kmle.fit_kmle(probe_x, kmle.KMLEConfig(**settings), key, mesh=mesh, callback=callback)
        else:
          em.fit_em(probe_x, em.EMConfig(**settings), key, mesh=mesh, callback=callback)
      return probe_fit

    cost = budget.measure_iteration_cost(probe_fit_of, (small, large))
    plan = budget.plan_samples(n_all, d, k, seconds_budget, cost)
    n_used = plan.n_used
    if distributed_plan:
      from jax.experimental import multihost_utils

      n_used = int(multihost_utils.broadcast_one_to_all(np.int64(n_used)))
    estimate = {"est_seconds": float(plan.est_seconds), "est_mb": plan.est_bytes / 2**20}
    if n_used >= n_all:
      return None, REASON_ALL, estimate
    return budget.stratified_subsample(key, n_images, h, w, n_used), REASON_BUDGET, estimate
  if c.max_samples is not None:
    cap, reason = int(c.max_samples), REASON_MAX_SAMPLES
    if c.max_sample_work is not None:
      from glad_jax.mixture.gaussian import expanded_size

      work_cap = max(1, int(c.max_sample_work // expanded_size(d)))
      if work_cap < cap:
        cap, reason = work_cap, REASON_MAX_WORK
    if n_all > cap:
      return budget.stratified_subsample(key, n_images, h, w, cap), reason, {}
  return None, REASON_ALL, {}


# Positions on which the candidate radii are compared, per layer: two bands of whole grid rows (two rows of a
# 64-wide layer, four of a 32-wide one; a 16 x 16 layer, whose bands' windows would overlap, is one band of all
# its rows). Chosen for time: on magnetic_tile (617 fit images) the comparison takes 15 / 15 / 28 s on layers
# 1 / 2 / 3, 58 s of its 288 s default fit (README "Speed").
RADIUS_CHOICE_POSITIONS = 128


def _grid_rows(rows: Callable, images: np.ndarray, first_row: int, n_rows: int, shape: tuple[int, int, int, int],
               distributed_rows: bool) -> np.ndarray:
  """Features (len(images), n_rows, w, d) of grid rows [first_row, first_row + n_rows) of some images,
  through the layer's `rows(index)` accessor of the flattened (n_images h w, d) vectors."""
  _, h, w, d = shape
  index = (images[:, None, None] * (h * w) + (first_row + np.arange(n_rows))[None, :, None] * w
           + np.arange(w)[None, None, :]).reshape(-1)
  x = rows(index)
  if distributed_rows:
    from glad_jax import distributed

    x = distributed.host_array(x)
  return np.asarray(x).reshape(len(images), n_rows, w, d)


def choose_radius(c: GLADConfig, mixture: GaussianMixture, rows: Callable, shape: tuple[int, int, int, int],
                  key: jax.Array, *, distributed_rows: bool = False) -> tuple[float, dict[str, Any]]:
  """The local radius of one layer for ``radius="auto"``, from the training images alone.

  A seeded share ``c.radius_holdout`` of the training images is held out (in several disjoint folds when
  that share is under `RADIUS_CHOICE_MIN_HELD_OUT` images); the local weights of the positions of
  `glad_jax.local.radius_bands` are fitted (Eq. 10-12, the fixed global mixture) at each of
  ``c.radius_candidates`` on the other images (at most `glad_jax.local.max_band_images` of them, the local
  fit's memory bound: about 1,200 for a 64-wide layer at K = 1000; an evenly spaced subset beyond), and each
  held-out image gets its mean log-likelihood over those positions (Section 3.3's per-position likelihood:
  what scoring reads). A larger disk pools more samples per position (weights that tolerate parts which do
  not sit at the same place from image to image) and blurs position-specific structure: the held-out images
  say which matters more for this layer. `next_radius_wins` decides, from the smallest radius up, whether
  the next candidate is better; the first one that is not ends the search.

  Args:
    c: the configuration (radius_candidates, radius_holdout, local_max_iter, tol).
    mixture: the layer's fitted global mixture.
    rows: index -> feature vectors (n, d) of the flattened (n_images h w, d) layer, in one-process order.
    shape: (n_images, h, w, d).
    key: seeds the held-out draw.
    distributed_rows: `rows` returns multi-process global arrays (gathered to the host here).

  Returns:
    (radius, choice): choice = {"radius", "radii", "held_out_log_likelihood" (per candidate, the mean over
    held-out images and positions), "n_held_out" (over all folds), "n_folds", "n_fit" (images each fold's
    weights were fitted on), "positions"}; with fewer than
    two training images or one candidate the smallest candidate, with an empty comparison.
  """
  n_images, h, w, _ = shape
  radii = sorted(float(r) for r in set(c.radius_candidates))
  n_held = max(1, int(round(c.radius_holdout * n_images)))
  choice: dict[str, Any] = {"radii": radii, "held_out_log_likelihood": [], "n_held_out": 0, "n_folds": 0,
                            "n_fit": 0, "positions": 0}
  if len(radii) == 1 or n_images - n_held < 1:
    return radii[0], {**choice, "radius": radii[0]}
  order = np.asarray(jax.random.permutation(key, n_images))
  bands = local_lib.radius_bands((h, w), radii[-1], RADIUS_CHOICE_POSITIONS)
  # Disjoint held-out folds until about RADIUS_CHOICE_MIN_HELD_OUT images are held out in all (one fold
  # for a category of 200+ images; a small category, whose fits are cheap, gets several).
  n_folds = max(1, min(-(-RADIUS_CHOICE_MIN_HELD_OUT // n_held), n_images // n_held))
  cap = local_lib.max_band_images(bands, w, mixture.n_components)
  folds = []  # (held-out images, fit images) per fold
  for fold in range(n_folds):
    held = np.sort(order[fold * n_held:(fold + 1) * n_held])
    fit_images = np.sort(np.setdiff1d(order, held))
    if len(fit_images) > cap:  # thousands of images: an evenly spaced subset keeps the memory bounded
      fit_images = fit_images[np.linspace(0, len(fit_images) - 1, cap).round().astype(int)]
    folds.append((held, fit_images))
  # The band windows of every image a fold reads, gathered once (a held-out image's band rows lie inside
  # its windows).
  used = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
  windows = [_grid_rows(rows, used, b.window_start, b.window, shape, distributed_rows) for b in bands]
  per_image = []
  for held, fit_images in folds:
    fit_at, held_at = np.searchsorted(used, fit_images), np.searchsorted(used, held)
    held_rows = [x[held_at, b.start - b.window_start:b.start - b.window_start + b.rows]
                 for x, b in zip(windows, bands)]
    per_image.append(local_lib.held_out_log_likelihood([x[fit_at] for x in windows], held_rows, bands, mixture,
                                                       radii, (h, w), max_iter=c.local_max_iter, tol=c.tol))
  per_image = np.concatenate(per_image, axis=1)  # (n_radii, n_folds * n_held)
  best = 0
  while best + 1 < len(radii) and next_radius_wins(per_image[best], per_image[best + 1]):
    best += 1
  return radii[best], {**choice, "radius": radii[best],
                       "held_out_log_likelihood": [float(v) for v in per_image.mean(axis=1)],
                       "n_held_out": int(per_image.shape[1]), "n_folds": int(n_folds),
                       "n_fit": int(min(n_images - n_held, cap)),
                       "positions": int(sum(b.rows for b in bands) * w)}


# How many standard errors the held-out images' mean gain must exceed for a larger radius to be taken, and
# how many held-out images (over folds) the test should see at least: a two-sided 95% level, and the
# fewest images for which a standard error of their mean is itself steady (not tuned on any result).
RADIUS_CHOICE_Z = 2.0
RADIUS_CHOICE_MIN_HELD_OUT = 20


def next_radius_wins(smaller: np.ndarray, larger: np.ndarray, z: float = RADIUS_CHOICE_Z) -> bool:
  """True when the held-out images' log-likelihoods (one per image, paired) under the larger radius beat the
  smaller's by more than `z` standard errors of their mean difference: a paired test, so that a difference
  within the held-out draw's noise keeps the smaller disk (the paper's r = 1 first, and the cheaper fit).
  One held-out image has no error estimate: the smaller radius stays."""
  gain = np.asarray(larger, np.float64) - np.asarray(smaller, np.float64)
  if gain.size < 2:
    return False
  return bool(gain.mean() > z * gain.std(ddof=1) / np.sqrt(gain.size))


def _fit_layer(feats: Any, c: GLADConfig, key: jax.Array, name: str, mesh, progress: Progress | None,
               image_mask: jax.Array | None = None, seconds_budget: float | None = None
               ) -> tuple[scoring.LayerModel, LayerFitInfo, Any]:
  from glad_jax.mixture import em, kmle

  n_images, h, w, d = feats.shape
  sub_key, fit_key = jax.random.split(key)
  if image_mask is None:
    flat = feats.reshape(-1, d)
    rows = lambda idx: flat if idx is None else flat[idx]  # noqa: E731
  else:
    # A multi-process global array with padding images: the vectors of the real images, and
    # the subset drawn from their count, in the one-process order (so the same vectors and the
    # same seeded initialisation as a one-process fit of all images).
    from glad_jax import distributed

    n_images = int(np.sum(distributed.host_array(image_mask)))
    rows = lambda idx: distributed.sample_rows(feats, image_mask, mesh, idx)  # noqa: E731
  n_all = n_images * h * w
  idx, reason, estimate = _global_samples(c, (n_images, h, w, d), sub_key, rows, mesh, seconds_budget,
                                          distributed_plan=image_mask is not None)
  x = rows(idx)
  k = min(c.n_components, x.shape[0])
  if progress is not None:
    progress("plan", {"layer": name, "n_vectors": int(n_all), "n_used": int(x.shape[0]), "reason": reason,
                      **estimate})

  def cb(iteration, mean_loglik, n_live):
    if progress is not None:
      progress("global", {"layer": name, "iteration": iteration, "max_iter": c.max_iter,
                          "log_likelihood": float(mean_loglik), "components": int(n_live)})

  settings = dict(n_components=k, max_iter=c.max_iter, tol=c.tol, use_oas=c.use_oas)
  t0 = time.perf_counter()
  if c.algorithm == "kmle":
    mixture, info = kmle.fit_kmle(x, kmle.KMLEConfig(**settings, label_tol=c.label_tol), fit_key, mesh=mesh,
                                  callback=cb)
  else:
    mixture, info = em.fit_em(x, em.EMConfig(**settings), fit_key, mesh=mesh, callback=cb)
  t1 = time.perf_counter()
  if progress is not None:
    progress("global_done", {"layer": name, "n_components": int(mixture.n_components),
                             "n_iter": int(info.n_iter), "converged": bool(info.converged),
                             "seconds": t1 - t0})
  local = None
  mean_nnz = None
  radius, choice = (None, None) if not c.local else (c.radius, None)
  if c.local and c.radius == "auto":
    radius, choice = choose_radius(c, mixture, rows, (n_images, h, w, d), jax.random.fold_in(key, 2),
                                   distributed_rows=image_mask is not None)
    if progress is not None:
      progress("radius", {"layer": name, **choice})
  if c.local:
    def local_cb(p):
      if progress is not None:
        progress("local", {"layer": name, "done": p.chunk + 1, "total": p.n_chunks})

    # mesh only when given: the local fit's sharded path is optional.
    extra = {} if mesh is None else {"mesh": mesh}
    if image_mask is not None:
      extra["image_mask"] = image_mask
    local = local_lib.fit_local_weights(feats, mixture, radius=radius, max_iter=c.local_max_iter, tol=c.tol,
                                        callback=local_cb, **extra)
    mean_nnz = float(local_lib.sparsity_stats(local).mean_nnz)
  t2 = time.perf_counter()
  fit_info = LayerFitInfo(
      n_samples=int(n_all), n_samples_global=int(x.shape[0]), dim=int(d), grid_shape=(int(h), int(w)),
      n_components=int(mixture.n_components), n_iter=int(info.n_iter), converged=bool(info.converged),
      log_likelihood=[float(v) for v in info.loglik], seconds_global=t1 - t0, seconds_local=t2 - t1,
      mean_nnz=mean_nnz, global_reason=reason, radius=radius, radius_choice=choice)
  # What an online update needs (glad_jax.online): K-MLE's own statistics of its last assignment
  # (EM: one more hard assignment pass over the vectors the global fit used).
  if image_mask is not None:
    # The statistics are host arithmetic over all the fit's vectors (as in a one-process fit,
    # which holds them on its one host too): every process gets the whole set.
    from glad_jax import distributed

    x = distributed.host_array(x)
  update_stats = online_lib.layer_update_stats(mixture, x, n_all=int(n_all), n_images=int(n_images),
                                               grid_shape=(int(h), int(w)), radius=radius or 0.0,
                                               local=c.local, fit_stats=info.final_stats)
  return scoring.make_layer_model(mixture, (h, w), local, radius=radius), fit_info, update_stats


def fit_with_info(features: Mapping[str, Any], config: GLADConfig, key: jax.Array, *,
                  image_size: int | None = None, images: np.ndarray | None = None,
                  reference: np.ndarray | None = None, mesh=None, progress: Progress | None = None,
                  image_mask: Any = None) -> tuple[GLADState, dict[str, LayerFitInfo]]:
  """`fit`, also returning what each layer's fit did ({layer: `LayerFitInfo`})."""
  c = config
  check_config(c)
  if image_size is not None and int(image_size) != c.image_size:
    raise ValueError(f"image_size={image_size} but config.image_size={c.image_size}: GLAD's maps have "
                     "its configuration's size")
  missing = [name for name in c.layers if name not in features]
  if missing:
    raise ValueError(f"features are missing layer(s) {missing}; got {sorted(features)}")
  if c.mask == "object" and images is None:
    raise ValueError("mask='object' needs the aligned training images (images=... / aligned_images=...)")
  if c.align == "auto":
    # 'auto' is chosen on images (`glad_jax.align_choice`, by GLAD.fit and the protocols) before the
    # features are extracted; features given as they are were not aligned.
    if reference is not None:
      raise ValueError("config.align='auto' with a reference: name the motion model the features were "
                       "aligned with (GLAD.fit chooses it from the training images)")
    c = c.replace(align="none")
  if c.align != "none" and reference is None:
    raise ValueError(f"config.align={c.align!r} needs the alignment reference (reference=..., the first "
                     "training image)")
  if image_mask is not None and mesh is None:
    raise ValueError("image_mask (the padding images of a multi-process global array) needs the mesh of "
                     "the features (glad_jax.distributed.global_mesh())")
  layers, infos, update_stats = {}, {}, {}
  budget_left = float(c.fit_budget_s) if c.max_samples == "auto" else None
  for i, name in enumerate(c.layers):
    # The time budget of the global fits is shared: each layer gets an equal part of what is left, so a
    # layer that converges early leaves its time to the next ones.
    share = None if budget_left is None else max(budget_left, 0.0) / (len(c.layers) - i)
    layers[name], infos[name], update_stats[name] = _fit_layer(
        _as_layer_features(features[name]), c, jax.random.fold_in(key, i), name, mesh, progress,
        image_mask, seconds_budget=None if share is None else max(share, 1e-3))
    if budget_left is not None:
      budget_left -= infos[name].seconds_global
  mask = make_mask(c, images)
  ref = None if c.align == "none" else jnp.asarray(np.asarray(reference, np.uint8))
  state = GLADState(layers=layers, reference=ref, mask=None if mask is None else jnp.asarray(mask),
                    image_threshold=_nan(), pixel_threshold=_nan(), config=c, update_stats=update_stats)
  return state, infos


def fit(features: Mapping[str, Any], config: GLADConfig, key: jax.Array, *, image_size: int | None = None,
        images: np.ndarray | None = None, reference: np.ndarray | None = None, mesh=None,
        progress: Progress | None = None, image_mask: Any = None) -> GLADState:
  """Fits GLAD on backbone features of good images.

  Args:
    features: {layer: float32 array (N, h, w, d)} for every layer of ``config.layers`` (NumPy, or
      device arrays, which stay on the device).
    config: a `GLADConfig`.
    key: `jax.random` key; layer i uses ``fold_in(key, i)`` (subsample, then initialisation).
    image_size: side of the maps; must equal ``config.image_size`` when given.
    images: the prepared (aligned) training images (N, S, S, 3) uint8: needed for mask='object'.
    reference: the alignment reference (S, S, 3) uint8: needed when config.align != 'none'.
    mesh: optional 1-D mesh on which the global (and local) fits shard their samples.
    progress: optional callback(stage, info): 'plan', 'global', 'global_done', 'local'.
    image_mask: with features that are multi-process global arrays (`glad_jax.distributed.to_global`,
      over `mesh`): their (N,) validity mask, False on padding images. The fit then uses the real
      images only, in global order, and gives the one-process model of those images.

  Returns:
    A `GLADState` with uncalibrated (NaN) thresholds, on this process's devices.
  """
  return fit_with_info(features, config, key, image_size=image_size, images=images, reference=reference,
                       mesh=mesh, progress=progress, image_mask=image_mask)[0]


# ----------------------------------------------------------------------------------------- score


def score(state: GLADState, features: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Anomaly maps (B, S, S) and image scores (B,) of features {layer: (B, h, w, d)} (Section 3.3).

  Pure and unchecked (jittable, differentiable w.r.t. the features); extra layers are ignored. For
  validated scoring of user input see `scoring.score` (used by `GLAD.score_features`).
  """
  c = state.config
  feats = {name: features[name] for name in state.layers}
  out = scoring.score_unchecked(state.layers, feats, state.mask, float(c.quantile),
                                (c.image_size, c.image_size))
  return out.anomaly_map, out.image_score


def calibrated(state: GLADState, image_scores: np.ndarray, anomaly_maps: np.ndarray,
               fpr: float) -> GLADState:
  """The state with thresholds at false-positive rate `fpr` on held-out good images' scores and maps.

  image threshold = the (1 - fpr)-quantile of their image scores; pixel threshold = the (1 - fpr)-quantile
  of their anomaly-map values inside the mask.
  """
  if not 0.0 < fpr < 1.0:
    raise ValueError(f"fpr must be in (0, 1), got {fpr}")
  maps = np.asarray(anomaly_maps)
  values = maps if state.mask is None else maps[:, np.asarray(state.mask)]
  return state.replace(image_threshold=jnp.float32(np.quantile(np.asarray(image_scores), 1.0 - fpr)),
                       pixel_threshold=jnp.float32(np.quantile(values, 1.0 - fpr)))


# ---------------------------------------------------------------------------------------- update


def update_with_info(state: GLADState, features: Mapping[str, Any],
                     config: online_lib.UpdateConfig = online_lib.UpdateConfig(),
                     key: jax.Array | None = None
                     ) -> tuple[GLADState, dict[str, online_lib.LayerUpdateInfo]]:
  """`update`, also returning what each layer's update did ({layer: `LayerUpdateInfo`})."""
  if not isinstance(state, GLADState):
    raise TypeError(f"state must be a GLADState, got {type(state).__name__}")
  return online_lib.update_state(state, features, config, key)


def update(state: GLADState, features: Mapping[str, Any],
           config: online_lib.UpdateConfig = online_lib.UpdateConfig(), key: jax.Array | None = None
           ) -> GLADState:
  """Online update of a fitted state with new good images' features (paper Section 5; `glad_jax.online`).

  Per layer: the global mixture by online K-MLE warm-started from the fit (old statistics as a fixed prior
  mass, forgetting factor ``config.forgetting``, new components where the new data is poorly explained,
  components below the minimum size dropped), then the local weights by adding the new images' local counts.
  Thresholds are kept (recalibrate with `calibrated`); one `UpdateRecord` is appended to
  ``update_history``.

  Args:
    state: a `GLADState` with ``update_stats`` (every state fitted by this version has them).
    features: {layer: float32 array (M', h, w, d)} of the new images, aligned like the training images.
    config: a `glad_jax.online.UpdateConfig`.
    key: `jax.random` key (default: from ``config.seed``).

  Returns:
    The updated `GLADState`.
  """
  return update_with_info(state, features, config, key)[0]


# ------------------------------------------------------------------------------------ registration


def ablations(config: GLADConfig) -> tuple[tuple[str, GLADConfig], ...]:
  """The GLAD variants of the paper's Table 1 on `config`'s backbone features.

  'glad-global' (no local weights), 'glad-em' (EM instead of K-MLE), 'glad-no-oas' (sample
  covariances), and one 'glad-<layers>' per subset of all but one of `config.layers` (Table 1's
  layer pairs). Variants identical to `config` are left out.
  """
  variants = [("glad-global", config.replace(local=False)),
              ("glad-em", config.replace(algorithm="em")),
              ("glad-no-oas", config.replace(use_oas=False))]
  if len(config.layers) > 1:
    for subset in itertools.combinations(config.layers, len(config.layers) - 1):
      variants.append(("glad-" + "+".join(subset), config.replace(layers=tuple(subset))))
  return tuple((name, cfg) for name, cfg in variants if cfg != config)


def _register() -> None:
  from glad_jax import methods

  methods.register_method(methods.Method(name="glad", config_cls=GLADConfig, fit=fit, score=score,
                                         config_for=lambda base: base, variants=ablations))


_register()
