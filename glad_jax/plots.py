"""Pictures a GLAD user or researcher expects: heat maps, ROC curves, weight decay (paper Fig. 1/4), local sparsity
and local weight maps (paper Fig. 2/3). Every function takes arrays and a destination path, writes one PNG and
returns the path. matplotlib's non-interactive Agg backend is used, so no display is needed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8:
    image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
  return image


def _resize_like(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  if values.shape == shape:
    return values
  from skimage.transform import resize

  return resize(values, shape, order=1, preserve_range=True, anti_aliasing=False)


def heatmap_panel(image: np.ndarray, anomaly_map: np.ndarray, path: str | os.PathLike, *,
                  title: str = "", pixel_threshold: float | None = None,
                  vmin: float | None = None, vmax: float | None = None) -> pathlib.Path:
  """Image | anomaly map | overlay | thresholded region (the last only when a pixel threshold is given).

  Args:
    image: array of shape (H, W, 3) or (H, W), uint8 or float in [0, 1].
    anomaly_map: array of shape (h, w), higher = more anomalous (resized to the image for display).
    path: PNG to write.
    pixel_threshold: anomaly-map value above which a pixel is declared anomalous.
    vmin, vmax: colour range (use the same for a set of images to make them comparable).
  """
  plt = _pyplot()
  rgb = _as_rgb(image)
  amap = _resize_like(np.asarray(anomaly_map, np.float64), rgb.shape[:2])
  finite = amap[np.isfinite(amap)]
  vmin = float(np.min(finite)) if vmin is None and finite.size else vmin
  vmax = float(np.max(finite)) if vmax is None and finite.size else vmax
  n = 4 if pixel_threshold is not None else 3
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
  axes[0].imshow(rgb)
  axes[0].set_title("image")
  im = axes[1].imshow(amap, cmap="jet", vmin=vmin, vmax=vmax)
  axes[1].set_title("anomaly map (-log p)")
  fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
  axes[2].imshow(rgb)
  axes[2].imshow(amap, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
  axes[2].set_title("overlay")
  if pixel_threshold is not None:
    region = amap > pixel_threshold
    axes[3].imshow(rgb)
    axes[3].contour(region, levels=[0.5], colors="red", linewidths=1.5)
    axes[3].set_title(f"map > {pixel_threshold:.3g}")
  for ax in axes:
    ax.set_axis_off()
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike, *,
               title: str = "ROC") -> pathlib.Path:
  """One ROC curve per entry: name -> (false-positive rates, true-positive rates, AUROC)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  for name, (fpr, tpr, auc) in curves.items():
    ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("false-positive rate")
  ax.set_ylabel("true-positive rate")
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)


def weight_decay(weights: Mapping[str, np.ndarray], n_samples: Mapping[str, int], dims: Mapping[str, int],
                 path: str | os.PathLike) -> pathlib.Path:
  """Sorted global weights pi_k per layer, log scale (paper Fig. 4).

  The dot marks the first Gaussian whose cluster holds fewer than d + 1 samples, pi_k < (d + 1) / N: from there on
  the sample covariance alone would be singular, and only OAS shrinkage (Eq. 9) keeps it usable.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for layer, w in weights.items():
    w = np.sort(np.asarray(w, np.float64))[::-1]
    line, = ax.semilogy(np.arange(1, w.size + 1), w, label=f"{layer} (K={w.size}, d={dims[layer]})")
    below = np.nonzero(w < (dims[layer] + 1) / n_samples[layer])[0]
    if below.size:
      ax.plot(below[0] + 1, w[below[0]], "o", color=line.get_color())
  ax.set_xlabel("component rank")
  ax.set_ylabel("weight $\\pi_k$")
  ax.set_title("decay of the global weights")
  ax.legend(fontsize=8)
  return _save(fig, path)


def local_maps(image: np.ndarray | None, nnz: np.ndarray, weight_map: np.ndarray, component: int,
               path: str | os.PathLike, *, layer: str = "") -> pathlib.Path:
  """Paper Fig. 3: an image, the local weight map pi_k(x) of one Gaussian, and the number of non-zero weights per
  position.

  Args:
    image: optional reference image (H, W, 3) shown first.
    nnz: array of shape (h, w), number of components with pi_k(x) > 0 at each position.
    weight_map: array of shape (h, w), pi_k(x) for the chosen component.
    component: index k shown.
  """
  plt = _pyplot()
  panels = ([("image", _as_rgb(image), None)] if image is not None else []) + [
      (f"$\\pi_{{{component}}}(x)$", np.asarray(weight_map), "viridis"),
      (f"non-zero weights per position (mean {np.mean(nnz):.1f})", np.asarray(nnz), "magma")]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6))
  for ax, (name, values, cmap) in zip(np.atleast_1d(axes), panels):
    im = ax.imshow(values, cmap=cmap)
    if cmap is not None:
      fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(name, fontsize=9)
    ax.set_axis_off()
  if layer:
    fig.suptitle(f"local weights, {layer}")
  return _save(fig, path)


def score_histogram(scores: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *,
                    threshold: float | None = None, names: Sequence[str] = ("good", "anomalous")) -> pathlib.Path:
  """Histogram of image scores of good vs anomalous images, with the calibrated threshold."""
  plt = _pyplot()
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  bins = np.histogram_bin_edges(scores, bins=30)
  ax.hist(scores[~labels], bins=bins, alpha=0.6, label=names[0])
  ax.hist(scores[labels], bins=bins, alpha=0.6, label=names[1])
  if threshold is not None:
    ax.axvline(threshold, color="k", ls="--", label="threshold")
  ax.set_xlabel("image anomaly score")
  ax.legend()
  return _save(fig, path)
