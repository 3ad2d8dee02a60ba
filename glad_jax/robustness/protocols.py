"""Comparison and robustness protocols over in-memory data (paper Sections 4.2-4.4, OmniAL PGD).

Every protocol compares a list of `Variant`s -- a method of the registry (`glad_jax.methods`: GLAD
and the baselines MahaAD, PaDiM, PatchCore, and whatever is registered later) under a row name,
with a configuration; the registry's variants give GLAD's ablations of the paper's Table 1
(global-only, EM instead of K-MLE, no OAS, layer subsets) -- on the SAME backbone features: each
image set goes through one shared `FeatureExtractor` once (every layer any method needs), and
every method fits on those arrays through the registry's uniform ``fit`` and is scored through
`glad_jax.methods.images_fn` (backbone + the method's ``score``): no method-specific branch.

  run_standard       fit on train, score test: image AUROC, pixel AUROC, AUPRO, fit seconds,
                     inference ms per image (backbone + scorer, one jitted function), model MB.
  run_rd             Rd- (Section 4.4, Table 4): n seeded randomised versions of train + test
                     (`glad_jax.data.perturb.rd_perturb`); fit and test on each; image AUROC on
                     normal vs randomised data and their difference.
  run_contamination  N anomalous test images moved into training (`perturb.contaminate`'s rule),
                     removed from the test set; AUROC of the clean and the contaminated model on
                     the same reduced test set, and the drop.
  run_adversarial    PGD (OmniAL) with gradients through the backbone and the scorer: pixel AP /
                     AUROC when the bounded map is attacked against the masks (untargeted and
                     targeted), and one-sided image attacks ("hide": anomalous images only;
                     "false-alarm": good images only) as image AUROC and detection / false-alarm
                     rate at a threshold calibrated on held-out good training images.

Data: training images are a uint8 batch (N, H, W, 3) (or anything `GLAD.fit` accepts), the test
split an `ImageBatch` (`glad_jax.data.mvtec.load_split`). Images are resized to the extractor's
input size S; masks to S x S (nearest). Methods whose config aligns images (a config field
``align != 'none'``: GLAD's) see images aligned on the first training image by the one jitted
alignment path (`glad_jax.align.align_to_reference`), and their test masks are warped with the
same motions, so maps and masks share a frame (alignment time is excluded from the inference
time, as in the paper's Table 1). Baselines never align (their papers do not).

No printing: progress goes through an optional ``progress(stage, info)`` callback with GLAD's
stages ('features', 'plan', 'global', 'global_done', 'local', 'score') plus 'protocol' (info:
protocol, step, method, done, total).
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from glad_jax import align as align_lib
from glad_jax import align_choice
from glad_jax import methods as registry
from glad_jax import metrics
from glad_jax.backbones import FeatureExtractor
from glad_jax.baselines import model_size_bytes
from glad_jax.config import GLADConfig
from glad_jax.data import perturb
from glad_jax.data.mvtec import Category, ImageBatch, ImageRecord
from glad_jax.evaluation import Prediction, batched, evaluate
from glad_jax.model import align_images, prepare_images
from glad_jax.robustness.adversarial import AttackSuiteConfig, attack_suite, check_suite_config

Progress = Callable[[str, Mapping[str, Any]], None]
CONTAMINATION_SIZES = (10, 40)  # anomalous images moved into training (robustness suite)
_MB = 1e6


# ------------------------------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a comparison: a registered method under a row name, with its configuration.

  Attributes:
    name: row label, unique within a comparison (e.g. 'glad', 'glad-global', 'padim').
    method: registry name of the method (`glad_jax.methods.list_methods()`).
    config: the method's config (an instance of its ``config_cls``).
  """

  name: str
  method: str
  config: Any

  @property
  def registered(self) -> registry.Method:
    return registry.get_method(self.method)

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.config.layers)

  @property
  def align(self) -> str:
    """The motion model the method's images are aligned with ('none' for configs without one)."""
    return getattr(self.config, "align", "none")


def variant(method: str, config: GLADConfig, name: str | None = None) -> Variant:
  """A registered method on the backbone setting of a GLAD config (`Method.config_for`: e.g. PatchCore on
  the two deepest layers, PaDiM's d' from the backbone), under `name` (default: the method's name)."""
  m = registry.get_method(method)
  return Variant(name or method, method, m.config_for(config))


def method_variants(method: str, config: GLADConfig) -> tuple[Variant, ...]:
  """The named variants (ablations) of a registered method on `config` (GLAD: its Table 1 rows)."""
  base = variant(method, config)
  m = base.registered
  return tuple(Variant(name, method, cfg) for name, cfg in m.variants(base.config))


def default_methods(config: GLADConfig, *, ablations: bool = True,
                    names: Sequence[str] | None = None) -> tuple[Variant, ...]:
  """Every registered method (or those in `names`) on `config`'s backbone, each followed by its
  variants when `ablations` (GLAD: glad-global, glad-em, glad-no-oas, glad-<layer subsets>)."""
  out = []
  for method in (registry.list_methods() if names is None else names):
    out.append(variant(method, config))
    if ablations:
      out.extend(method_variants(method, config))
  return tuple(out)


