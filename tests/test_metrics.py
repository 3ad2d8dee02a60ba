"""Metrics against scikit-learn and against a brute-force AUPRO (threshold sweep + skimage)."""

import numpy as np
import pytest
from scipy.integrate import trapezoid
from skimage import measure
from sklearn import metrics as skm

from glad_jax import metrics


def _brute_aupro(masks, maps, max_fpr):
  """Independent AUPRO: every distinct threshold, regions from skimage.measure.label."""
  neg = ~masks
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fprs.append((pred & neg).sum() / neg.sum())
    overlaps = []
    for img_idx in range(len(masks)):
      lab = measure.label(masks[img_idx], connectivity=2)  # 8-connectivity
      for k in range(1, lab.max() + 1):
        region = lab == k
        overlaps.append((pred[img_idx] & region).sum() / region.sum())
    pros.append(np.mean(overlaps))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= max_fpr
  x, y = fprs[keep], pros[keep]
  if x[-1] < max_fpr:
    x = np.append(x, max_fpr)
    y = np.append(y, np.interp(max_fpr, fprs, pros))
  return trapezoid(y, x) / max_fpr


def _tiny_maps(seed, n=4, shape=(9, 11), quantise=None):
  rng = np.random.default_rng(seed)
  masks = np.zeros((n,) + shape, bool)
  masks[0, 1:4, 2:5] = True  # two regions in image 0
  masks[0, 6:8, 6:10] = True
  masks[1, 5:9, 0:3] = True
  masks[1, 0, 10] = True  # a one-pixel region
  masks[2, 3, 3] = masks[2, 4, 4] = True  # diagonal neighbours: one region with 8-connectivity
  maps = rng.normal(size=masks.shape) + 1.5 * masks
  if quantise:
    maps = np.round(maps * quantise) / quantise  # many ties
  return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 300)
  scores = rng.integers(0, 7, 300) + labels * rng.integers(0, 3, 300)  # many ties
  assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.image_auroc(labels, scores.astype(np.float32)) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_matches_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 200)
  scores = np.round(rng.normal(size=200) + labels, 1)
  fpr, tpr, thr = metrics.roc_curve(labels, scores)
  fpr2, tpr2, thr2 = skm.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, fpr2)
  np.testing.assert_allclose(tpr, tpr2)
  np.testing.assert_allclose(thr[1:], thr2[1:])
  assert thr[0] == np.inf


def test_pixel_auroc_pools_all_pixels_like_sklearn():
  masks, maps = _tiny_maps(4, quantise=4)
  expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed,quantise,max_fpr", [(0, None, 0.3), (1, 3, 0.3), (2, 2, 0.05),
                                                    (3, None, 1.0)])
def test_aupro_matches_brute_force(seed, quantise, max_fpr):
  masks, maps = _tiny_maps(seed, quantise=quantise)
  expected = _brute_aupro(masks, maps, max_fpr)
  assert metrics.aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-10)


def test_aupro_special_cases():
  masks, _ = _tiny_maps(0)
  assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
  # One threshold only: the curve is the chord (0, 0) -> (1, 1); area under y = x up to 0.3.
  assert metrics.aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.045 / 0.3)
  fpr, pro, _ = metrics.pro_curve(masks, np.random.default_rng(0).random(masks.shape))
  assert fpr[0] == pro[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_aupro_region_weighting_differs_from_pixel_weighting():
  # A large detected region and a small missed one: PRO weighs regions equally (0.5 at
  # zero FPR), while pixel recall would be dominated by the large region.
  masks = np.zeros((1, 20, 20), bool)
  masks[0, :10, :10] = True
  masks[0, 15, 15] = True
  maps = masks.astype(float)
  maps[0, 15, 15] = 0.0
  fpr, pro, _ = metrics.pro_curve(masks, maps)
  assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_evaluate_and_mean():
  masks, maps = _tiny_maps(5)
  labels = masks.any(axis=(1, 2)).astype(int)
  scores = maps.max(axis=(1, 2))
  res = metrics.evaluate(labels, scores, masks, maps)
  assert res.image_auroc == pytest.approx(skm.roc_auc_score(labels, scores))
  assert res.pixel_auroc == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))
  assert res.aupro == pytest.approx(_brute_aupro(masks, maps, 0.3))
  assert (res.n_images, res.n_anomalous) == (4, 3)
  only_image = metrics.evaluate(labels, scores)
  assert only_image.pixel_auroc is None and only_image.aupro is None
  mean = metrics.mean_metrics({"a": res, "b": only_image})
  assert mean["image_auroc"] == pytest.approx(res.image_auroc)
  assert mean["aupro"] == pytest.approx(res.aupro)


def test_thin_curve_keeps_ends_and_limit():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 5000)
  fpr, tpr, _ = metrics.roc_curve(labels, rng.normal(size=5000) + labels)
  x, y = metrics.thin_curve(fpr, tpr, max_points=100)
  assert len(x) <= 100 and x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == 1
  assert np.all(np.diff(x) >= 0)
  # The thinned curve stays close to the full one.
  assert abs(trapezoid(y, x) - trapezoid(tpr, fpr)) < 0.01


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="both good and anomalous"):
    metrics.auroc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="same number of elements"):
    metrics.auroc([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="non-finite"):
    metrics.auroc([0, 1], [0.1, np.nan])
  with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
    metrics.auroc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="shape of the anomaly maps"):
    metrics.aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 8, 8)))
  with pytest.raises(ValueError, match="at least one anomalous"):
    metrics.aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match="max_fpr"):
    metrics.aupro(np.ones((1, 2, 2), bool), np.zeros((1, 2, 2)), max_fpr=0)
