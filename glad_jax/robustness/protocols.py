"""Comparison and robustness protocols over in-memory data (paper Sections 4.2-4.4, OmniAL PGD).

Every protocol compares a list of `Method`s -- GLAD, its ablations of the paper's Table 1
(global-only, EM instead of K-MLE, no OAS, layer subsets) and the baselines MahaAD, PaDiM and
PatchCore -- on the SAME backbone features: each image set goes through one shared
`FeatureExtractor` once (every layer any method needs), and every method fits on those arrays.

  run_standard       fit on train, score test: image AUROC, pixel AUROC, AUPRO, fit seconds,
                     inference ms per image (backbone + scorer, one jitted function), model MB.
  run_rd             Rd- (Section 4.4, Table 4): n seeded randomised versions of train + test
                     (`glad_jax.data.perturb.rd_perturb`); fit and test on each; image AUROC on
                     normal vs randomised data and their difference.
  run_contamination  N anomalous test images moved into training (`perturb.contaminate`'s rule),
                     removed from the test set; AUROC of the clean and the contaminated model on
                     the same reduced test set, and the drop.
  run_adversarial    PGD (OmniAL) on the image score, with gradients through the backbone and the
                     scorer: image AUROC under attack for each budget epsilon.

Data: training images are a uint8 batch (N, H, W, 3) (or anything `GLAD.fit` accepts), the test
split an `ImageBatch` (`glad_jax.data.mvtec.load_split`). Images are resized to the extractor's
input size S; masks to S x S (nearest). Methods whose GLAD config aligns images
(``align != 'none'``) see images aligned on the first training image, and their test masks are
warped with the same motions, so maps and masks share a frame (alignment time is excluded from
the inference time, as in the paper's Table 1). Baselines never align (their papers do not).

No printing: progress goes through an optional ``progress(stage, info)`` callback with GLAD's
stages ('features', 'global', 'local', 'score') plus 'protocol' (info: protocol, step, method,
done, total).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import metrics
from glad_jax import scoring
from glad_jax.backbones import FeatureExtractor
from glad_jax.baselines import BASELINES, get_baseline, model_size_bytes
from glad_jax.baselines import MahaADConfig, PadimConfig, PatchcoreConfig
from glad_jax.config import GLADConfig
from glad_jax.data import perturb
from glad_jax.data.mvtec import Category, ImageBatch, ImageRecord
from glad_jax.model import GLAD, Prediction, prepare_images
from glad_jax.robustness.adversarial import PGDConfig, directions_from_labels, pgd_attack

Progress = Callable[[str, Mapping[str, Any]], None]
BASELINE_NAMES = ("mahaad", "padim", "patchcore")
CONTAMINATION_SIZES = (10, 40)  # anomalous images moved into training (robustness suite)
_MB = 1e6


# ------------------------------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of a comparison: a GLAD configuration or a baseline with its config.

  Attributes:
    name: row label, unique within a comparison (e.g. 'glad', 'glad-global', 'padim').
    glad: the GLAD configuration, or None for a baseline.
    baseline: registry name of the baseline ('mahaad', 'padim', 'patchcore'), or None.
    baseline_config: the baseline's config (its `config_cls` instance).
  """

  name: str
  glad: GLADConfig | None = None
  baseline: str | None = None
  baseline_config: Any = None

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.glad.layers if self.glad is not None else self.baseline_config.layers)

  @property
  def align(self) -> str:
    return self.glad.align if self.glad is not None else "none"


def glad_method(config: GLADConfig, name: str = "glad") -> Method:
  return Method(name, glad=config)