def select_methods(config: GLADConfig, names: Sequence[str]) -> tuple[Variant, ...]:
  """Variants by name, in the given order (see `default_methods` for the names).

  Raises:
    ValueError: for an unknown or repeated name, listing the known ones.
  """
  known = {m.name: m for m in default_methods(config)}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
  if len(set(names)) != len(names):
    raise ValueError(f"methods named more than once: {list(names)}")
  if not names:
    raise ValueError(f"no method selected; known: {', '.join(known)}")
  return tuple(known[n] for n in names)


def make_extractor(config: GLADConfig, methods: Sequence[Variant]) -> FeatureExtractor:
  """The shared backbone: `config`'s backbone, weights and image size; every layer any method
  uses."""
  from glad_jax.backbones import create_feature_extractor

  layers = []
  for m in methods:
    layers += [name for name in m.layers if name not in layers]
  return create_feature_extractor(config.backbone, tuple(layers), config.weights, config.image_size,
                                  seed=config.seed)


def _check_methods(methods: Sequence[Variant], extractor: FeatureExtractor) -> tuple[Variant, ...]:
  methods = tuple(methods)
  if not methods:
    raise ValueError("no method to compare (methods is empty)")
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise ValueError(f"method names must be unique, got {names}")
  for m in methods:
    if not isinstance(m, Variant):
      raise ValueError(f"methods must be Variants (see variant / select_methods), got {type(m).__name__}")
    config_cls = m.registered.config_cls  # raises for an unknown method
    if not isinstance(m.config, config_cls):
      raise ValueError(f"method {m.name!r}: config must be a {config_cls.__name__}, "
                       f"got {type(m.config).__name__} (see variant)")
    missing = [name for name in m.layers if name not in extractor.layers]
    if missing:
      raise ValueError(f"method {m.name!r} uses layer(s) {missing} that the shared extractor does "
                       f"not compute (it has {extractor.layers}); build it with make_extractor")
    # Configs that name a backbone / image size (GLAD's) must name the shared one.
    backbone = getattr(m.config, "backbone", extractor.name)
    size = getattr(m.config, "image_size", extractor.image_size)
    if backbone != extractor.name or size != extractor.image_size:
      raise ValueError(
          f"method {m.name!r} is configured for backbone {backbone!r} at {size} px but the shared "
          f"extractor is {extractor.name!r} at {extractor.image_size} px: every method must share "
          "one backbone")
  return methods


# -------------------------------------------------------------------------------------- image sets


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """One split as a method sees it: resized (and aligned) images, their masks and features.

  Attributes:
    images: uint8 array of shape (N, S, S, 3).
    features: {layer: float32 array of shape (N, h, w, d)} for every layer of the extractor.
    masks: bool array of shape (N, S, S) warped like the images, or None.
    reference: uint8 array of shape (S, S, 3), the alignment reference (None without alignment).
  """

  images: np.ndarray
  features: dict[str, np.ndarray] | None
  masks: np.ndarray | None = None
  reference: np.ndarray | None = None

  def subset(self, index: np.ndarray) -> "ImageSet":
    feats = None if self.features is None else {k: v[index] for k, v in self.features.items()}
    masks = None if self.masks is None else self.masks[index]
    return ImageSet(self.images[index], feats, masks, self.reference)


def featurize(extractor: FeatureExtractor, images: np.ndarray, *, align: str = "none",
              reference: np.ndarray | None = None, masks: np.ndarray | None = None,
              with_features: bool = True, batch_size: int = 16,
              progress: Progress | None = None) -> ImageSet:
  """Aligns (optionally) and runs the backbone once on a prepared batch.

  Args:
    extractor: the shared backbone.
    images: uint8 array of shape (N, S, S, 3), S = extractor.image_size.
    align: motion model ('none' or a `glad_jax.align` model); aligned by `align_images`, the
      jitted path that fitting and scoring use.
    reference: alignment reference (S, S, 3); None = images[0] (a training set).
    masks: optional bool array of shape (N, S, S), warped with the images.
    with_features: False skips the backbone (images only).
    batch_size: backbone batch size.
    progress: optional callback.

  Returns:
    An `ImageSet`.
  """
  if align != "none":
    reference = images[0].copy() if reference is None else reference
    images, motions = align_images(images, reference, align, batch_size=batch_size)
    if masks is not None:
      masks = np.asarray(align_lib.warp_masks(jnp.asarray(masks), jnp.asarray(motions)))
  else:
    reference = None
  feats = None
  if with_features:
    cb = None if progress is None else (
        lambda done, total: progress("features", {"done": done, "total": total}))
    feats = extractor(images, batch_size=batch_size, callback=cb)
  return ImageSet(images, feats, masks, reference)


