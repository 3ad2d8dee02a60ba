"""Evaluation metrics: image AUROC, pixel AUROC and AUPRO (MVTec protocol), ROC curves.

Conventions: arguments in scikit-learn's order, ground truth first (``labels, scores``;
``masks, maps``); a higher score means more anomalous (pass ``-log_likelihood`` maps); labels
are 0 good / 1 anomalous; ground-truth masks are bool (N, H, W) at the resolution of the maps.

* image AUROC: area under the ROC curve of one score per image (ties count one half, as in
  scikit-learn's ``roc_auc_score``).
* pixel AUROC: the same over all pixels of all test images pooled (good images contribute
  only negatives).
* AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021): for every
  threshold, the per-region overlap PRO is the mean, over all connected components of the
  ground truth (8-connectivity, each image separately), of the fraction of the component
  predicted anomalous; the false positive rate is over all ground-truth-negative pixels. The
  PRO-vs-FPR curve is integrated (trapezoids, linear interpolation at the limit) for FPR in
  [0, 0.3] and divided by 0.3.

All curves are exact: every distinct score is a threshold, computed with one sort and
cumulative sums (about a second for 100 maps of 256x256).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

AUPRO_MAX_FPR = 0.3  # MVTec protocol
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity of ground-truth regions (MVTec's code)


# ------------------------------------------------------------------------------------ checks


def _as_float(x) -> np.ndarray:
  """Float array, keeping float32 (sorting it is about twice as fast as float64)."""
  a = np.asarray(x)
  return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _check_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  s = _as_float(scores).ravel()
  y = np.asarray(labels).ravel()
  if s.shape != y.shape:
    raise ValueError(f"labels and scores should have the same number of elements, got "
                     f"{np.shape(labels)} and {np.shape(scores)}")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite value(s)")
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(f"labels must be 0 (good) or 1 (anomalous), got values {np.unique(y)[:5]}")
  y = y.astype(bool)
  if y.all() or not y.any():
    raise ValueError(f"the ROC curve needs both good and anomalous samples; got "
                     f"{int(y.sum())} anomalous out of {y.size}")
  return s, y


def _check_masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(maps)
  m = np.asarray(masks)
  if a.ndim == 2:  # one map
    a = a[None]
    m = m[None] if m.ndim == 2 else m
  if a.ndim != 3:
    raise ValueError(f"anomaly maps should have shape (N, H, W), got {np.shape(maps)}")
  if m.shape != a.shape:
    raise ValueError(f"masks should have the shape of the anomaly maps {a.shape}, got {m.shape} "
                     f"(resize the maps to the masks' resolution first)")
  if m.dtype != np.bool_:
    if not np.all((m == 0) | (m == 1)):
      raise ValueError("masks must be bool or 0/1")
    m = m.astype(bool)
  a = _as_float(a)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"anomaly maps contain {int(np.sum(~np.isfinite(a)))} non-finite value(s)")
  return a, m


# ------------------------------------------------------------------------------- ROC / AUROC


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
  return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _descending_steps(scores: np.ndarray, *weights: np.ndarray):
  """Cumulative sums of ``weights`` over scores sorted descending, at each distinct score.

  Returns the distinct thresholds (descending) and, for every weight array, its cumulative
  sum over all samples with score >= threshold (ties are handled: one step per distinct score).
  """
  # Any sort will do: ties end up adjacent and only the sums at group ends are kept.
  order = np.argsort(-scores)
  s = scores[order]
  last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each distinct score
  sums = [np.cumsum(w[order], dtype=np.float64)[last] for w in weights]
  return s[last], sums


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve with one point per distinct score.

  Args:
    labels: array of shape (N,) (or any shape, flattened), 0 good / 1 anomalous.
    scores: array of the same size, higher = more anomalous.

  Returns:
    (fpr, tpr, thresholds), arrays of shape (T + 1,): the first point is (0, 0) at threshold
    +inf, then one point per distinct score, descending (a sample is positive when
    score >= threshold). Same points as scikit-learn's ``roc_curve(drop_intermediate=False)``.
  """
  s, y = _check_labels_scores(labels, scores)
  thr, (tp, fp) = _descending_steps(s, y.astype(np.float64), (~y).astype(np.float64))
  tpr = np.concatenate([[0.0], tp / tp[-1]])
  fpr = np.concatenate([[0.0], fp / fp[-1]])
  return fpr, tpr, np.concatenate([[np.inf], thr])