def baseline_method(name: str, config: GLADConfig) -> Method:
  """A baseline on the layers of a GLAD config, with its paper's other defaults.

  MahaAD and PaDiM use every layer of `config.layers` (both use layers 1-3 in their papers,
  as GLAD); PatchCore its two deepest (paper: layers 2 and 3); PaDiM's d' follows the backbone
  (`PadimConfig.for_backbone`).
  """
  layers = tuple(config.layers)
  if name == "mahaad":
    cfg = MahaADConfig(layers=layers)
  elif name == "padim":
    cfg = PadimConfig.for_backbone(config.backbone, layers=layers)
  elif name == "patchcore":
    cfg = PatchcoreConfig(layers=layers[-2:])
  else:
    get_baseline(name)  # raises, listing the known names
    cfg = BASELINES[name].config_cls(layers=layers)
  return Method(name, baseline=name, baseline_config=cfg)


def glad_ablations(config: GLADConfig) -> tuple[Method, ...]:
  """The GLAD variants of the paper's Table 1 that share `config`'s backbone features.

  'glad-global' (no local weights), 'glad-em' (EM instead of K-MLE), 'glad-no-oas' (sample
  covariances), and one 'glad-<layers>' per subset of all but one of `config.layers` (Table 1's
  layer pairs 1+2, 2+3, 1+3). Variants identical to `config` are left out.
  """
  variants = [("glad-global", config.replace(local=False)),
              ("glad-em", config.replace(algorithm="em")),
              ("glad-no-oas", config.replace(use_oas=False))]
  if len(config.layers) > 1:
    for subset in itertools.combinations(config.layers, len(config.layers) - 1):
      variants.append(("glad-" + "+".join(subset), config.replace(layers=tuple(subset))))
  return tuple(Method(name, glad=cfg) for name, cfg in variants if cfg != config)


def default_methods(config: GLADConfig, *, ablations: bool = True,
                    baselines: Sequence[str] = BASELINE_NAMES) -> tuple[Method, ...]:
  """GLAD, optionally its Table 1 ablations, and the baselines, all on `config`'s backbone."""
  methods = [glad_method(config)]
  if ablations:
    methods += glad_ablations(config)
  return tuple(methods) + tuple(baseline_method(b, config) for b in baselines)


def select_methods(config: GLADConfig, names: Sequence[str]) -> tuple[Method, ...]:
  """Methods by name, in the given order (see `default_methods` for the names).

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


def make_extractor(config: GLADConfig, methods: Sequence[Method]) -> FeatureExtractor:
  """The shared backbone: `config`'s backbone, weights and image size; every layer any method
  uses."""
  from glad_jax.backbones import create_feature_extractor

  layers = []
  for m in methods:
    layers += [name for name in m.layers if name not in layers]
  return create_feature_extractor(config.backbone, tuple(layers), config.weights, config.image_size,
                                  seed=config.seed)


def _check_methods(methods: Sequence[Method], extractor: FeatureExtractor) -> tuple[Method, ...]:
  methods = tuple(methods)
  if not methods:
    raise ValueError("no method to compare (methods is empty)")
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise ValueError(f"method names must be unique, got {names}")
  for m in methods:
    if (m.glad is None) == (m.baseline is None):
      raise ValueError(f"method {m.name!r} must have exactly one of glad= or baseline=")
    if m.baseline is not None:
      config_cls = get_baseline(m.baseline).config_cls  # raises for an unknown name
      if not isinstance(m.baseline_config, config_cls):
        raise ValueError(f"method {m.name!r}: baseline_config must be a {config_cls.__name__}, "
                         f"got {type(m.baseline_config).__name__} (see baseline_method)")
    missing = [name for name in m.layers if name not in extractor.layers]
    if missing:
      raise ValueError(f"method {m.name!r} uses layer(s) {missing} that the shared extractor does "
                       f"not compute (it has {extractor.layers}); build it with make_extractor")
    if m.glad is not None:
      if m.glad.backbone != extractor.name or m.glad.image_size != extractor.image_size:
        raise ValueError(
            f"method {m.name!r} is configured for backbone {m.glad.backbone!r} at "
            f"{m.glad.image_size} px but the shared extractor is {extractor.name!r} at "
            f"{extractor.image_size} px: every method must share one backbone")
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
    align: motion model ('none' or a `glad_jax.align` model).
    reference: alignment reference (S, S, 3); None = images[0] (a training set).
    masks: optional bool array of shape (N, S, S), warped with the images.
    with_features: False skips the backbone (images only).
    batch_size: backbone batch size.
    progress: optional callback.

  Returns:
    An `ImageSet`.
  """
  if align != "none":
    from glad_jax import align as align_lib

    reference = images[0].copy() if reference is None else reference
    out = align_lib.align(images, align, reference=reference, masks=masks)
    images = np.asarray(out.images)
    masks = None if out.masks is None else np.asarray(out.masks)
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