class _Store:
  """Image sets of one protocol step, computed once per (split, alignment) and shared."""

  def __init__(self, extractor: FeatureExtractor, batch_size: int, progress: Progress | None):
    self._extractor = extractor
    self._batch_size = batch_size
    self._progress = progress
    self._sets: dict[tuple[str, str], ImageSet] = {}

  def train(self, images: np.ndarray, align: str) -> ImageSet:
    key = ("train", align)
    if key not in self._sets:
      self._sets[key] = featurize(self._extractor, images, align=align,
                                  batch_size=self._batch_size, progress=self._progress)
    return self._sets[key]

  def test(self, images: np.ndarray, align: str, *, masks: np.ndarray | None = None,
           train_images: np.ndarray | None = None, with_features: bool = True) -> ImageSet:
    key = ("test", align)
    if key not in self._sets:
      reference = None if align == "none" else self.train(train_images, align).reference
      self._sets[key] = featurize(self._extractor, images, align=align, reference=reference,
                                  masks=masks, with_features=with_features,
                                  batch_size=self._batch_size, progress=self._progress)
    return self._sets[key]


# ------------------------------------------------------------------------------------ fitted method


def _subset_extractor(extractor: FeatureExtractor, layers: tuple[str, ...]) -> FeatureExtractor:
  """The shared backbone restricted to `layers` (same weights): inference stops at the deepest one,
  so a method's timing does not pay for layers that only other methods use."""
  if set(layers) == set(extractor.layers):
    return extractor
  return FeatureExtractor(extractor.spec, tuple(layers), extractor.params, extractor.image_size,
                          extractor.dtype, extractor.module.precision)


@dataclasses.dataclass
class FittedMethod:
  """A fitted variant behind one interface.

  Attributes:
    variant: the `Variant`.
    method: its registered `glad_jax.methods.Method`.
    state: the fitted state pytree (``method.fit``'s output).
    apply: pure, differentiable ``apply(params, state, images (B, S, S, 3) uint8 or float in
      [0, 1]) -> (anomaly maps (B, S, S), image scores (B,))``: backbone + ``method.score``
      (`glad_jax.methods.images_fn`; images already aligned).
    params: the backbone's parameters.
    fit_seconds: wall time of the fit on precomputed features (backbone excluded; includes the
      JIT compilation of the fit's functions the first time a shape is seen).
    size_bytes: bytes of the fitted arrays (backbone weights excluded: shared by all methods).
    image_size: S, the side of the images and anomaly maps.
  """

  variant: Variant
  method: registry.Method
  state: Any
  apply: Callable
  params: Any
  fit_seconds: float
  size_bytes: int
  image_size: int
  _jitted: Callable | None = None

  @property
  def name(self) -> str:
    return self.variant.name

  @property
  def jitted(self) -> Callable:
    if self._jitted is None:
      self._jitted = jax.jit(self.apply)
    return self._jitted

  def image_fn(self) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """Jitted, differentiable images (B, S, S, 3) -> (maps, image scores) of this fitted state."""
    fn, params, state = self.jitted, self.params, self.state
    return lambda images: fn(params, state, images)

  def score_features(self, features: Mapping[str, np.ndarray], batch_size: int = 16) -> Prediction:
    """Scores and maps of precomputed features {layer: (N, h, w, d)}, in padded chunks."""
    feats = {k: features[k] for k in self.variant.layers}
    score = jax.jit(self.method.score)
    maps, scores = batched(lambda chunk: score(self.state, chunk), feats, batch_size)
    return Prediction(scores, maps, None, None)

  def score(self, images: np.ndarray, *, batch_size: int = 16,
            progress: Progress | None = None) -> Prediction:
    """End-to-end scores of prepared images (N, S, S, 3) (the interface `evaluation.evaluate` uses).

    Every chunk is padded to `batch_size`, so a warm-up call on `batch_size` images compiles the
    shape that the timed call runs.
    """
    fn = self.image_fn()
    cb = None if progress is None else (
        lambda done, total: progress("score", {"done": done, "total": total}))
    maps, scores = batched(lambda chunk: fn(jnp.asarray(chunk)), images, batch_size, callback=cb)
    return Prediction(scores, maps, None, None)


def _method_key(seed: int, method: Variant) -> jax.Array:
  """The fit's key: a method whose config carries its own seed (GLAD) gets ``key(config.seed)``, the key its
  facade (`GLAD.fit`, `glad fit`) uses, so a protocol fits the same model; others ``fold_in(key(seed),
  crc32(registered name))``."""
  own = getattr(method.config, "seed", None)
  if own is not None:
    return jax.random.key(int(own))
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(method.method.encode()) & 0x7FFFFFFF)


def fit_method(method: Variant, train: ImageSet, extractor: FeatureExtractor, *, seed: int = 0,
               progress: Progress | None = None) -> FittedMethod:
  """Fits one variant on precomputed training features through the registry's ``fit``.

  Args:
    method: the `Variant`.
    train: the training `ImageSet` (features of every layer the method uses; its aligned images and
      reference are passed on as ``images=`` / ``reference=``).
    extractor: the shared backbone (its parameters make the end-to-end `apply`).
    seed: seeds the fit of methods without a seed of their own (see `_method_key`): the same key for
      every variant of one registered method (the ablations differ in their config only).
    progress: optional callback, passed to the fit.

  Returns:
    A `FittedMethod`.

  Raises:
    ValueError: when the method cannot be fitted on these data (e.g. a degenerate covariance).
  """
  m = method.registered
  size = extractor.image_size
  feats = {name: train.features[name] for name in method.layers}
  t0 = time.perf_counter()
  state = m.fit(feats, method.config, _method_key(seed, method), image_size=size,
                images=train.images, reference=train.reference, progress=progress)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  apply = registry.images_fn(m, _subset_extractor(extractor, method.layers).apply, align=False)
  return FittedMethod(method, m, state, apply, extractor.params, seconds, model_size_bytes(state),
                      size)


