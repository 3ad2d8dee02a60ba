"""Label-free validation of a fitted model: synthetic defects in held-out good images (issue 16).

A user setting up a line has no anomalous images, and every automatic choice of ours must be made without
test labels. `validate` measures what can be measured with good images only:

* synthetic-defect detection: the held-out good images (negatives) against defective copies of them
  (positives, `glad_jax.synthetic`: cut-paste patches, scratches, blobs of another image's content):
  image AUROC, pixel AUROC and AUPRO (`glad_jax.metrics`), per defect kind and over all kinds together;
* the false-positive rate of the clean held-out images at the model's stored image threshold (and of their
  pixels at the pixel threshold), when the model is calibrated, and the share of synthetic defects (and of
  their pixels) flagged at those thresholds.

Synthetic defects are not real ones: the numbers rank settings and catch broken models, they do not predict
the AUROC on a line's real defects. When the held-out images are the ones the thresholds were calibrated on
(``glad fit`` uses validation/good when present), their FPR only reproduces the calibration target.

`validate` takes anything with ``score(images) -> Prediction`` (``image_scores`` (N,), ``anomaly_maps``
(N, S, S)) and, optionally, ``image_threshold`` / ``pixel_threshold``: the `glad_jax.model.GLAD` facade, or
a registry method's state behind `glad_jax.evaluation.FunctionalModel`. Images are first resized to the
model's input size S (so that defects and masks are drawn at the maps' resolution); when the model has a
mask (texture margin, object mask) and does not align images, defects are drawn inside it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from glad_jax import metrics
from glad_jax import synthetic
from glad_jax.synthetic import DefectConfig

ALL = "all"  # the row / entry pooling every defect kind
Progress = Callable[[str, Mapping[str, Any]], None]


# ------------------------------------------------------------------------------------------ data


def held_out_good(category) -> tuple[tuple, str]:
  """The good images of a category that the model was not fitted on, and the split they come from.

  validation/good when the category has it, otherwise the good images of test/, otherwise (a plain folder
  of good images) the folder's images. The anomalous test images are never used.

  Args:
    category: a `glad_jax.data.mvtec.Category`.

  Returns:
    (records, split name): 'validation/good', 'test/good' or 'folder'.

  Raises:
    ValueError: an MVTec-layout category with neither validation/good nor test/good images.
  """
  if category.validation:
    return tuple(r for r in category.validation if r.label == 0), "validation/good"
  good_test = tuple(r for r in category.test if r.label == 0)
  if good_test:
    return good_test, "test/good"
  if category.layout == "folder":
    return tuple(category.train), "folder"
  raise ValueError(f"{category.root} has no held-out good images (validation/good or test/good); its "
                   f"train/good images are not used because the model was fitted on them")


# ----------------------------------------------------------------------------------------- model


def model_image_size(model) -> int | None:
  """The side S of the images the model scores (config, image_size, its extractor's or state's), or None."""
  for get in (lambda m: m.config.image_size, lambda m: m.image_size, lambda m: m.extractor.image_size,
              lambda m: m.state.image_size):
    try:
      size = get(model)
    except AttributeError:
      continue
    if isinstance(size, (int, np.integer)):
      return int(size)
  return None


def _aligns(model) -> bool:
  config = getattr(model, "config", None)
  if config is not None and getattr(config, "align", "none") != "none":
    return True
  return bool(getattr(getattr(model, "state", None), "aligns", False))


def model_mask(model) -> np.ndarray | None:
  """The model's (S, S) bool mask (where it looks for anomalies), or None."""
  for get in (lambda m: m.mask, lambda m: m.state.mask):
    try:
      mask = get(model)
    except AttributeError:
      continue
    if mask is not None:
      return np.asarray(mask, bool)
  return None


def _threshold(model, name: str) -> float | None:
  """A stored threshold (the model's, else its state's) as a float; None when absent or NaN."""
  value = getattr(model, name, None)
  if value is None:
    value = getattr(getattr(model, "state", None), name, None)
  if value is None:
    return None
  value = float(np.asarray(value))
  return value if np.isfinite(value) else None


