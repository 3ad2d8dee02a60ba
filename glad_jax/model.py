"""`GLAD(config)`: fit / calibrate / score / save / load — a thin layer over the pure functions.

    model = GLAD(GLADConfig()).fit(train_images)         # uint8 (N, H, W, 3), any H, W
    pred = model.score(test_images)                     # pred.image_scores (N,), pred.anomaly_maps (N, S, S)
    model.save("checkpoints/tire"); model = GLAD.load("checkpoints/tire")

Pipeline (paper Fig. 1): resize to S x S -> align on the reference (objects) -> backbone features per layer ->
global mixture per layer (K-MLE + OAS, Eq. 1-3, 9) -> local weights (Eq. 10-12) -> sparse log-likelihood maps,
fused over layers, masked, q-quantile image score (Section 3.3).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import checkpoint as ckpt
from glad_jax import local as local_lib
from glad_jax import scoring
from glad_jax.config import GLADConfig
from glad_jax.mixture.gaussian import GaussianMixture

Progress = Callable[[str, Mapping[str, Any]], None]
"""progress(stage, info): stage in {'features', 'global', 'local', 'score'}; info holds counters for a bar."""


class Prediction(NamedTuple):
  """Output of `GLAD.score`.

  Attributes:
    image_scores: array of shape (N,), higher = more anomalous (minus the q-quantile of the log-likelihood map).
    anomaly_maps: array of shape (N, S, S), minus the fused log-likelihood (masked, see glad_jax.scoring).
    image_labels: bool array of shape (N,), score > calibrated image threshold; None when not calibrated.
    pixel_masks: bool array of shape (N, S, S), map > calibrated pixel threshold; None when not calibrated.
  """

  image_scores: np.ndarray
  anomaly_maps: np.ndarray
  image_labels: np.ndarray | None
  pixel_masks: np.ndarray | None


@dataclasses.dataclass
class LayerFitInfo:
  """What the fit of one layer did (for reports and plots)."""

  n_samples: int  # feature vectors of the layer (all training images, all positions)
  n_samples_global: int  # of which used by the global fit (max_samples)
  dim: int
  grid_shape: tuple[int, int]
  n_components: int  # after pruning
  n_iter: int
  converged: bool
  log_likelihood: list[float]
  seconds_global: float
  seconds_local: float
  mean_nnz: float | None  # mean non-zero local weights per position


@dataclasses.dataclass
class FittedLayer:
  mixture: GaussianMixture
  local: local_lib.SparseLocalWeights | None


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1:3] == (size, size):
    return images
  from PIL import Image

  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def prepare_images(images: Any, size: int) -> np.ndarray:
  """Validated uint8 RGB batch (N, size, size, 3) from arrays of any size/channels (see backbones.as_rgb_batch)."""
  from glad_jax.backbones.extractor import as_rgb_batch

  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError("no images given (empty list)")
    batch = [as_rgb_batch(np.asarray(im)[None])[0] for im in images]
    batch = [_to_uint8(b) for b in batch]
    return np.stack([_resize_batch(b[None], size)[0] for b in batch])
  batch = _to_uint8(as_rgb_batch(images))
  if batch.shape[0] == 0:
    raise ValueError("no images given (batch of size 0)")
  return _resize_batch(batch, size)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  if x.dtype == np.uint8:
    return x
  if x.dtype == np.uint16:
    return (x // 257).astype(np.uint8)
  return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


class GLAD:
  """A GLAD anomaly detector: configuration, backbone and (after `fit`) the fitted per-layer models."""

  def __init__(self, config: GLADConfig = GLADConfig(), *, extractor=None):
    if not isinstance(config, GLADConfig):
      raise TypeError(f"config must be a GLADConfig, got {type(config).__name__}")
    _check_config(config)
    self.config = config
    self._extractor = extractor
    self.layers: dict[str, FittedLayer] = {}
    self.reference: np.ndarray | None = None  # alignment reference (S, S, 3) uint8
    self.mask: np.ndarray | None = None  # (S, S) bool, True where anomalies are looked for
    self.image_threshold: float | None = None
    self.pixel_threshold: float | None = None
    self.fit_info: dict[str, LayerFitInfo] = {}
    self._layer_models: dict[str, scoring.LayerModel] | None = None
    self._score_fn = None

  # ------------------------------------------------------------------------------------------ parts

  @property
  def extractor(self):
    if self._extractor is None:
      from glad_jax.backbones import create_feature_extractor

      c = self.config
      self._extractor = create_feature_extractor(c.backbone, c.layers, c.weights, c.image_size,
                                                 dtype=jnp.dtype(c.backbone_dtype), seed=c.seed)
    return self._extractor

  @property
  def is_fitted(self) -> bool:
    return bool(self.layers)

  def _require_fitted(self) -> None:
    if not self.is_fitted:
      raise ValueError("this GLAD model is not fitted: call fit(images) or GLAD.load(path) first")

  def _align(self, images: np.ndarray) -> np.ndarray:
    """Images aligned on the reference (unchanged when alignment is off)."""
    if self.config.align == "none":
      return images
    from glad_jax import align

    return np.asarray(align.align(images, self.config.align, reference=self.reference).images)

  def aligner(self):
    """The `glad_jax.align.Aligner` on this model's reference, or None when alignment is off."""
    if self.config.align == "none":
      return None
    if self.reference is None:
      raise ValueError("this model aligns images (align="
                       f"{self.config.align!r}) but has no reference image: fit it first")
    from glad_jax import align

    return align.Aligner(self.reference, self.config.align)

  def features(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None,
               prepared: bool = False) -> dict[str, np.ndarray]:
    """Backbone features {layer: (N, h, w, d)} of images, after resizing and alignment."""
    x = images if prepared else self._align(prepare_images(images, self.config.image_size))
    _check_memory(self.extractor, x.shape[0])
    cb = None if progress is None else (lambda done, total: progress("features", {"done": done, "total": total}))
    return self.extractor(x, batch_size=batch_size, callback=cb)

  # -------------------------------------------------------------------------------------------- fit

  def fit(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None, mesh=None) -> "GLAD":
    """Fits the global mixtures and local weight maps on good images.

    Args:
      images: uint8 array (N, H, W, 3) / (N, H, W) or a list of arrays (any sizes: resized to image_size).
      batch_size: backbone batch size.
      progress: optional callback(stage, info) for progress bars.
      mesh: optional 1-D `jax.sharding.Mesh` on which the global fit's samples are sharded.

    Returns:
      self.
    """
    c = self.config
    x = prepare_images(images, c.image_size)
    if x.shape[0] < 2:
      raise ValueError(f"GLAD needs at least 2 training images, got {x.shape[0]}")
    if c.align != "none":
      self.reference = x[0].copy()  # the first training image is the reference (paper 4.1)
      x = self._align(x)
    feats = self._device_features(x, batch_size, progress)
    return self.fit_features(feats, aligned_images=x, progress=progress, mesh=mesh)

  def _device_features(self, x: np.ndarray, batch_size: int, progress: Progress | None) -> dict[str, jax.Array]:
    """Features {layer: (N, h, w, d)} of prepared images, left on the device for the fit.

    Unlike `features` (NumPy out), the chunks of the jitted backbone stay where they were computed and are
    concatenated there, one layer at a time: on an accelerator the global and local fits then read them with no
    round trip through host memory.
    """
    _check_memory(self.extractor, x.shape[0])
    ext = self.extractor
    n = x.shape[0]
    chunks: dict[str, list[jax.Array]] = {name: [] for name in ext.layers}
    for start in range(0, n, batch_size):
      chunk = x[start:start + batch_size]
      m = chunk.shape[0]
      if m < batch_size and n > batch_size:  # pad the last chunk: one compilation per batch size
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
      out = ext.apply(ext.params, jnp.asarray(chunk))
      for name in ext.layers:
        chunks[name].append(out[name][:m])
      if progress is not None:
        progress("features", {"done": min(start + batch_size, n), "total": n})
    # Concatenate layer by layer, dropping each layer's chunks at once: peak = features + one layer.
    return {name: jnp.concatenate(chunks.pop(name)) for name in list(chunks)}

  def fit_features(self, features: Mapping[str, np.ndarray], *, aligned_images: np.ndarray | None = None,
                   progress: Progress | None = None, mesh=None) -> "GLAD":
    """Fits on precomputed backbone features {layer: (N, h, w, d)} (e.g. shared with baselines).

    Args:
      features: one array per configured layer, from `features(...)` of the same configuration.
      aligned_images: the resized, aligned training images (N, S, S, 3); needed only for mask='object'.
      progress, mesh: as in `fit`.
    """
    c = self.config
    missing = [name for name in c.layers if name not in features]
    if missing:
      raise ValueError(f"features are missing layer(s) {missing}; got {sorted(features)}")
    if c.mask == "object" and aligned_images is None:
      raise ValueError("mask='object' needs the aligned training images (aligned_images=...)")
    key = jax.random.key(c.seed)
    self.layers, self.fit_info = {}, {}
    for i, name in enumerate(c.layers):
      self.layers[name], self.fit_info[name] = _fit_layer(
          _as_layer_features(features[name]), c, jax.random.fold_in(key, i), name, mesh, progress)
    self.mask = _make_mask(c, aligned_images)
    self.image_threshold = self.pixel_threshold = None
    self._invalidate()
    return self

  # -------------------------------------------------------------------------------------- calibrate

  def calibrate(self, good_images: Any, *, fpr: float = 0.01, batch_size: int = 16) -> "GLAD":
    """Sets the image and pixel thresholds from held-out good images at a target false-positive rate.

    image threshold = the (1 - fpr)-quantile of their image scores; pixel threshold = the (1 - fpr)-quantile of
    their anomaly-map values inside the mask. Never use test images for this.
    """
    if not 0.0 < fpr < 1.0:
      raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    pred = self.score(good_images, batch_size=batch_size)
    self.image_threshold = float(np.quantile(pred.image_scores, 1.0 - fpr))
    values = pred.anomaly_maps if self.mask is None else pred.anomaly_maps[:, self.mask]
    self.pixel_threshold = float(np.quantile(values, 1.0 - fpr))
    return self

  # ------------------------------------------------------------------------------------------ score

  def layer_models(self) -> dict[str, scoring.LayerModel]:
    self._require_fitted()
    if self._layer_models is None:
      g = self.fit_info_grid()
      self._layer_models = {
          name: scoring.make_layer_model(layer.mixture, g[name], layer.local if self.config.local else None)
          for name, layer in self.layers.items()}
    return self._layer_models

  def fit_info_grid(self) -> dict[str, tuple[int, int]]:
    shapes = self.extractor.feature_shapes()
    return {name: tuple(shapes[name][:2]) for name in self.layers}

  def score_fn(self):
    """One jit-compiled function: uint8 images (B, S, S, 3) -> (image scores, anomaly maps).

    Alignment on the reference (when configured), backbone, sparse local-mixture log-likelihoods,
    layer fusion, mask, quantile, and the maps warped back onto the input images: no host step.
    The image score is taken in the reference frame, as in the paper.
    """
    if self._score_fn is None:
      models = self.layer_models()
      extractor = self.extractor
      aligner = self.aligner()
      size = (self.config.image_size, self.config.image_size)
      mask = None if self.mask is None else jnp.asarray(self.mask)
      quantile = float(self.config.quantile)

      @jax.jit
      def fn(params, layer_models, images):
        if aligner is not None:
          images, motions = aligner(images)
        feats = extractor.apply(params, images)
        out = scoring.score_unchecked(layer_models, feats, mask, quantile, size)
        maps = out.anomaly_map if aligner is None else aligner.unwarp(out.anomaly_map, motions)
        return out.image_score, maps

      self._score_fn = lambda images: fn(extractor.params, models, images)
    return self._score_fn

  def score(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None) -> Prediction:
    """Image scores and anomaly maps; labels when thresholds are calibrated."""
    self._require_fitted()
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = prepare_images(images, self.config.image_size)
    fn = self.score_fn()
    scores, maps = [], []
    n = x.shape[0]
    for start in range(0, n, batch_size):
      chunk = x[start:start + batch_size]
      m = chunk.shape[0]
      if m < batch_size and n > batch_size:  # pad the last chunk: one compilation per batch size
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
      s, a = fn(jnp.asarray(chunk))
      scores.append(np.asarray(s)[:m])
      maps.append(np.asarray(a)[:m])
      if progress is not None:
        progress("score", {"done": min(start + batch_size, n), "total": n})
    image_scores = np.concatenate(scores)
    # Maps come back in the frame of the input images (heat maps overlay them, pixel metrics use their ground
    # truth as is); the image score is computed in the reference frame, as in the paper.
    anomaly_maps = np.concatenate(maps)
    labels = None if self.image_threshold is None else image_scores > self.image_threshold
    pixels = None if self.pixel_threshold is None else anomaly_maps > self.pixel_threshold
    return Prediction(image_scores, anomaly_maps, labels, pixels)

  def score_features(self, features: Mapping[str, Any]) -> Prediction:
    """Scores precomputed features {layer: (B, h, w, d)} (validated: shapes must match the fitted model)."""
    self._require_fitted()
    size = (self.config.image_size, self.config.image_size)
    out = scoring.score(self.layer_models(), {n: features[n] for n in self.layers if n in features},
                        size=size, mask=self.mask, quantile=self.config.quantile)
    image_scores, anomaly_maps = np.asarray(out.image_score), np.asarray(out.anomaly_map)
    labels = None if self.image_threshold is None else image_scores > self.image_threshold
    pixels = None if self.pixel_threshold is None else anomaly_maps > self.pixel_threshold
    return Prediction(image_scores, anomaly_maps, labels, pixels)

  # ---------------------------------------------------------------------------------- persistence

  def save(self, path) -> Any:
    """Atomically writes the fitted model (Orbax; see glad_jax.checkpoint)."""
    self._require_fitted()
    arrays: dict[str, Any] = {"layers": {}}
    layer_meta = {}
    for name, layer in self.layers.items():
      entry = {"mixture": {"weights": layer.mixture.weights, "means": layer.mixture.means,
                           "cov_chol": layer.mixture.cov_chol}}
      meta = {"fit": dataclasses.asdict(self.fit_info[name]) if name in self.fit_info else None}
      if layer.local is not None:
        entry["local"] = {"tile_component": layer.local.tile_component,
                          "tile_position": layer.local.tile_position,
                          "tile_log_weight": layer.local.tile_log_weight}
        meta["local_grid_shape"] = list(layer.local.grid_shape)
        meta["local_n_components"] = int(layer.local.n_components)
      arrays["layers"][name] = entry
      layer_meta[name] = meta
    if self.reference is not None:
      arrays["reference"] = self.reference
    if self.mask is not None:
      arrays["mask"] = self.mask
    metadata = {
        "config": dataclasses.asdict(self.config),
        "layers": layer_meta,
        "image_threshold": self.image_threshold,
        "pixel_threshold": self.pixel_threshold,
    }
    return ckpt.save_checkpoint(path, arrays, metadata)

  @classmethod
  def load(cls, path, *, extractor=None) -> "GLAD":
    """Restores a model written by `save` (on any device count)."""
    arrays, meta = ckpt.load_checkpoint(path)
    try:
      cfg = dict(meta["config"])
      cfg["layers"] = tuple(cfg["layers"])
      config = GLADConfig(**cfg)
      model = cls(config, extractor=extractor)
      for name in config.layers:
        entry, lmeta = arrays["layers"][name], meta["layers"][name]
        mixture = GaussianMixture(**{k: jnp.asarray(v) for k, v in entry["mixture"].items()})
        local = None
        if "local" in entry:
          local = local_lib.SparseLocalWeights(
              **{k: jnp.asarray(v) for k, v in entry["local"].items()},
              grid_shape=tuple(lmeta["local_grid_shape"]), n_components=lmeta["local_n_components"])
        model.layers[name] = FittedLayer(mixture, local)
        if lmeta.get("fit"):
          info = dict(lmeta["fit"])
          info["grid_shape"] = tuple(info["grid_shape"])
          model.fit_info[name] = LayerFitInfo(**info)
    except (KeyError, TypeError) as e:
      raise ckpt.CheckpointError(f"checkpoint {path} does not hold a GLAD model this version understands "
                                 f"(missing or unexpected entry: {e})") from None
    model.reference = arrays.get("reference")
    model.mask = arrays.get("mask")
    model.image_threshold = meta.get("image_threshold")
    model.pixel_threshold = meta.get("pixel_threshold")
    return model

  def _invalidate(self) -> None:
    self._layer_models = None
    self._score_fn = None

  def model_size_bytes(self) -> int:
    """Bytes of the fitted model's arrays (means, Cholesky factors, sparse local maps, reference, mask)."""
    total = 0
    for layer in self.layers.values():
      for leaf in jax.tree_util.tree_leaves((layer.mixture, layer.local)):
        total += int(np.asarray(leaf).nbytes)
    for extra in (self.reference, self.mask):
      if extra is not None:
        total += int(extra.nbytes)
    return total