def _glad_apply(extractor_apply, quantile: float, size: tuple[int, int], params, state, images):
  feats = extractor_apply(params, images)
  out = scoring.score_unchecked(state["layers"], feats, state["mask"], quantile, size)
  return out.image_score, out.anomaly_map


def _baseline_apply(score_fn, extractor_apply, out_size: int, params, state, images):
  return score_fn(state, extractor_apply(params, images), out_size)


@dataclasses.dataclass
class FittedMethod:
  """A fitted method behind one interface.

  Attributes:
    method: the `Method`.
    state: pytree of the fitted scorer (GLAD: {'layers': LayerModels, 'mask'}; baselines: state).
    apply: pure, differentiable ``apply(params, state, images (B, S, S, 3) uint8 or float in
      [0, 1]) -> (image scores (B,), anomaly maps (B, S, S))``: backbone + scorer.
    params: the backbone's parameters.
    fit_seconds: wall time of the fit on precomputed features (backbone excluded; includes the
      JIT compilation of the fit's functions the first time a shape is seen).
    size_bytes: bytes of the fitted arrays (backbone weights excluded: shared by all methods).
    model: the `GLAD` object or the baseline state.
    image_size: S, the side of the images and anomaly maps.
  """

  method: Method
  state: Any
  apply: Callable
  params: Any
  fit_seconds: float
  size_bytes: int
  model: Any
  image_size: int
  _jitted: Callable | None = None

  @property
  def jitted(self) -> Callable:
    if self._jitted is None:
      self._jitted = jax.jit(self.apply)
    return self._jitted

  def score_features(self, features: Mapping[str, np.ndarray], batch_size: int = 16
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), anomaly maps (N, S, S)) of precomputed features {layer: (N, h, w, d)}."""
    layers = self.method.layers
    n = next(iter(features.values())).shape[0]

    def one(chunk):
      if self.method.glad is not None:
        pred = self.model.score_features(chunk)
        return pred.image_scores, pred.anomaly_maps
      s, m = get_baseline(self.method.baseline).score(self.model, chunk, out_size=self.image_size)
      return np.asarray(s), np.asarray(m)

    return _in_chunks(one, {k: features[k] for k in layers}, n, min(batch_size, n))

  def score(self, images: np.ndarray, *, batch_size: int = 16,
            progress: Progress | None = None) -> Prediction:
    """End-to-end scores of prepared images (N, S, S, 3) (the interface `commands.evaluate` uses).

    Every chunk is padded to `batch_size`, so a warm-up call on one image compiles the shape
    that the timed call runs.
    """
    n = images.shape[0]

    def one(chunk):
      s, m = self.jitted(self.params, self.state, jnp.asarray(chunk))
      return np.asarray(s), np.asarray(m)

    def cb(done):
      if progress is not None:
        progress("score", {"done": done, "total": n})

    scores, maps = _in_chunks(one, images, n, batch_size, callback=cb)
    return Prediction(scores, maps, None, None)


def _pad(x, m: int):
  """Pads the leading axis of x (array or dict of arrays) to m rows by repeating the last row."""
  if isinstance(x, Mapping):
    return {k: _pad(v, m) for k, v in x.items()}
  if x.shape[0] == m:
    return x
  return np.concatenate([x, np.repeat(x[-1:], m - x.shape[0], axis=0)])


def _in_chunks(fn, x, n: int, batch: int, callback=None) -> tuple[np.ndarray, np.ndarray]:
  """fn over chunks of `batch` rows (the last padded: one compiled shape), outputs trimmed."""
  outs = []
  for start in range(0, n, batch):
    take = (lambda v: v[start:start + batch])
    chunk = {k: take(v) for k, v in x.items()} if isinstance(x, Mapping) else take(x)
    m = min(batch, n - start)
    s, a = fn(_pad(chunk, batch))
    outs.append((s[:m], a[:m]))
    if callback is not None:
      callback(start + m)
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _method_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def fit_method(method: Method, train: ImageSet, extractor: FeatureExtractor, *, seed: int = 0,
               progress: Progress | None = None) -> FittedMethod:
  """Fits one method on precomputed training features.

  Args:
    method: the `Method`.
    train: the training `ImageSet` (features of every layer the method uses).
    extractor: the shared backbone (its parameters make the end-to-end `apply`).
    seed: seeds the baselines' randomness (GLAD uses its config's seed).
    progress: optional callback, passed to `GLAD.fit_features`.

  Returns:
    A `FittedMethod`.

  Raises:
    ValueError: when the method cannot be fitted on these data (e.g. a degenerate covariance).
  """
  size = extractor.image_size
  apply_fn = _subset_extractor(extractor, method.layers).apply
  feats = {name: train.features[name] for name in method.layers}
  t0 = time.perf_counter()
  if method.glad is not None:
    cfg = method.glad
    model = GLAD(cfg, extractor=extractor)
    model.fit_features(feats, aligned_images=train.images, progress=progress)
    seconds = time.perf_counter() - t0
    model.reference = train.reference
    state = {"layers": model.layer_models(),
             "mask": None if model.mask is None else jnp.asarray(model.mask)}
    apply = functools.partial(_glad_apply, apply_fn, float(cfg.quantile), (size, size))
    nbytes = model.model_size_bytes()
  else:
    baseline = get_baseline(method.baseline)
    model = baseline.fit(feats, method.baseline_config, _method_key(seed, method.name))
    jax.block_until_ready(model)
    seconds = time.perf_counter() - t0
    state = model
    apply = functools.partial(_baseline_apply, baseline.score, apply_fn, size)
    nbytes = model_size_bytes(model)
  return FittedMethod(method, state, apply, extractor.params, seconds, nbytes, model, size)


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


def _fit_or_error(method: Method, train: ImageSet, extractor, seed, progress):
  try:
    return fit_method(method, train, extractor, seed=seed, progress=progress), None
  except ValueError as e:  # degenerate data for this method: report it, go on with the others
    return None, f"{type(e).__name__}: {e}"


def _fit_score_all(protocol: str, step: str, methods, train_images, test_images, extractor, *,
                   seed, batch_size, progress) -> dict[str, np.ndarray | str]:
  """Fits every method on one (train, test) pair; test image scores per method, or an error."""
  store = _Store(extractor, batch_size, progress)
  out: dict[str, np.ndarray | str] = {}
  for i, m in enumerate(methods):
    _say(progress, protocol, step, m.name, i, len(methods))
    train = store.train(train_images, m.align)
    fitted, error = _fit_or_error(m, train, extractor, seed, progress)
    if fitted is None:
      out[m.name] = error
      continue
    test = store.test(test_images, m.align, train_images=train_images)
    out[m.name] = fitted.score_features(test.features, batch_size)[0]
  return out


def _auroc(labels: np.ndarray, scores) -> float | None:
  return None if isinstance(scores, str) else float(metrics.image_auroc(labels, scores))


# ---------------------------------------------------------------------------------------- standard


def run_standard(methods: Sequence[Method], train_images: Any, test: ImageBatch, *,
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
    data), inference_ms (backbone + scorer per image, one jitted function, compile excluded),
    size_mb (fitted arrays, 1 MB = 1e6 bytes), n_train,
    n_test; details['scores'][method] the test image scores, details['labels'].
  """
  from glad_jax.commands import evaluate

  methods = _check_methods(methods, extractor)
  train_images, test = _prepare(train_images, test, extractor.image_size)
  store = _Store(extractor, batch_size, progress)
  rows, scores, fitted_all = [], {}, {}
  for i, m in enumerate(methods):
    _say(progress, "standard", "fit", m.name, i, len(methods))
    train = store.train(train_images, m.align)
    fitted, error = _fit_or_error(m, train, extractor, seed, progress)
    row = {"method": m.name, "n_train": int(train_images.shape[0]), "n_test": len(test.labels)}
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
                 "fit_s": fitted.fit_seconds, "inference_ms": result["inference_ms_per_image"],
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