def _score(model, images: np.ndarray, batch_size: int, progress: Progress | None):
  """(image scores (N,), anomaly maps (N, S, S)) as NumPy, passing batch_size/progress when accepted."""
  try:
    params = inspect.signature(model.score).parameters
  except (TypeError, ValueError):
    params = {}
  kwargs = {}
  if "batch_size" in params:
    kwargs["batch_size"] = batch_size
  if "progress" in params and progress is not None:
    kwargs["progress"] = progress
  pred = model.score(images, **kwargs)
  return np.asarray(pred.image_scores, np.float64), np.asarray(pred.anomaly_maps)


def prepare(images, size: int | None) -> np.ndarray:
  """uint8 RGB batch (N, S, S, 3) from (N, H, W[, 1|3]) uint8 images, resized (bilinear) to S when given."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
    raise ValueError(f"good_images must be uint8 images of shape (N, H, W) or (N, H, W, 3), got "
                     f"{x.dtype} {x.shape}")
  if x.shape[0] == 0:
    raise ValueError("no good image to validate on (empty batch)")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if size is None or x.shape[1:3] == (size, size):
    return x
  from PIL import Image

  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in x])


def _fit_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Masks resized (nearest) to the maps' resolution when a model returns maps of another size."""
  if masks.shape[1:] == shape:
    return masks
  from PIL import Image

  return np.stack([np.asarray(Image.fromarray(m).resize(shape[::-1], Image.NEAREST)) for m in masks])


# ---------------------------------------------------------------------------------------- metrics


def _detection(clean_scores, clean_maps, def_scores, def_maps, def_masks, image_thr, pixel_thr) -> dict:
  """Metrics of clean (negatives) vs defective (positives) images of one kind (or all kinds)."""
  labels = np.concatenate([np.zeros(len(clean_scores), int), np.ones(len(def_scores), int)])
  scores = np.concatenate([clean_scores, def_scores])
  maps = np.concatenate([clean_maps, def_maps])
  masks = np.concatenate([np.zeros(clean_maps.shape, bool), def_masks])
  out = {"n_defective": int(len(def_scores)),
         "mean_area": float(def_masks.mean()),  # fraction of the image
         "image_auroc": metrics.image_auroc(labels, scores),
         "pixel_auroc": metrics.pixel_auroc(masks, maps),
         "aupro": metrics.aupro(masks, maps)}
  if image_thr is not None:
    out["detected"] = float(np.mean(def_scores > image_thr))  # recall at the stored threshold
  if pixel_thr is not None:
    out["pixel_recall"] = float(np.mean(def_maps[def_masks] > pixel_thr))
  return out


