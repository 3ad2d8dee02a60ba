"""`GLAD(config)`: fit / calibrate / score / save / load — a facade over the functional core.

    model = GLAD(GLADConfig()).fit(train_images)         # uint8 (N, H, W, 3), any H, W
    pred = model.score(test_images)                     # pred.image_scores (N,), pred.anomaly_maps (N, S, S)
    model.save("checkpoints/tire"); model = GLAD.load("checkpoints/tire")

Pipeline (paper Fig. 1): images -> resize to S x S (`prepare_images`) -> align on the reference
(`glad_jax.align.align_to_reference`, objects) -> backbone features per layer (`glad_jax.backbones`)
-> `glad_jax.methods.glad` (global mixture per layer, K-MLE + OAS, Eq. 1-3, 9; local weights,
Eq. 10-12; sparse log-likelihood maps fused over layers, masked, q-quantile image score, Section 3.3).

Everything fitted lives in one pytree, `model.state` (a `GLADState`); the facade adds the backbone,
image preparation, batching and the checkpoint files around it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import align_choice
from glad_jax import checkpoint as ckpt
from glad_jax import scoring
from glad_jax.config import GLADConfig
from glad_jax.evaluation import Prediction, batched
from glad_jax.methods import glad as glad_method
from glad_jax.methods.glad import GLADState, LayerFitInfo

Progress = Callable[[str, Mapping[str, Any]], None]
"""progress(stage, info): see the progress events of glad_jax.methods.glad.fit; plus 'features', 'score'."""


class FittedLayer:
  """A read-only view of one fitted layer (for reports and plots).

  Attributes:
    model: the `scoring.LayerModel` stored in the state.
    local: its sparse local weights, or None (global-only ablation).
    mixture: the global mixture in covariance form (`GLADState.mixture`, computed on first access).
  """

  def __init__(self, state: GLADState, name: str):
    self._state, self._name = state, name
    self.model = state.layers[name]
    self.local = self.model.local

  @functools.cached_property
  def mixture(self):
    return self._state.mixture(self._name)


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


def align_images(images: np.ndarray, reference: np.ndarray, model: str, *, batch_size: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Prepared uint8 images (N, S, S, 3) aligned on `reference` (S, S, 3) by the jitted path that
  scoring runs too (`glad_jax.align.align_to_reference`), in padded chunks.

  Returns:
    (aligned uint8 images (N, S, S, 3), motions (N, 3, 3), see `align.warp_masks` for ground truth).
  """
  ref = jnp.asarray(np.asarray(reference, np.uint8))
  fn = _aligner_jit(model)
  return batched(lambda chunk: fn(ref, jnp.asarray(chunk)), images, batch_size)


@functools.lru_cache(maxsize=None)
def _aligner_jit(model: str):
  """One jitted alignment per motion model (a pure function: the reference is an argument)."""
  from glad_jax import align

  return jax.jit(functools.partial(align.align_to_reference, model=model))