def run_rd(methods: Sequence[Method], train_images: Any, test: ImageBatch, *,
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


def run_contamination(methods: Sequence[Method], train_images: Any, test: ImageBatch, *,
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
              test_set.features, batch_size)[0]
        dirty = ImageSet(np.concatenate([train.images, test_set.images[moved]]),
                         {k: np.concatenate([v, test_set.features[k][moved]])
                          for k, v in train.features.items()}, None, train.reference)
        fitted, error = _fit_or_error(m, dirty, extractor, seed, progress)
        results[key][m.name] = error if fitted is None else fitted.score_features(
            test_set.subset(kept).features, batch_size)[0]
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


def _attack(apply, steps: int, step_size_factor: float, random_start: bool, params, state,
            images, epsilon, signs, key):
  """PGD on one chunk; params and state are traced arguments (not constants baked into XLA)."""
  return pgd_attack(lambda x: apply(params, state, x)[0], images, epsilon, steps=steps,
                    step_size=step_size_factor * epsilon / steps, direction=signs,
                    key=key if random_start else None)


def _check_pgd(pgd: PGDConfig) -> None:
  if not isinstance(pgd, PGDConfig):
    raise ValueError(f"pgd must be a PGDConfig, got {type(pgd).__name__}")
  if not pgd.epsilons or any(e < 0 for e in pgd.epsilons):
    raise ValueError(f"PGDConfig.epsilons must be a non-empty tuple of budgets >= 0 (e.g. "
                     f"8/255), got {pgd.epsilons}")
  if isinstance(pgd.steps, bool) or not isinstance(pgd.steps, (int, np.integer)) or pgd.steps < 1:
    raise ValueError(f"PGDConfig.steps must be a positive integer, got {pgd.steps!r}")
  if pgd.step_size_factor < 0:
    raise ValueError(f"PGDConfig.step_size_factor must be >= 0, got {pgd.step_size_factor}")


def epsilon_label(epsilon: float) -> str:
  """Column name of a budget: 'auroc_eps8' for 8/255."""
  return f"auroc_eps{round(epsilon * 255, 3):g}"


def attack_scores(fitted: FittedMethod, images: np.ndarray, labels: np.ndarray, *,
                  pgd: PGDConfig = PGDConfig(), seed: int = 0, batch_size: int = 8
                  ) -> tuple[np.ndarray, dict[float, np.ndarray]]:
  """Clean and attacked image scores of one fitted method (OmniAL's PGD protocol).

  Normal images are pushed up and anomalous ones down (`directions_from_labels`). One
  compilation serves every chunk and budget (epsilon is traced; the last chunk is padded).

  Args:
    fitted: a `FittedMethod`.
    images: uint8 array of shape (N, S, S, 3), prepared (and aligned) as the method expects.
    labels: array of shape (N,), 0 good / 1 anomalous.
    pgd: budgets, steps and step-size rule.
    seed: seeds the random starts (budget i, chunk j: fold_in(fold_in(key, i), j)).
    batch_size: images attacked at once (bounds the memory of the backward pass).

  Returns:
    (clean scores (N,), {epsilon: attacked scores (N,)}).
  """
  x = np.asarray(images, np.float32) / 255.0
  signs = np.asarray(directions_from_labels(labels))
  n = x.shape[0]
  b = min(batch_size, n)
  attack = jax.jit(functools.partial(_attack, fitted.apply, pgd.steps, pgd.step_size_factor,
                                     pgd.random_start))
  key = jax.random.key(seed)

  def scores_of(batch):
    return np.asarray(fitted.jitted(fitted.params, fitted.state, jnp.asarray(batch))[0])

  clean = _in_chunks(lambda c: (scores_of(c), np.zeros(len(c))), x, n, b)[0]
  attacked = {}
  for i, eps in enumerate(pgd.epsilons):
    out = []
    for j, start in enumerate(range(0, n, b)):
      m = min(b, n - start)
      chunk, sign = _pad(x[start:start + b], b), _pad(signs[start:start + b], b)
      k = jax.random.fold_in(jax.random.fold_in(key, i), j)
      adv = attack(fitted.params, fitted.state, jnp.asarray(chunk), jnp.float32(eps),
                   jnp.asarray(sign), k)
      out.append(scores_of(adv)[:m])
    attacked[float(eps)] = np.concatenate(out)
  return clean, attacked


def run_adversarial(methods: Sequence[Method], train_images: Any, test: ImageBatch, *,
                    extractor: FeatureExtractor, pgd: PGDConfig = PGDConfig(), seed: int = 0,
                    batch_size: int = 8, fitted: Mapping[str, FittedMethod] | None = None,
                    progress: Progress | None = None) -> ProtocolResult:
  """Image AUROC under PGD attack (OmniAL supp. Section 2), through backbone + scorer.

  Args:
    methods, train_images, test, extractor, progress: as in `run_standard`.
    pgd: budgets (default {1, 2, 4, 8}/255), steps (5), step-size rule, random start.
    seed: seeds the random starts (and the baselines).
    batch_size: images attacked at once.
    fitted: optional fitted methods by name (``run_standard(..., keep_fitted=True)``'s
      details['fitted']); the others are fitted here.

  Returns:
    `ProtocolResult` with one row per method: clean_auroc, auroc_eps<e> per budget (e in
    1/255 units), drop = clean_auroc - the AUROC at the largest budget;
    details['clean'][method], details['attacked'][method][epsilon]: image scores.
  """
  methods = _check_methods(methods, extractor)
  _check_pgd(pgd)
  train_images, test = _prepare(train_images, test, extractor.image_size)
  labels = test.labels
  store = _Store(extractor, batch_size, progress)
  fitted = dict(fitted or {})
  rows, clean_all, attacked_all = [], {}, {}
  for i, m in enumerate(methods):
    _say(progress, "adversarial", "attack", m.name, i, len(methods))
    f = fitted.get(m.name)
    if f is None:
      f, error = _fit_or_error(m, store.train(train_images, m.align), extractor, seed, progress)
      if f is None:
        rows.append({"method": m.name, "error": error})
        continue
    view = store.test(test.images, m.align, train_images=train_images, with_features=False)
    clean, attacked = attack_scores(f, view.images, labels, pgd=pgd, seed=seed,
                                    batch_size=batch_size)
    row = {"method": m.name, "clean_auroc": _auroc(labels, clean)}
    row.update({epsilon_label(e): _auroc(labels, s) for e, s in attacked.items()})
    row["drop"] = row["clean_auroc"] - row[epsilon_label(max(pgd.epsilons))]
    rows.append(row)
    clean_all[m.name], attacked_all[m.name] = clean, attacked
  return ProtocolResult(
      "adversarial", rows,
      {"epsilons": [float(e) for e in pgd.epsilons], "steps": pgd.steps,
       "step_size_factor": pgd.step_size_factor, "random_start": pgd.random_start, "seed": seed},
      {"clean": clean_all, "attacked": attacked_all, "labels": labels})


__all__ = [
    "BASELINE_NAMES",
    "CONTAMINATION_SIZES",
    "FittedMethod",
    "ImageSet",
    "Method",
    "ProtocolResult",
    "attack_scores",
    "baseline_method",
    "contamination_split",
    "default_methods",
    "epsilon_label",
    "featurize",
    "fit_method",
    "glad_ablations",
    "glad_method",
    "make_extractor",
    "run_adversarial",
    "run_contamination",
    "run_rd",
    "run_standard",
    "select_methods",
]