def validate(model, good_images, seed: int = 0, kinds: Sequence[str] = synthetic.KINDS,
             n_per_image: int = 1, *, config: DefectConfig = DefectConfig(), sources=None,
             batch_size: int = 16, progress: Progress | None = None) -> dict[str, Any]:
  """Synthetic-defect detection and clean false-positive rates of a fitted model.

  Args:
    model: anything with ``score(images) -> Prediction`` (a fitted `GLAD`, a `FunctionalModel`), and
      optionally ``image_threshold`` / ``pixel_threshold`` (None or NaN when not calibrated).
    good_images: uint8 array (N, H, W, 3) or (N, H, W) of held-out good images (not the training images,
      not anomalous images); resized to the model's input size.
    seed: seeds the defects (`glad_jax.synthetic.add_defects`).
    kinds: defect kinds among `glad_jax.synthetic.KINDS`.
    n_per_image: defective copies of each good image per kind.
    config: defect sizes and ranges (default area 0.05% to 2% of the image).
    sources: optional uint8 images (M, S, S, 3) the cut-paste patches and blob contents come from
      (default: the good images themselves).
    batch_size: scoring batch size (passed when `model.score` accepts it).
    progress: optional callback passed to `model.score` when it accepts one.

  Returns:
    A JSON-serialisable dict: ``n_good``, ``n_per_image``, ``seed``, ``kinds``, ``area`` (low, high),
    ``image_size``, ``defects_in_mask`` (whether defects were drawn inside the model's mask);
    ``per_kind[kind]`` and ``overall`` (every kind pooled against the same clean images), each with
    ``n_defective``, ``mean_area`` (fraction of the image), ``image_auroc``, ``pixel_auroc``, ``aupro``,
    and when calibrated ``detected`` (share of defective images above the image threshold) and
    ``pixel_recall`` (share of defect pixels above the pixel threshold); ``image_threshold``,
    ``image_fpr`` (share of clean images above it), ``pixel_threshold``, ``pixel_fpr`` (share of clean
    pixels above it, inside the model's mask), None when the model is not calibrated.

  Raises:
    ValueError: bad images, kinds or config; images too small for the requested defect sizes.
  """
  size = model_image_size(model)
  x = prepare(good_images, size)
  kinds = tuple(kinds)
  synthetic.check_config(config)
  try:
    synthetic.pixel_range(x.shape[1:3], config.area)
  except ValueError as e:
    raise ValueError(f"the model scores {x.shape[1]}x{x.shape[2]} images: {e}") from None
  mask = model_mask(model)
  allowed = None
  if mask is not None and not _aligns(model) and mask.shape == x.shape[1:3]:
    allowed = mask  # defects where the model looks (aligned models: the mask is in the reference frame)
  if sources is not None:
    sources = prepare(sources, size)
  defects = synthetic.defect_set(x, kinds, seed=seed, n_per_image=n_per_image, config=config,
                                 sources=sources, allowed=allowed)

  image_thr, pixel_thr = _threshold(model, "image_threshold"), _threshold(model, "pixel_threshold")
  clean_scores, clean_maps = _score(model, x, batch_size, progress)
  scored = {}
  for kind, (images, masks) in defects.items():
    s, m = _score(model, images, batch_size, progress)
    scored[kind] = (s, m, _fit_masks(masks, m.shape[1:]))
  per_kind = {kind: _detection(clean_scores, clean_maps, *scored[kind], image_thr, pixel_thr)
              for kind in kinds}
  pooled = [np.concatenate([scored[k][i] for k in kinds]) for i in range(3)]
  overall = _detection(clean_scores, clean_maps, *pooled, image_thr, pixel_thr)

  pixel_fpr = None
  if pixel_thr is not None:
    region = mask if mask is not None and mask.shape == clean_maps.shape[1:] else np.ones(
        clean_maps.shape[1:], bool)
    pixel_fpr = float(np.mean(clean_maps[:, region] > pixel_thr))
  return {
      "n_good": int(x.shape[0]), "n_per_image": int(n_per_image), "seed": int(seed), "kinds": list(kinds),
      "area": [float(a) for a in config.area], "image_size": int(x.shape[1]),
      "defects_in_mask": allowed is not None,
      "per_kind": per_kind, "overall": overall,
      "image_threshold": image_thr,
      "image_fpr": None if image_thr is None else float(np.mean(clean_scores > image_thr)),
      "pixel_threshold": pixel_thr, "pixel_fpr": pixel_fpr,
  }


def result_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Table rows of a `validate` result: one per defect kind, then 'all' (the pooled kinds)."""
  rows = []
  for kind, entry in [*result["per_kind"].items(), (ALL, result["overall"])]:
    row = {"defects": kind, "n_good": result["n_good"], "n_defective": entry["n_defective"],
           "mean_area_pct": 100.0 * entry["mean_area"], "image_auroc": entry["image_auroc"],
           "pixel_auroc": entry["pixel_auroc"], "aupro": entry["aupro"]}
    for key in ("detected", "pixel_recall"):
      if key in entry:
        row[key] = entry[key]
    rows.append(row)
  return rows


def threshold_summary(result: Mapping[str, Any]) -> str:
  """One line on the clean held-out images' false-positive rates at the stored thresholds."""
  if result["image_threshold"] is None:
    return "thresholds: the model is not calibrated (no stored image or pixel threshold)"
  text = (f"clean held-out images above the image threshold {result['image_threshold']:.4g}: "
          f"{result['image_fpr']:.1%} of {result['n_good']}")
  if result["pixel_threshold"] is not None:
    text += (f"; clean pixels above the pixel threshold {result['pixel_threshold']:.4g}: "
             f"{result['pixel_fpr']:.2%}")
  return text


__all__ = [
    "ALL",
    "held_out_good",
    "model_image_size",
    "model_mask",
    "prepare",
    "result_rows",
    "threshold_summary",
    "validate",
]