def auroc(labels, scores) -> float:
  """Area under the ROC curve (trapezoids: a tie between a good and an anomalous sample
  counts one half, i.e. the Mann-Whitney statistic)."""
  fpr, tpr, _ = roc_curve(labels, scores)
  return _trapezoid(tpr, fpr)


def image_auroc(labels, image_scores) -> float:
  """Image-level AUROC: labels (N,), one score per image (N,)."""
  return auroc(labels, image_scores)


def pixel_auroc(masks, maps) -> float:
  """Pixel-level AUROC over all pixels pooled.

  Args:
    masks: ground truth, bool array of shape (N, H, W) (all False for good images).
    maps: anomaly maps, array of shape (N, H, W) (higher = more anomalous).
  """
  a, m = _check_masks_maps(masks, maps)
  return auroc(m.ravel(), a.ravel())


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = 1000
               ) -> tuple[np.ndarray, np.ndarray]:
  """At most ``max_points`` points of a monotone curve for plotting (end points kept).

  Points are taken evenly along the curve's arc length, so steep and flat parts both keep
  their shape.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if max_points < 2:
    raise ValueError(f"max_points must be >= 2, got {max_points}")
  if x.size <= max_points:
    return x, y
  arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
  idx = np.searchsorted(arc, np.linspace(0.0, arc[-1], max_points))
  idx = np.unique(np.clip(idx, 0, x.size - 1))
  idx[0], idx[-1] = 0, x.size - 1
  return x[idx], y[idx]


# --------------------------------------------------------------------------------------- PRO


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-region-overlap curve of the MVTec protocol.

  Args:
    masks: ground truth, bool array of shape (N, H, W); at least one anomalous pixel.
    maps: anomaly maps, array of shape (N, H, W).

  Returns:
    (fpr, pro, thresholds), arrays of shape (T + 1,), starting at (0, 0) for threshold +inf,
    then one point per distinct score, descending; ends at (1, 1).
  """
  a, m = _check_masks_maps(masks, maps)
  n_neg = int((~m).sum())
  if not m.any():
    raise ValueError("the PRO curve needs at least one anomalous ground-truth pixel")
  if n_neg == 0:
    raise ValueError("the PRO curve needs at least one good ground-truth pixel")
  # Each anomalous pixel carries 1 / (area of its region * number of regions): summed over
  # the pixels above a threshold, this is the mean per-region overlap.
  pro_w = np.zeros(a.shape, np.float64)
  areas = []
  labelled = []
  for i in range(a.shape[0]):
    if m[i].any():
      lab, n = ndi.label(m[i], structure=_EIGHT)
      labelled.append((i, lab))
      areas.append(np.bincount(lab.ravel())[1:])
  n_regions = sum(len(x) for x in areas)
  for (i, lab), area in zip(labelled, areas):
    inv = np.concatenate([[0.0], 1.0 / (area * float(n_regions))])
    pro_w[i] = inv[lab]
  fp_w = (~m).astype(np.float64) / n_neg
  thr, (fpr, pro) = _descending_steps(a.ravel(), fp_w.ravel(), pro_w.ravel())
  fpr = np.concatenate([[0.0], np.minimum(fpr, 1.0)])
  pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
  return fpr, pro, np.concatenate([[np.inf], thr])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoid area under y(x) for x in [0, x_max], interpolating linearly at x_max."""
  k = int(np.searchsorted(x, x_max, side="right"))  # x[:k] <= x_max
  xs, ys = x[:k], y[:k]
  if k < x.size and xs[-1] < x_max:
    x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
    yi = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    xs, ys = np.append(xs, x_max), np.append(ys, yi)
  return _trapezoid(ys, xs)


def aupro(masks, maps, max_fpr: float = AUPRO_MAX_FPR) -> float:
  """Normalised area under the PRO curve up to ``max_fpr`` (MVTec: 0.3), in [0, 1].

  Args:
    masks: ground truth, bool array of shape (N, H, W).
    maps: anomaly maps, array of shape (N, H, W) (higher = more anomalous).
    max_fpr: integration limit on the false positive rate.
  """
  if not 0.0 < max_fpr <= 1.0:
    raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
  fpr, pro, _ = pro_curve(masks, maps)
  return _area_up_to(fpr, pro, max_fpr) / max_fpr


# ---------------------------------------------------------------------------- per category


@dataclasses.dataclass(frozen=True)
class CategoryMetrics:
  """Metrics of one category (None where not computable: no maps or no pixel ground truth).

  Attributes:
    image_auroc: image-level AUROC.
    pixel_auroc: pooled pixel AUROC.
    aupro: normalised AUPRO up to FPR 0.3.
    n_images: number of test images.
    n_anomalous: number of anomalous test images.
  """

  image_auroc: float
  pixel_auroc: float | None = None
  aupro: float | None = None
  n_images: int = 0
  n_anomalous: int = 0

  def as_dict(self) -> dict[str, float | int | None]:
    return dataclasses.asdict(self)


def evaluate(labels, image_scores, masks=None, maps=None, *,
             max_fpr: float = AUPRO_MAX_FPR) -> CategoryMetrics:
  """All metrics of one category.

  Args:
    labels: array of shape (N,), 0 good / 1 anomalous.
    image_scores: array of shape (N,), higher = more anomalous.
    masks: optional ground truth, bool array of shape (N, H, W) (needed with ``maps``).
      Images whose mask is unknown (anomalous images of a data set with image labels only,
      see ``ImageBatch.has_mask``) must be left out of ``masks``/``maps`` by the caller: an
      empty mask would count their pixels as good. Their rows are then given as
      ``masks``/``maps`` of the remaining images only.
    maps: optional anomaly maps, array of shape (N', H, W).
    max_fpr: AUPRO integration limit.

  Returns:
    A `CategoryMetrics`.
  """
  labels = np.asarray(labels)
  img = image_auroc(labels, image_scores)
  pix = pro = None
  if (maps is None) != (masks is None):
    raise ValueError("pixel metrics need both maps and masks (got only one of them)")
  if maps is not None:
    a, m = _check_masks_maps(masks, maps)
    if a.shape[0] > labels.size:
      raise ValueError(f"{a.shape[0]} anomaly maps for {labels.size} image labels")
    if m.any() and not m.all():
      pix = pixel_auroc(m, a)
      pro = aupro(m, a, max_fpr)
  return CategoryMetrics(img, pix, pro, int(labels.size), int(np.sum(labels == 1)))


def mean_metrics(per_category: Mapping[str, CategoryMetrics]) -> dict[str, float | None]:
  """Unweighted mean over categories of each metric (the way MVTec tables average).

  A metric missing (None) in some category is averaged over the others; None if missing in all.
  """
  if not per_category:
    raise ValueError("no category to average")
  out: dict[str, float | None] = {}
  for field in ("image_auroc", "pixel_auroc", "aupro"):
    vals = [getattr(c, field) for c in per_category.values() if getattr(c, field) is not None]
    out[field] = float(np.mean(vals)) if vals else None
  return out


__all__ = [
    "AUPRO_MAX_FPR",
    "CategoryMetrics",
    "aupro",
    "auroc",
    "evaluate",
    "image_auroc",
    "mean_metrics",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
    "thin_curve",
]