# ----------------------------------------------------------------------------------------- helpers


def _check_config(c: GLADConfig) -> None:
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
  if c.align not in ("none", "translation", "euclidean", "similarity", "affine", "homography"):
    raise ValueError(f"config.align: unknown motion model {c.align!r}")
  if c.max_samples is not None and c.max_samples < 1:
    raise ValueError(f"config.max_samples must be None or >= 1, got {c.max_samples}")
  if c.radius < 0:
    raise ValueError(f"config.radius must be >= 0, got {c.radius}")
  if c.backbone_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.backbone_dtype must be 'float32' or 'bfloat16', got {c.backbone_dtype!r}")


def _as_layer_features(x: Any) -> Any:
  """Device arrays stay on the device (no host round trip in the fit); anything else becomes NumPy."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


def _check_memory(extractor, n_images: int, budget_fraction: float = 0.5) -> None:
  """Refuses feature extraction that would not fit in host memory, before allocating anything."""
  shapes = extractor.feature_shapes()
  need = n_images * sum(4 * math.prod(s) for name, s in shapes.items() if name != "logits")
  import psutil

  available = psutil.virtual_memory().available
  if need > budget_fraction * available:
    raise ValueError(
        f"the features of {n_images} images would take {need / 2**30:.1f} GiB "
        f"(layers {dict(shapes)}), more than half of the {available / 2**30:.1f} GiB of free memory: "
        "use fewer images, fewer/lower layers or a smaller backbone")


def _fit_layer(feats: np.ndarray, c: GLADConfig, key: jax.Array, name: str, mesh,
               progress: Progress | None) -> tuple[FittedLayer, LayerFitInfo]:
  from glad_jax.mixture import em, kmle

  n_img, h, w, d = feats.shape
  x = feats.reshape(-1, d)
  n_all = x.shape[0]
  sub_key, fit_key = jax.random.split(key)
  if c.max_samples is not None and n_all > c.max_samples:
    idx = np.sort(np.asarray(jax.random.choice(sub_key, n_all, (c.max_samples,), replace=False)))
    x = x[idx]
  k = min(c.n_components, x.shape[0])

  def cb(iteration, mean_loglik, n_live):
    if progress is not None:
      progress("global", {"layer": name, "iteration": iteration, "max_iter": c.max_iter,
                          "log_likelihood": float(mean_loglik), "components": int(n_live)})

  settings = dict(n_components=k, max_iter=c.max_iter, tol=c.tol, use_oas=c.use_oas)
  t0 = time.perf_counter()
  if c.algorithm == "kmle":
    mixture, info = kmle.fit_kmle(x, kmle.KMLEConfig(**settings), fit_key, mesh=mesh, callback=cb)
  else:
    mixture, info = em.fit_em(x, em.EMConfig(**settings), fit_key, mesh=mesh, callback=cb)
  t1 = time.perf_counter()
  local = None
  mean_nnz = None
  if c.local:
    def local_cb(p):
      if progress is not None:
        progress("local", {"layer": name, "done": p.chunk + 1, "total": p.n_chunks})

    local = local_lib.fit_local_weights(feats, mixture, radius=c.radius, max_iter=c.local_max_iter, tol=c.tol,
                                        callback=local_cb)
    mean_nnz = float(local_lib.sparsity_stats(local).mean_nnz)
  t2 = time.perf_counter()
  info_out = LayerFitInfo(
      n_samples=int(n_all), n_samples_global=int(x.shape[0]), dim=int(d), grid_shape=(int(h), int(w)),
      n_components=int(mixture.n_components), n_iter=int(info.n_iter), converged=bool(info.converged),
      log_likelihood=[float(v) for v in info.loglik], seconds_global=t1 - t0, seconds_local=t2 - t1,
      mean_nnz=mean_nnz)
  return FittedLayer(mixture, local), info_out


def _make_mask(c: GLADConfig, aligned_train: np.ndarray) -> np.ndarray | None:
  if c.mask == "none":
    return None
  from glad_jax import masks

  if c.mask == "margin":
    return np.asarray(masks.margin_mask((c.image_size, c.image_size)))
  return np.asarray(masks.object_mask(aligned_train))