# --------------------------------------------------------------------------------------- the data


@dataclasses.dataclass
class ProtocolResult:
  """What a protocol measured.

  Attributes:
    protocol: 'standard', 'rd', 'contamination' or 'adversarial'.
    rows: JSON-serialisable rows (one per method, or per method and setting); a method that
      could not be fitted has an 'error' entry instead of metrics.
    settings: the protocol's settings (JSON-serialisable).
    details: arrays and objects for further use (not serialised): per-method image scores on
      the test set ('scores'), fitted methods ('fitted', when kept), moved indices, ...
  """

  protocol: str
  rows: list[dict[str, Any]]
  settings: dict[str, Any]
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  def row(self, method: str, **where) -> dict[str, Any]:
    """The first row of `method` whose entries match `where` (KeyError if none)."""
    for r in self.rows:
      if r["method"] == method and all(r.get(k) == v for k, v in where.items()):
        return r
    raise KeyError(f"no row for method {method!r} with {where} in the {self.protocol} results")


def _prepare(train_images: Any, test: ImageBatch, size: int) -> tuple[np.ndarray, ImageBatch]:
  """Validated, resized train images (N, S, S, 3) and test batch (images and masks at S x S)."""
  train = prepare_images(getattr(train_images, "images", train_images), size)
  if train.shape[0] < 2:
    raise ValueError(f"the training set needs at least 2 images, got {train.shape[0]}")
  for field in ("images", "masks", "has_mask", "labels"):
    if not hasattr(test, field):
      raise ValueError(f"test must be an ImageBatch (glad_jax.data.mvtec.load_split), got "
                       f"{type(test).__name__} without .{field}")
  images = prepare_images(test.images, size)
  labels = np.asarray(test.labels)
  n = images.shape[0]
  if labels.shape != (n,) or not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"test.labels must be {n} values in {{0, 1}}, got shape {labels.shape}")
  if labels.all() or not labels.any():
    raise ValueError(f"the test set needs good and anomalous images; it has {int(labels.sum())} "
                     f"anomalous out of {n}")
  masks = np.asarray(test.masks, bool)
  if masks.ndim != 3 or masks.shape[0] != n:
    raise ValueError(f"test.masks must have shape ({n}, H, W), got {masks.shape}")
  if masks.shape[1:] != (size, size):
    from PIL import Image

    masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
                      for m in masks])
  return train, dataclasses.replace(test, images=images, masks=masks, labels=labels)


def _say(progress: Progress | None, protocol: str, step: str, method: str, done: int,
         total: int) -> None:
  if progress is not None:
    progress("protocol", {"protocol": protocol, "step": step, "method": method, "done": done,
                          "total": total})


def _fit_or_error(method: Variant, train: ImageSet, extractor, seed, progress):
  try:
    return fit_method(method, train, extractor, seed=seed, progress=progress), None
  except ValueError as e:  # degenerate data for this method: report it, go on with the others
    return None, f"{type(e).__name__}: {e}"


def resolve_align(method: Variant, train_images: np.ndarray, extractor: FeatureExtractor, *,
                  batch_size: int = 16, progress: Progress | None = None) -> tuple[Variant, Any]:
  """The method with align='auto' replaced by the motion model chosen on its (prepared) training images,
  and the `glad_jax.align_choice.AlignChoice` (None when the method's alignment is fixed)."""
  if method.align != align_choice.AUTO:
    return method, None
  choice = align_choice.choose_alignment(train_images, method.config, extractor, batch_size=batch_size,
                                         progress=progress)
  return dataclasses.replace(method, config=method.config.replace(align=choice.chosen)), choice


def _fit_score_all(protocol: str, step: str, methods, train_images, test_images, extractor, *,
                   seed, batch_size, progress) -> dict[str, np.ndarray | str]:
  """Fits every method on one (train, test) pair; test image scores per method, or an error."""
  store = _Store(extractor, batch_size, progress)
  out: dict[str, np.ndarray | str] = {}
  for i, m in enumerate(methods):
    _say(progress, protocol, step, m.name, i, len(methods))
    m, _ = resolve_align(m, train_images, extractor, batch_size=batch_size, progress=progress)
    train = store.train(train_images, m.align)
    fitted, error = _fit_or_error(m, train, extractor, seed, progress)
    if fitted is None:
      out[m.name] = error
      continue
    test = store.test(test_images, m.align, train_images=train_images)
    out[m.name] = fitted.score_features(test.features, batch_size).image_scores
  return out


def _auroc(labels: np.ndarray, scores) -> float | None:
  return None if isinstance(scores, str) else float(metrics.image_auroc(labels, scores))


# ---------------------------------------------------------------------------------------- standard