class GLAD:
  """A GLAD anomaly detector: configuration, backbone and (after `fit`) the fitted state."""

  def __init__(self, config: GLADConfig = GLADConfig(), *, extractor=None):
    if not isinstance(config, GLADConfig):
      raise TypeError(f"config must be a GLADConfig, got {type(config).__name__}")
    glad_method.check_config(config)
    self.config = config
    self._extractor = extractor
    self.state: GLADState | None = None
    self.fit_info: dict[str, LayerFitInfo] = {}
    # align='auto': what the last fit chose and why (`glad_jax.align_choice.AlignChoice`); each fit chooses
    # anew from the configuration it was given, `config` then names the chosen motion model.
    self._requested_config = config
    self.align_choice: align_choice.AlignChoice | None = None
    self.update_info: dict[str, Any] = {}  # {layer: glad_jax.online.LayerUpdateInfo} of the last update
    # The jitted end-to-end function depends on the backbone only; the state is an argument, so
    # refitting or calibrating never leaves a stale compiled model behind.
    self._images_fn = None

  @classmethod
  def from_state(cls, state: GLADState, *, fit_info: Mapping[str, LayerFitInfo] | None = None,
                 extractor=None, align_choice_record: align_choice.AlignChoice | None = None) -> "GLAD":
    """A facade over a fitted `GLADState` (e.g. from `glad_jax.methods.glad.fit`)."""
    if not isinstance(state, GLADState):
      raise TypeError(f"state must be a GLADState, got {type(state).__name__}")
    model = cls(state.config, extractor=extractor)
    model.state = state
    model.fit_info = dict(fit_info or {})
    model.align_choice = align_choice_record
    return model

  def copy(self) -> "GLAD":
    """A new facade sharing this one's (immutable) state and backbone: calibrating it leaves this one as is."""
    model = GLAD(self.config, extractor=self._extractor)
    model.state, model.fit_info, model._images_fn = self.state, dict(self.fit_info), self._images_fn
    model._requested_config, model.align_choice = self._requested_config, self.align_choice
    return model

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
    return self.state is not None

  def _require_fitted(self) -> None:
    if not self.is_fitted:
      raise ValueError("this GLAD model is not fitted: call fit(images) or GLAD.load(path) first")

  @property
  def layers(self) -> dict[str, FittedLayer]:
    """{layer: FittedLayer} of the fitted model (empty before fitting)."""
    if self.state is None:
      return {}
    return {name: FittedLayer(self.state, name) for name in self.state.layers}

  @property
  def reference(self) -> np.ndarray | None:
    """The alignment reference (S, S, 3) uint8, or None."""
    return None if self.state is None or self.state.reference is None else np.asarray(self.state.reference)

  @property
  def mask(self) -> np.ndarray | None:
    """(S, S) bool, True where anomalies are looked for; None for no mask."""
    return None if self.state is None or self.state.mask is None else np.asarray(self.state.mask)

  @property
  def image_threshold(self) -> float | None:
    return None if self.state is None else glad_method.threshold_value(self.state.image_threshold)

  @property
  def pixel_threshold(self) -> float | None:
    return None if self.state is None else glad_method.threshold_value(self.state.pixel_threshold)

  def aligner(self):
    """The `glad_jax.align.Aligner` on this model's reference, or None when alignment is off."""
    if self.config.align == "none":
      return None
    if self.config.align == align_choice.AUTO:
      raise ValueError("align='auto' is chosen from the training images when the model is fitted: fit it first")
    if self.reference is None:
      raise ValueError("this model aligns images (align="
                       f"{self.config.align!r}) but has no reference image: fit it first")
    from glad_jax import align

    return align.Aligner(self.reference, self.config.align)

  def _align(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Prepared images aligned on the reference (unchanged when alignment is off)."""
    if self.config.align == "none":
      return images
    if self.reference is None:
      self.aligner()  # raises the "no reference image" error
    return align_images(images, self.reference, self.config.align, batch_size=batch_size)[0]

  def features(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None,
               prepared: bool = False) -> dict[str, np.ndarray]:
    """Backbone features {layer: (N, h, w, d)} of images, after resizing and alignment."""
    x = images if prepared else self._align(prepare_images(images, self.config.image_size), batch_size)
    _check_memory(self.extractor, x.shape[0])
    cb = None if progress is None else (lambda done, total: progress("features", {"done": done, "total": total}))
    return self.extractor(x, batch_size=batch_size, callback=cb)

  # -------------------------------------------------------------------------------------------- fit

  def fit(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None, mesh=None,
          source_shape: tuple[int, int, int] | None = None, distributed: bool | None = None) -> "GLAD":
    """Fits the global mixtures and local weight maps on good images.

    Multi-process fit (JAX's multi-controller runtime, e.g. one process per host): start the runtime
    first, before any other JAX work, then give each process its own block of the training list::

        from glad_jax import distributed
        distributed.initialize("host0:1234", num_processes=2, process_id=i)   # or from JAX_* variables
        mine = distributed.process_shard(sorted_paths)          # the same sorted list on every process
        model = GLAD(config).fit(load(mine))                   # every process gets the same model
        model.save("checkpoints/tire")                         # process 0 writes it, the others wait

    Each process extracts the features of its images; the global mixtures, the local weights and
    (`calibrate`) the thresholds are fitted over the devices of all processes, and the model equals the
    one-process fit of all images (to float32 round-off).

    Args:
      images: uint8 array (N, H, W, 3) / (N, H, W) or a list of arrays (any sizes: resized to image_size).
        In a multi-process fit: this process's block of the training images (may be empty on the last
        processes), the blocks in process order being the whole training set.
      batch_size: backbone (and alignment) batch size.
      progress: optional callback(stage, info) for progress bars.
      mesh: optional 1-D `jax.sharding.Mesh` on which the fit's samples are sharded (multi-process
        default: `glad_jax.distributed.global_mesh()`, every device of every process).
      source_shape: (H, W, C) of the original images when the caller already resized them (the CLI);
        default: the shape of `images` when they all have one. `update` refuses images of another shape.
        In a multi-process fit, this process's; the model keeps it when every process agrees.
      distributed: True: a multi-process fit of the processes' blocks (above); False: a fit of `images`
        alone; None (default): multi-process when the JAX runtime has several processes.

    Returns:
      self.
    """
    if distributed is None:
      distributed = jax.process_count() > 1
    if distributed:
      return self._fit_distributed(images, batch_size=batch_size, progress=progress, mesh=mesh,
                                   source_shape=source_shape)
    c = self._requested_config
    x = prepare_images(images, c.image_size)
    if x.shape[0] < 2:
      raise ValueError(f"GLAD needs at least 2 training images, got {x.shape[0]}")
    c = self._resolve_align(c, x, batch_size, progress)
    reference = None
    if c.align != "none":
      reference = x[0].copy()  # the first training image is the reference (paper 4.1)
      x = align_images(x, reference, c.align, batch_size=batch_size)[0]
    feats = self._device_features(x, batch_size, progress)
    self.fit_features(feats, aligned_images=x, reference=reference, progress=progress, mesh=mesh)
    shape = tuple(int(v) for v in source_shape) if source_shape is not None else source_shape_of(images)
    self.state = self.state.replace(source_shape=shape)
    return self

  def _resolve_align(self, config: GLADConfig, images: np.ndarray, batch_size: int,
                     progress: Progress | None) -> GLADConfig:
    """`config` with align='auto' replaced by the motion model chosen on these prepared training images
    (`glad_jax.align_choice`; in a multi-process fit, chosen by process 0 on every process's images and
    shared); the facade's `config` and `align_choice` become this fit's."""
    choice = None
    if config.align == align_choice.AUTO:
      if jax.process_count() == 1:
        choice = align_choice.choose_alignment(images, config, self.extractor, batch_size=batch_size,
                                               progress=progress)
      else:
        choice = self._shared_align_choice(config, images, batch_size, progress)
      config = config.replace(align=choice.chosen)
    self.config, self.align_choice = config, choice
    return config

  def _shared_align_choice(self, config: GLADConfig, images: np.ndarray, batch_size: int,
                           progress: Progress | None) -> align_choice.AlignChoice:
    """Process 0 chooses on the whole training list (gathered: small uint8 images), as a one-process fit of
    it would; every process receives its record."""
    from glad_jax import distributed as dist

    everything = dist.gather_rows(images)
    choice, error = None, None
    if dist.is_coordinator():
      try:
        choice = align_choice.choose_alignment(everything, config, self.extractor, batch_size=batch_size,
                                               progress=progress)
      except ValueError as e:
        error = e
    dist.check_all(error, "choosing the alignment")
    text = b"" if choice is None else json.dumps(choice.as_dict()).encode()
    n = int(dist.broadcast_from_coordinator(np.array([len(text)], np.int64))[0])
    buf = np.zeros(n, np.uint8)
    if choice is not None:
      buf[:] = np.frombuffer(text, np.uint8)
    got = dist.broadcast_from_coordinator(buf)
    return choice if choice is not None else align_choice.AlignChoice(**json.loads(got.tobytes()))

  def _fit_distributed(self, images: Any, *, batch_size: int, progress: Progress | None, mesh,
                       source_shape: tuple[int, int, int] | None) -> "GLAD":
    """`fit` of this process's block of a multi-process fit (see `fit`)."""
    from glad_jax import distributed as dist

    c = self._requested_config
    n_given = len(images) if isinstance(images, (list, tuple)) else int(np.shape(images)[0])
    size = c.image_size
    error = None
    try:
      x = prepare_images(images, size) if n_given else np.zeros((0, size, size, 3), np.uint8)
    except ValueError as e:
      error, x = e, np.zeros((0, size, size, 3), np.uint8)
    dist.check_all(error, "preparing its training images")
    counts = dist.allgather_ints([x.shape[0]])[:, 0]
    n_total = int(counts.sum())
    if n_total < 2:
      raise ValueError(f"GLAD needs at least 2 training images, got {n_total} over {len(counts)} processes")
    if counts[0] == 0:
      raise dist.DistributedError("process 0 has no training image: give each process its block of the "
                                  "sorted training list (glad_jax.distributed.process_shard)")
    mesh = dist.global_mesh() if mesh is None else mesh
    shapes = {name: s for name, s in self.extractor.feature_shapes().items() if name in c.layers}
    try:  # a host with less memory than the others must stop them too, not leave them waiting
      dist.check_fit_memory(dist.estimate_fit_bytes(n_total, shapes, c.n_components, mesh.devices.size))
    except dist.FitMemoryError as e:
      error = e
    dist.check_all(error, "checking its memory for the fit")
    c = self._resolve_align(self._requested_config, x, batch_size, progress)
    reference = None
    if c.align != "none":
      # The first training image of the whole list (paper 4.1): process 0's first.
      first = x[0] if dist.is_coordinator() else np.zeros((size, size, 3), np.uint8)
      reference = dist.broadcast_from_coordinator(first).astype(np.uint8)
      if x.shape[0]:
        x = align_images(x, reference, c.align, batch_size=batch_size)[0]
    feats = {name: np.zeros((0,) + tuple(s), np.float32) for name, s in shapes.items()}
    try:
      if x.shape[0]:
        feats = self._device_features(x, batch_size, progress)
    except ValueError as e:  # e.g. the host-memory check of the features
      error = e
    dist.check_all(error, "extracting its features")
    global_feats, image_mask = {}, None
    for name in c.layers:
      global_feats[name], image_mask = dist.to_global(np.asarray(feats[name]), mesh)
    del feats
    # The object mask is computed from all aligned training images (small: uint8 images).
    aligned = dist.gather_rows(x) if c.mask == "object" else None
    self.fit_features(global_feats, aligned_images=aligned, reference=reference, progress=progress,
                      mesh=mesh, image_mask=image_mask)
    local_shape = tuple(int(v) for v in source_shape) if source_shape is not None else (
        source_shape_of(images) if n_given else None)
    self.state = self.state.replace(source_shape=dist.agreed_shape(local_shape, has_data=x.shape[0] > 0))
    return self

  def _device_features(self, x: np.ndarray, batch_size: int, progress: Progress | None) -> dict[str, jax.Array]:
    """Features {layer: (N, h, w, d)} of prepared images, left on the device for the fit (no round trip
    through host memory on an accelerator)."""
    _check_memory(self.extractor, x.shape[0])
    ext = self.extractor
    cb = None if progress is None else (lambda done, total: progress("features", {"done": done, "total": total}))
    return batched(lambda chunk: ext.apply(ext.params, jnp.asarray(chunk)), x, batch_size, to_host=False,
                   callback=cb)

  def fit_features(self, features: Mapping[str, Any], *, aligned_images: np.ndarray | None = None,
                   reference: np.ndarray | None = None, progress: Progress | None = None,
                   mesh=None, image_mask=None) -> "GLAD":
    """Fits on precomputed backbone features {layer: (N, h, w, d)} (e.g. shared with baselines).

    Args:
      features: one array per configured layer, from `features(...)` of the same configuration; or
        multi-process global arrays (`glad_jax.distributed.to_global`) over `mesh`, with `image_mask`.
      aligned_images: the resized, aligned training images (N, S, S, 3); needed only for mask='object'.
      reference: the alignment reference (S, S, 3) uint8; needed only when the config aligns.
      progress, mesh: as in `fit`.
      image_mask: the validity mask of global-array features (False on padding images).
    """
    key = jax.random.key(self.config.seed)
    self.state, self.fit_info = glad_method.fit_with_info(
        features, self.config, key, images=aligned_images, reference=reference, mesh=mesh, progress=progress,
        image_mask=image_mask)
    self.config = self.state.config  # align='auto' on given features: stored as 'none' (they were not aligned)
    return self

  # ----------------------------------------------------------------------------------------- update

  def update(self, images: Any, *, holdout: Any | None = None, fpr: float = 0.01, forgetting: float = 1.0,
             batch_size: int = 16, progress: Progress | None = None, config=None) -> "GLAD":
    """Updates the fitted model with new good images instead of refitting (online K-MLE, `glad_jax.online`).

    Args:
      images: new good images, of the training images' size and channel count (arrays as `fit` takes them);
        aligned on the model's reference when it aligns.
      holdout: optional held-out new good images: the thresholds are recalibrated on them at `fpr`. None keeps
        the current thresholds.
      fpr: target false-positive rate of the recalibrated thresholds.
      forgetting: lambda in (0, 1], the weight of every old sample (1: old and new images weigh the same).
      batch_size, progress: as in `fit`.
      config: optional `glad_jax.online.UpdateConfig` (its forgetting is replaced by `forgetting`).

    Returns:
      self (with a new state; the previous state object is left as it was).
    """
    self._require_fitted()
    self._check_update_ready()
    for name, value in (("images", images), ("holdout images", holdout)):
      if value is not None:
        self._check_source_shape(value, name)
    x = self._align(prepare_images(images, self.config.image_size), batch_size)
    feats = self._device_features(x, batch_size, progress)
    self.update_features(feats, forgetting=forgetting, config=config)
    if holdout is not None:
      self.calibrate(holdout, fpr=fpr, batch_size=batch_size)
      history = self.state.update_history
      self.state = self.state.replace(
          update_history=history[:-1] + (dataclasses.replace(history[-1], recalibrated=True),))
    return self

  def update_features(self, features: Mapping[str, Any], *, forgetting: float = 1.0, config=None) -> "GLAD":
    """`update` on precomputed features {layer: (M', h, w, d)} of new good images (thresholds kept)."""
    from glad_jax import online

    self._require_fitted()
    self._check_update_ready()
    cfg = (config or online.UpdateConfig()).replace(forgetting=forgetting)
    self.state, self.update_info = glad_method.update_with_info(self.state, features, cfg)
    return self

  def _check_update_ready(self) -> None:
    from glad_jax import online

    if self.state.update_stats is None:
      raise ValueError(f"cannot update this model: {online.NO_STATS_MESSAGE}")

  def _check_source_shape(self, images: Any, name: str) -> None:
    want = self.state.source_shape
    got = source_shape_of(images)
    if isinstance(images, (list, tuple)) and not images:
      raise ValueError("no images given (empty list)")
    if want is not None and got is not None and got != tuple(want):
      fmt = lambda s: "x".join(str(v) for v in s)
      raise ValueError(f"new {name} are {fmt(got)} but the model was fitted on "
                       f"{fmt(want)} images (height x width x channels): give images of the training size and "
                       "channel count, or refit")

  # -------------------------------------------------------------------------------------- calibrate

  def calibrate(self, good_images: Any, *, fpr: float = 0.01, batch_size: int = 16,
                distributed: bool | None = None) -> "GLAD":
    """Sets the image and pixel thresholds from held-out good images at a target false-positive rate.

    image threshold = the (1 - fpr)-quantile of their image scores; pixel threshold = the (1 - fpr)-quantile of
    their anomaly-map values inside the mask. Never use test images for this.

    Args:
      good_images: held-out good images (as `fit` takes them); in a multi-process run, this process's
        block of them (may be empty).
      fpr: target false-positive rate.
      batch_size: scoring batch size.
      distributed: True: each process scores its block and the quantiles are taken over the scores and
        maps of all processes (the same thresholds everywhere); None (default): when the JAX runtime has
        several processes.
    """
    if not 0.0 < fpr < 1.0:
      raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if distributed is None:
      distributed = jax.process_count() > 1
    if not distributed:
      pred = self.score(good_images, batch_size=batch_size)
      self.state = glad_method.calibrated(self.state, pred.image_scores, pred.anomaly_maps, fpr)
      return self
    from glad_jax import distributed as dist

    self._require_fitted()
    size = self.config.image_size
    n_given = len(good_images) if isinstance(good_images, (list, tuple)) else int(np.shape(good_images)[0])
    scores, maps, error = np.zeros((0,), np.float32), np.zeros((0, size, size), np.float32), None
    try:
      if n_given:
        pred = self.score(good_images, batch_size=batch_size)
        scores, maps = np.asarray(pred.image_scores, np.float32), np.asarray(pred.anomaly_maps, np.float32)
    except ValueError as e:
      error = e
    dist.check_all(error, "scoring its held-out images")
    all_scores = dist.gather(scores)
    if all_scores.size == 0:
      raise ValueError("no held-out image to calibrate the thresholds on (every process's block is empty)")
    all_maps = dist.gather(maps).reshape(-1, size, size)
    self.state = glad_method.calibrated(self.state, all_scores, all_maps, fpr)
    return self

  # ------------------------------------------------------------------------------------------ score

  def layer_models(self) -> dict[str, scoring.LayerModel]:
    self._require_fitted()
    return dict(self.state.layers)

  def score_fn(self) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """One jit-compiled function of this model's current state: uint8 images (B, S, S, 3) -> (image scores
    (B,), anomaly maps (B, S, S)).

    Alignment on the reference (when configured), backbone, sparse local-mixture log-likelihoods,
    layer fusion, mask, quantile, and the maps warped back onto the input images: no host step.
    The image score is taken in the reference frame, as in the paper.
    """
    self._require_fitted()
    if self._images_fn is None:
      from glad_jax import methods

      self._images_fn = jax.jit(methods.images_fn(methods.get_method("glad"), self.extractor.apply))
    fn, params, state = self._images_fn, self.extractor.params, self.state

    def score_images(images):
      maps, scores = fn(params, state, images)
      return scores, maps

    return score_images

  def score(self, images: Any, *, batch_size: int = 16, progress: Progress | None = None) -> Prediction:
    """Image scores and anomaly maps; labels when thresholds are calibrated."""
    self._require_fitted()
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = prepare_images(images, self.config.image_size)
    fn = self.score_fn()
    cb = None if progress is None else (lambda done, total: progress("score", {"done": done, "total": total}))
    # Maps come back in the frame of the input images (heat maps overlay them, pixel metrics use their ground
    # truth as is); the image score is computed in the reference frame, as in the paper.
    image_scores, anomaly_maps = batched(lambda chunk: fn(jnp.asarray(chunk)), x, batch_size, callback=cb)
    return self._prediction(image_scores, anomaly_maps)

  def _prediction(self, image_scores: np.ndarray, anomaly_maps: np.ndarray) -> Prediction:
    thr_image, thr_pixel = self.image_threshold, self.pixel_threshold
    labels = None if thr_image is None else image_scores > thr_image
    pixels = None if thr_pixel is None else anomaly_maps > thr_pixel
    return Prediction(image_scores, anomaly_maps, labels, pixels)

  def score_features(self, features: Mapping[str, Any]) -> Prediction:
    """Scores precomputed features {layer: (B, h, w, d)} (validated: shapes must match the fitted model)."""
    self._require_fitted()
    size = (self.config.image_size, self.config.image_size)
    out = scoring.score(self.state.layers, {n: features[n] for n in self.state.layers if n in features},
                        size=size, mask=self.mask, quantile=self.config.quantile)
    return self._prediction(np.asarray(out.image_score), np.asarray(out.anomaly_map))

  # ---------------------------------------------------------------------------------- persistence

  def save(self, path) -> Any:
    """Atomically writes the fitted state (Orbax; see glad_jax.checkpoint.save_state).

    In a multi-process run every process calls this with the same path: the processes hold the same
    model, process 0 writes it (the others never write, so there is never a partial checkpoint from a
    second writer), and every process returns once it is complete, or raises if process 0 failed.
    """
    self._require_fitted()
    metadata = {"config": dataclasses.asdict(self.config),
                "fit_info": {name: dataclasses.asdict(info) for name, info in self.fit_info.items()},
                "align_choice": None if self.align_choice is None else self.align_choice.as_dict()}
    if jax.process_count() == 1:
      return ckpt.save_state(path, self.state, metadata)
    from glad_jax import distributed as dist

    dist.barrier("save_start")
    out, error = None, None
    if dist.is_coordinator():
      try:
        out = ckpt.save_state(path, self.state, metadata)
      except Exception as e:  # noqa: BLE001  (re-raised below, after the others heard of it)
        error = e
    dist.check_all(error, f"writing the checkpoint {path}")
    return out if out is not None else pathlib.Path(path).expanduser().absolute()

  @classmethod
  def load(cls, path, *, extractor=None) -> "GLAD":
    """Restores a model written by `save` (on any device count)."""
    state, meta = ckpt.load_state(path)
    if not isinstance(state, GLADState):
      raise ckpt.CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a GLAD model")
    try:
      fit_info = {}
      for name, info in (meta.get("fit_info") or {}).items():
        info = dict(info)
        info["grid_shape"] = tuple(info["grid_shape"])
        fit_info[name] = LayerFitInfo(**info)
      choice = meta.get("align_choice")
      choice = None if choice is None else align_choice.AlignChoice(**choice)
    except (KeyError, TypeError) as e:
      raise ckpt.CheckpointError(f"checkpoint {path} has fit information this version does not understand "
                                 f"({e}): refit the model") from None
    return cls.from_state(jax.tree.map(jnp.asarray, state), fit_info=fit_info, extractor=extractor,
                          align_choice_record=choice)

  def model_size_bytes(self) -> int:
    """Bytes of the fitted state's arrays (mixtures, sparse local maps, reference, mask, thresholds)."""
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(self.state))


# ----------------------------------------------------------------------------------------- helpers


def source_shape_of(images: Any) -> tuple[int, int, int] | None:
  """(H, W, C) of a batch (N, H, W[, C]) or list of images when they all have one shape (C = 1 for 2-D
  images), else None."""
  if isinstance(images, (list, tuple)):
    shapes = {np.shape(im) for im in images}
    if len(shapes) != 1:
      return None
    shape = shapes.pop()
  else:
    shape = np.shape(images)[1:]
  if len(shape) == 2:
    return (int(shape[0]), int(shape[1]), 1)
  if len(shape) == 3:
    return tuple(int(v) for v in shape)
  return None


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


__all__ = ["GLAD", "FittedLayer", "LayerFitInfo", "Prediction", "align_images", "prepare_images"]