def run_standard(methods: Sequence[Variant], train_images: Any, test: ImageBatch, *,
                 extractor: FeatureExtractor, batch_size: int = 16, seed: int = 0,
                 keep_fitted: bool = False, progress: Progress | None = None) -> ProtocolResult:
  """Fits every method on the training images and evaluates it on the test split.

  Args:
    methods: the methods (`default_methods`, `select_methods`).
    train_images: good images, uint8 (N, H, W, 3) (or an `ImageBatch`).
    test: the test split (`load_split`), with labels and masks.
    extractor: the shared backbone (`make_extractor`).
    batch_size: backbone / scoring batch size.
    seed: seeds the baselines.
    keep_fitted: keep the fitted methods in ``details['fitted']`` (for `run_adversarial`).
    progress: optional callback.

  Returns:
    `ProtocolResult` with one row per method: image_auroc, pixel_auroc, aupro (None without
    masks), fit_s (on precomputed features; includes JIT compilation, which dominates on tiny
    data, and the probe fits of align='auto'), align (with align='auto': the motion model chosen),
    inference_ms (backbone + scorer per image, one jitted function, compile excluded), size_mb
    (fitted arrays, 1 MB = 1e6 bytes), n_train, n_test; details['scores'][method] the test image scores, details['labels'].
  """
  methods = _check_methods(methods, extractor)
  train_images, test = _prepare(train_images, test, extractor.image_size)
  store = _Store(extractor, batch_size, progress)
  rows, scores, fitted_all = [], {}, {}
  for i, m in enumerate(methods):
    _say(progress, "standard", "fit", m.name, i, len(methods))
    m, choice = resolve_align(m, train_images, extractor, batch_size=batch_size, progress=progress)
    train = store.train(train_images, m.align)
    fitted, error = _fit_or_error(m, train, extractor, seed, progress)
    row = {"method": m.name, "n_train": int(train_images.shape[0]), "n_test": len(test.labels)}
    if choice is not None:
      row["align"] = choice.chosen
    if fitted is None:
      rows.append({**row, "error": error})
      continue
    view = store.test(test.images, m.align, masks=test.masks, train_images=train_images,
                      with_features=False)
    batch = dataclasses.replace(test, images=view.images,
                                masks=test.masks if view.masks is None else view.masks)
    _say(progress, "standard", "score", m.name, i, len(methods))
    result, pred = evaluate(fitted, batch, batch_size=min(batch_size, len(test.labels)),
                            progress=progress)
    rows.append({**row, "image_auroc": result["image_auroc"],
                 "pixel_auroc": result.get("pixel_auroc"), "aupro": result.get("aupro"),
                 # align='auto': the probe fits that chose the alignment are part of the fit's cost
                 "fit_s": fitted.fit_seconds + (0.0 if choice is None else choice.seconds),
                 "inference_ms": result["inference_ms_per_image"],
                 "size_mb": fitted.size_bytes / _MB})
    scores[m.name] = pred.image_scores
    if keep_fitted:
      fitted_all[m.name] = fitted
  return ProtocolResult("standard", rows, {"batch_size": batch_size, "seed": seed},
                        {"scores": scores, "labels": test.labels, "fitted": fitted_all})


def _clean_scores(clean: ProtocolResult | None, methods, n_test: int) -> dict[str, np.ndarray]:
  """Test scores of the methods already evaluated by `run_standard` on the same test set."""
  if clean is None:
    return {}
  if clean.protocol != "standard":
    raise ValueError(f"clean= must be the result of run_standard, got a {clean.protocol!r} result")
  scores = clean.details.get("scores", {})
  out = {}
  for m in methods:
    s = scores.get(m.name)
    if s is not None:
      if len(s) != n_test:
        raise ValueError(f"clean= scored {len(s)} test images for {m.name!r}, this test set has "
                         f"{n_test}: pass the run_standard result of the same data")
      out[m.name] = np.asarray(s)
  return out


# -------------------------------------------------------------------------------------------- Rd-


def run_rd(methods: Sequence[Variant], train_images: Any, test: ImageBatch, *,
           extractor: FeatureExtractor, n_versions: int = perturb.N_RD_VERSIONS,
           settings: perturb.RdSettings = perturb.RdSettings(), seed: int = 0,
           batch_size: int = 16, clean: ProtocolResult | None = None,
           progress: Progress | None = None) -> ProtocolResult:
  """Rd- protocol (paper Section 4.4, Table 4; supplement Tables 1-5).

  Version v = 1..n_versions randomises train and test (`perturb.rd_perturb`, seeded by
  (seed, v, split)); every method is refitted on the randomised training set and tested on the
  randomised test set.

  Args:
    methods, train_images, test, extractor, batch_size, progress: as in `run_standard`.
    n_versions: randomised versions (paper: 5).
    settings: rotation / shift ranges (`perturb.RdSettings`).
    seed: base seed of the versions (and of the baselines).
    clean: optional `run_standard` result on the same data: its scores give the 'normal'
      AUROC; otherwise the methods are fitted on the clean data here.

  Returns:
    `ProtocolResult` with one row per method: normal_auroc, rd_auroc (mean over versions),
    rd_diff = normal_auroc - rd_auroc (smaller is more robust), rd_v1..rd_v<n>;
    details['scores'][v][method] the test scores of version v (0 = normal).
  """
  methods = _check_methods(methods, extractor)
  if (isinstance(n_versions, bool) or not isinstance(n_versions, (int, np.integer))
      or n_versions < 1):
    raise ValueError(f"n_versions must be a positive integer, got {n_versions!r}")
  train_images, test = _prepare(train_images, test, extractor.image_size)
  labels = test.labels
  common = dict(seed=seed, batch_size=batch_size, progress=progress)
  normal: dict[str, Any] = _clean_scores(clean, methods, len(labels))
  todo = [m for m in methods if m.name not in normal]
  if todo:
    normal.update(_fit_score_all("rd", "normal", todo, train_images, test.images, extractor,
                                 **common))
  per_version = {0: normal}
  for v in range(1, n_versions + 1):
    train_v = perturb.rd_perturb(train_images, version=v, split="train", seed=seed,
                                 settings=settings)[0]
    test_v = perturb.rd_perturb(test.images, version=v, split="test", seed=seed,
                                settings=settings)[0]
    per_version[v] = _fit_score_all("rd", f"version {v}/{n_versions}", methods, train_v, test_v,
                                    extractor, **common)
  rows = []
  for m in methods:
    aucs = [_auroc(labels, per_version[v][m.name]) for v in range(n_versions + 1)]
    row: dict[str, Any] = {"method": m.name, "normal_auroc": aucs[0]}
    errors = [s[m.name] for s in per_version.values() if isinstance(s[m.name], str)]
    if errors:
      rows.append({**row, "error": errors[0]})
      continue
    row["rd_auroc"] = float(np.mean(aucs[1:]))
    row["rd_diff"] = aucs[0] - row["rd_auroc"]
    row.update({f"rd_v{v}": aucs[v] for v in range(1, n_versions + 1)})
    rows.append(row)
  return ProtocolResult("rd", rows, {"n_versions": n_versions, "seed": seed,
                                     **dataclasses.asdict(settings)},
                        {"scores": per_version, "labels": labels})


# ---------------------------------------------------------------------------------- contamination


def contamination_split(labels: np.ndarray, n: int, *, seed: int = 0,
                        min_test_anomalous: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Which test images move into training: `perturb.contaminate`'s seeded rule on indices.

  Args:
    labels: array of shape (N,), 0 good / 1 anomalous.
    n: anomalous images to move (fewer when fewer than n + min_test_anomalous exist).
    seed, min_test_anomalous: as `perturb.contaminate`.

  Returns:
    (moved, kept): sorted int arrays of test indices; disjoint, together all N.
  """
  # The records only carry their index, so the selection is exactly the one contaminate()
  # makes on a category whose test split has these labels.
  records = tuple(ImageRecord(Path(str(i)), int(label), "good" if label == 0 else "anomalous")
                  for i, label in enumerate(np.asarray(labels)))
  category = Category("in-memory", Path("."), "folder", train=(), test=records)
  out = perturb.contaminate(category, n, seed=seed, min_test_anomalous=min_test_anomalous)
  moved = np.array(sorted(int(r.path.name) for r in out.train), dtype=np.int64)
  kept = np.array([int(r.path.name) for r in out.test], dtype=np.int64)
  return moved, kept


def run_contamination(methods: Sequence[Variant], train_images: Any, test: ImageBatch, *,
                      extractor: FeatureExtractor, sizes: Sequence[int] = CONTAMINATION_SIZES,
                      seed: int = 0, min_test_anomalous: int = 1, batch_size: int = 16,
                      clean: ProtocolResult | None = None,
                      progress: Progress | None = None) -> ProtocolResult:
  """Contaminated training: N anomalous test images moved into the training set.

  For each N in `sizes`, `contamination_split` picks min(N, available) anomalous test images
  (seeded); they are added to the training set and removed from the test set. The clean model
  (fitted on the clean training set) and the contaminated one are both evaluated on the same
  reduced test set, so the drop measures the contamination only.

  Args:
    methods, train_images, test, extractor, batch_size, progress: as in `run_standard`.
    sizes: the N values (robustness suite: 10 and 40).
    seed: seeds the selection (and the baselines).
    min_test_anomalous: anomalous images kept for testing.
    clean: optional `run_standard` result on the same data (its test scores are reused).

  Returns:
    `ProtocolResult` with one row per (method, N): n_requested, n_moved, n_train, n_test,
    n_test_anomalous, clean_auroc, contaminated_auroc, drop = clean - contaminated;
    details['moved'][N] / details['kept'][N] the test indices moved / kept,
    details['scores'][N][method] the contaminated model's scores of the kept test images.
  """
  methods = _check_methods(methods, extractor)
  sizes = tuple(sizes)
  if not sizes or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0
                      for n in sizes):
    raise ValueError(f"sizes must be non-negative integers, got {sizes}")
  train_images, test = _prepare(train_images, test, extractor.image_size)
  labels = test.labels
  store = _Store(extractor, batch_size, progress)
  clean_scores: dict[str, Any] = _clean_scores(clean, methods, len(labels))
  splits = {n: contamination_split(labels, n, seed=seed, min_test_anomalous=min_test_anomalous)
            for n in sizes}
  results: dict[tuple, dict[str, Any]] = {}  # moved indices -> method -> scores / error
  rows = []
  for n in sizes:
    moved, kept = splits[n]
    key = tuple(moved.tolist())
    if key not in results:  # two N capped to the same images give the same experiment
      results[key] = {}
      for i, m in enumerate(methods):
        _say(progress, "contamination", f"N={n} ({len(moved)} moved)", m.name, i, len(methods))
        train = store.train(train_images, m.align)
        test_set = store.test(test.images, m.align, train_images=train_images)
        if m.name not in clean_scores:
          fitted, error = _fit_or_error(m, train, extractor, seed, progress)
          clean_scores[m.name] = error if fitted is None else fitted.score_features(
              test_set.features, batch_size).image_scores
        dirty = ImageSet(np.concatenate([train.images, test_set.images[moved]]),
                         {k: np.concatenate([v, test_set.features[k][moved]])
                          for k, v in train.features.items()}, None, train.reference)
        fitted, error = _fit_or_error(m, dirty, extractor, seed, progress)
        results[key][m.name] = error if fitted is None else fitted.score_features(
            test_set.subset(kept).features, batch_size).image_scores
    for m in methods:
      row = {"method": m.name, "n_requested": int(n), "n_moved": int(len(moved)),
             "n_train": int(train_images.shape[0] + len(moved)), "n_test": int(len(kept)),
             "n_test_anomalous": int(labels[kept].sum())}
      clean_s, dirty_s = clean_scores[m.name], results[key][m.name]
      error = next((s for s in (clean_s, dirty_s) if isinstance(s, str)), None)
      if error is not None:
        rows.append({**row, "error": error})
        continue
      row["clean_auroc"] = _auroc(labels[kept], clean_s[kept])
      row["contaminated_auroc"] = _auroc(labels[kept], dirty_s)
      row["drop"] = row["clean_auroc"] - row["contaminated_auroc"]
      rows.append(row)
  return ProtocolResult(
      "contamination", rows,
      {"sizes": list(sizes), "seed": seed, "min_test_anomalous": min_test_anomalous},
      {"moved": {n: s[0] for n, s in splits.items()}, "kept": {n: s[1] for n, s in splits.items()},
       "scores": {n: results[tuple(splits[n][0].tolist())] for n in sizes}, "labels": labels})


# ------------------------------------------------------------------------------------- adversarial


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Seeded split of n training images into (fit, held out) index arrays, both sorted.

  round(fraction * n) images (at least 1) are held out; at least 2 stay for the fit.

  Raises:
    ValueError: when n is too small for both.
  """
  n_held = max(1, int(round(fraction * n)))
  if n - n_held < 2:
    raise ValueError(f"the attack protocol holds out {n_held} of the {n} training images (holdout "
                     f"= {fraction}) for the map statistics and the threshold, leaving fewer than "
                     f"2 to fit on: use more training images")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def run_adversarial(methods: Sequence[Variant], train_images: Any, test: ImageBatch, *,
                    extractor: FeatureExtractor, attacks: AttackSuiteConfig = AttackSuiteConfig(),
                    seed: int = 0, batch_size: int = 8,
                    progress: Progress | None = None) -> ProtocolResult:
  """PGD attacks that measure something (OmniAL supp. Section 2), through backbone + scorer.

  A seeded fraction `attacks.holdout` of the training images is held out; every method is fitted
  on the rest (so `run_standard`'s fitted models, which saw every training image, are not
  reused). The held-out good images give each method's map statistics (for the bounded map
  sigmoid((map - mean) / std)) and its image threshold at `attacks.fpr`; then
  `glad_jax.robustness.adversarial.attack_suite` runs, with the same random starts for every
  method: the pixel attack on the bounded map against the masks (untargeted at each
  `pixel_epsilons`, targeted at `targeted_epsilon`), and the one-sided "hide" (anomalous images
  only, pushed down) and "false-alarm" (good images only, pushed up) image attacks.

  Args:
    methods, train_images, test, extractor, progress: as in `run_standard`.
    attacks: budgets, steps, step size, random start, fpr, holdout fraction.
    seed: seeds the holdout split, the fits and the random starts.
    batch_size: images attacked at once (bounds the memory of the backward pass).

  Returns:
    `ProtocolResult` with one row per (method, attack, epsilon) (see `attack_suite`; epsilon in
    1/255 units, attack 'none' = clean, with the threshold), plus 'n_fit' and 'n_holdout';
    details['scores'][method] the image scores under the one-sided attacks,
    details['clean'][method] the clean test scores, details['holdout'] the held-out indices.
  """
  methods = _check_methods(methods, extractor)
  check_suite_config(attacks)
  train_images, test = _prepare(train_images, test, extractor.image_size)
  fit_index, held_index = holdout_split(train_images.shape[0], attacks.holdout, seed)
  fit_images, held_images = train_images[fit_index], train_images[held_index]
  store = _Store(extractor, batch_size, progress)
  key = jax.random.key(seed)
  rows, scores, clean = [], {}, {}
  sizes = {"n_fit": int(fit_index.size), "n_holdout": int(held_index.size)}
  for i, m in enumerate(methods):
    _say(progress, "adversarial", "attack", m.name, i, len(methods))
    train = store.train(fit_images, m.align)
    f, error = _fit_or_error(m, train, extractor, seed, progress)
    if f is None:
      rows.append({"method": m.name, "error": error})
      continue
    view = store.test(test.images, m.align, masks=test.masks, train_images=fit_images,
                      with_features=False)
    held = featurize(extractor, held_images, align=m.align, reference=train.reference,
                     with_features=False)
    # A Partial: the backbone parameters and the fitted state are traced arguments of the
    # attack's one compilation, not constants baked into it.
    score_images = Partial(f.apply, f.params, f.state)
    masks = test.masks if view.masks is None else view.masks
    try:
      method_rows, details = attack_suite(score_images, held.images, view.images, test.labels,
                                          masks, test.has_mask, config=attacks, key=key,
                                          batch_size=batch_size)
    except ValueError as e:  # e.g. constant maps on the held-out images: report, go on
      rows.append({"method": m.name, "error": f"{type(e).__name__}: {e}"})
      continue
    rows += [{"method": m.name, **r, **sizes} for r in method_rows]
    scores[m.name], clean[m.name] = details["scores"], details["clean_scores"]
  settings = {**dataclasses.asdict(attacks), "seed": seed, **sizes}
  settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
  return ProtocolResult("adversarial", rows, settings,
                        {"scores": scores, "clean": clean, "labels": test.labels,
                         "holdout": held_index})


def adversarial_tables(result: ProtocolResult) -> dict[str, list[dict[str, Any]]]:
  """`run_adversarial`'s tidy rows as three wide tables, one row per method.

  Returns:
    {'pixel': method, then pixel AP and pixel AUROC clean / per budget / targeted;
     'hide': image AUROC and detection rate clean / per budget;
     'false-alarm': image AUROC and false-alarm rate clean / per budget}. Values are numbers
    (None where a metric is undefined); column names carry the budget in 1/255 units.
  """
  if result.protocol != "adversarial":
    raise ValueError(f"adversarial_tables needs a run_adversarial result, got {result.protocol!r}")
  tables: dict[str, list[dict[str, Any]]] = {"pixel": [], "hide": [], "false-alarm": []}
  names = list(dict.fromkeys(r["method"] for r in result.rows))
  for name in names:
    rows = [r for r in result.rows if r["method"] == name]
    if any("error" in r for r in rows):
      for t in tables.values():
        t.append({"method": name, "error": rows[0]["error"]})
      continue
    clean = next(r for r in rows if r["attack"] == "none")
    label = lambda r: f"{r['epsilon']:g}" + ("t" if r["attack"] == "pixel-targeted" else "")  # noqa: E731
    pixel = [r for r in rows if r["attack"] in ("pixel", "pixel-targeted")]
    row = {"method": name}
    for metric in ("pixel_ap", "pixel_auroc"):
      row[f"{metric}_clean"] = clean.get(metric)
      row.update({f"{metric}_eps{label(r)}": r.get(metric) for r in pixel})
    tables["pixel"].append(row)
    for attack, rate in (("hide", "detection_rate"), ("false-alarm", "false_alarm_rate")):
      sided = [r for r in rows if r["attack"] == attack]
      row = {"method": name, "image_auroc_clean": clean["image_auroc"]}
      row.update({f"image_auroc_eps{label(r)}": r["image_auroc"] for r in sided})
      row[f"{rate}_clean"] = clean[rate]
      row.update({f"{rate}_eps{label(r)}": r[rate] for r in sided})
      tables[attack].append(row)
  for table, metrics_ in (("pixel", ("pixel_ap", "pixel_auroc")),
                          ("hide", ("image_auroc", "detection_rate")),
                          ("false-alarm", ("image_auroc",))):
    for row in tables[table]:
      if "error" not in row:
        for metric in metrics_:
          row[f"{metric}_half_at"] = _half_budget(row, metric)
  return tables


def _half_budget(row: Mapping[str, Any], metric: str) -> float | None:
  """The smallest untargeted budget (1/255 units) at which `metric` falls below half its clean
  value; None if it never does (or the metric is undefined)."""
  clean = row.get(f"{metric}_clean")
  if clean is None:
    return None
  prefix = f"{metric}_eps"
  budgets = sorted(float(k[len(prefix):]) for k in row
                   if k.startswith(prefix) and not k.endswith("t") and row[k] is not None)
  return next((e for e in budgets if row[f"{prefix}{e:g}"] < clean / 2), None)


__all__ = [
    "CONTAMINATION_SIZES",
    "FittedMethod",
    "ImageSet",
    "ProtocolResult",
    "Variant",
    "adversarial_tables",
    "contamination_split",
    "default_methods",
    "featurize",
    "fit_method",
    "holdout_split",
    "make_extractor",
    "method_variants",
    "run_adversarial",
    "run_contamination",
    "run_rd",
    "run_standard",
    "select_methods",
    "variant",
]
