"""Crude masks restricting where anomalies are reported (paper Section 4.1).

The background of MVTec images is not annotated, and network border effects can light it up,
so GLAD only reports anomalies inside a crude mask:

* objects: the area roughly occupied by the object, derived here from the *aligned* training
  images (`object_mask`): two cues, each measured relative to its level on the image border
  (where only background is expected) -- the colour distance of the mean training image to the
  background colour (catches flat objects that differ from the background) and the mean over
  images of the local contrast (catches textured objects, even imperfectly aligned ones); their
  maximum is thresholded, cleaned by morphology (closing, hole filling, opening, small
  components dropped) and dilated so that the mask errs on the generous side;
* textures: a margin of 1/16 of the image size removed from each side (`margin_mask`);
* or a mask image given by the user (`mask_from_array`; reading the file is
  `glad_jax.data.images.read_mask`'s job).

Pure NumPy/SciPy array functions: no file I/O, no JAX (masks are computed once per category).
Masks are bool arrays, True where anomalies are reported.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology

TEXTURE_MARGIN = 1.0 / 16.0  # paper Section 4.1


def margin_mask(shape: tuple[int, int], fraction: float = TEXTURE_MARGIN) -> np.ndarray:
  """The texture mask: False on a border band of ``fraction`` of the size, True inside.

  Args:
    shape: (height, width) of the anomaly map.
    fraction: width of the removed band as a fraction of each dimension (paper: 1/16).

  Returns:
    array of shape (H, W), bool.
  """
  h, w = _check_shape(shape)
  if not 0.0 <= fraction < 0.5:
    raise ValueError(f"margin fraction must be in [0, 0.5), got {fraction}")
  mh, mw = int(round(h * fraction)), int(round(w * fraction))
  out = np.zeros((h, w), dtype=bool)
  out[mh:h - mh, mw:w - mw] = True
  return out


@dataclasses.dataclass(frozen=True)
class ObjectMaskSettings:
  """How `object_mask` turns aligned training images into a crude object mask.

  Lengths are fractions of max(H, W), so that one setting serves every resolution.

  Attributes:
    threshold: a pixel is object when its colour distance to the background, or its local
      contrast, exceeds ``threshold`` times the 99th percentile of that quantity on the border
      band (where only background is expected).
    border: width of the border band used as background reference (fraction of each side).
    contrast_sigma: Gaussian window of the local contrast (local standard deviation).
    max_images: the contrast cue is averaged over at most this many images (evenly spaced).
    closing: radius of the closing that bridges gaps (e.g. between tyre lugs).
    opening: radius of the opening that removes thin spurious bits.
    dilation: radius of the final dilation (masks are meant to be generous).
    min_component: components smaller than this fraction of the largest one are dropped.
    fill: 'holes' fills enclosed holes; 'convex' takes the convex hull of what remains.
  """

  threshold: float = 1.5
  border: float = TEXTURE_MARGIN
  contrast_sigma: float = 1.0 / 64.0
  max_images: int = 64
  closing: float = 1.0 / 32.0
  opening: float = 1.0 / 64.0
  dilation: float = 1.0 / 64.0
  min_component: float = 0.1
  fill: Literal["holes", "convex"] = "holes"


def _check_shape(shape) -> tuple[int, int]:
  try:
    h, w = (int(s) for s in shape)
  except (TypeError, ValueError):
    raise ValueError(f"shape must be (height, width), got {shape!r}") from None
  if h <= 0 or w <= 0:
    raise ValueError(f"shape must be positive, got {shape!r}")
  return h, w


def _as_stack(images) -> np.ndarray:
  """(N, H, W) or (N, H, W, C) of any dtype -> float64 (N, H, W, C)."""
  a = np.asarray(images)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4 or a.shape[0] == 0:
    raise ValueError(f"images should have shape (N, H, W) or (N, H, W, C) with N >= 1, "
                     f"got {np.shape(images)}")
  return a.astype(np.float64)


def _local_std(img: np.ndarray, sigma: float) -> np.ndarray:
  mean = ndi.gaussian_filter(img, sigma)
  return np.sqrt(np.maximum(ndi.gaussian_filter(img * img, sigma) - mean * mean, 0.0))


def object_score(images, settings: ObjectMaskSettings = ObjectMaskSettings()) -> np.ndarray:
  """Per-pixel "objectness" of aligned training images, in units of the border's level.

  Args:
    images: aligned training images, array of shape (N, H, W) or (N, H, W, C).
    settings: `ObjectMaskSettings` (uses border and contrast_sigma).

  Returns:
    array of shape (H, W), float: max of (colour distance of the mean image to the median
    border colour) and (mean over images of the local contrast), each divided by its 99th
    percentile on the border band. Background is about <= 1.
  """
  x = _as_stack(images)
  n, h, w, _ = x.shape
  mean = x.mean(axis=0)  # (H, W, C): averaging removes per-image noise, keeps the object
  band = ~margin_mask((h, w), settings.border)
  if not band.any():
    band = ~margin_mask((h, w), 0.25)  # tiny images: any non-empty band will do
  background = np.median(mean[band], axis=0)
  colour = np.linalg.norm(mean - background, axis=-1)
  sigma = max(settings.contrast_sigma * max(h, w), 0.5)
  pick = np.unique(np.linspace(0, n - 1, min(n, max(settings.max_images, 1))).round().astype(int))
  contrast = np.mean([_local_std(x[i].mean(axis=-1), sigma) for i in pick], axis=0)
  eps = 1e-6 * (1.0 + float(np.abs(mean).max()))

  def rel(q):  # a flat (noise-free) border must not divide by ~0
    return q / max(float(np.percentile(q[band], 99)), eps)

  return np.maximum(rel(colour), rel(contrast))


def object_mask(images, settings: ObjectMaskSettings = ObjectMaskSettings()) -> np.ndarray:
  """Crude object mask from aligned training images (paper Section 4.1, Fig. 1).

  Args:
    images: aligned training images, array of shape (N, H, W) or (N, H, W, C), any dtype.
    settings: `ObjectMaskSettings`.

  Returns:
    array of shape (H, W), bool: True on (roughly) the object.

  Raises:
    ValueError: no object found (e.g. a texture, or an object covering the border band): use
      the margin mask or a mask image instead.
  """
  x = _as_stack(images)
  _, h, w, _ = x.shape
  size = max(h, w)
  if settings.threshold <= 0:
    raise ValueError(f"threshold must be > 0, got {settings.threshold}")
  if settings.fill not in ("holes", "convex"):
    raise ValueError(f"fill must be 'holes' or 'convex', got {settings.fill!r}")
  mask = object_score(x, settings) > settings.threshold

  r_close = int(round(settings.closing * size))
  if r_close > 0:
    # Pad so that the closing does not glue the object to the image border.
    mask = ndi.binary_closing(np.pad(mask, r_close), morphology.disk(r_close))
    mask = mask[r_close:-r_close, r_close:-r_close]
  mask = ndi.binary_fill_holes(mask)
  r_open = int(round(settings.opening * size))
  if r_open > 0:
    mask = ndi.binary_opening(mask, morphology.disk(r_open))
  labels, n = ndi.label(mask)
  if n == 0:
    raise ValueError(
        f"no object found in the mean of {x.shape[0]} aligned images (threshold "
        f"{settings.threshold} x the border level): the category may be a texture or the object "
        f"may cover the border; use the margin mask or a user-given mask image")
  sizes = np.bincount(labels.ravel())[1:]
  keep = np.flatnonzero(sizes >= settings.min_component * sizes.max()) + 1
  mask = np.isin(labels, keep)
  if settings.fill == "convex":
    mask = morphology.convex_hull_image(mask)
  r_dil = int(round(settings.dilation * size))
  if r_dil > 0:
    mask = ndi.binary_dilation(mask, morphology.disk(r_dil))
  return mask


def resize_mask(mask, shape: tuple[int, int]) -> np.ndarray:
  """Resizes masks to another resolution (e.g. an anomaly map's).

  An output cell is True when at least half of its area is True in the input (exact area
  average, any ratio; for upsizing this is nearest neighbour).

  Args:
    mask: array of shape (H, W) or (N, H, W), bool.
    shape: target (height, width).

  Returns:
    array of shape (h, w) or (N, h, w), bool.
  """
  hw = _check_shape(shape)
  m = np.asarray(mask)
  if m.ndim not in (2, 3):
    raise ValueError(f"mask should have shape (H, W) or (N, H, W), got {m.shape}")
  if m.shape[-2:] == hw:
    return m.astype(bool)
  batch = m.reshape((-1,) + m.shape[-2:]).astype(np.float64)
  out = np.stack([_area_resize(b, hw) for b in batch]) >= 0.5 - 1e-9  # ties count as in
  return out.reshape(m.shape[:-2] + hw)


def _area_resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Exact area-average resizing of (H, W) to (h, w), any ratio: two small matrix products."""
  h, w = img.shape

  def weights(n_in, n_out):
    # w[i, j] = overlap of output cell i, [i n_in/n_out, (i+1) n_in/n_out), with input pixel j.
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None) / (n_in / n_out)

  return weights(h, hw[0]) @ img @ weights(w, hw[1]).T


def mask_from_array(array, shape: tuple[int, int] | None = None) -> np.ndarray:
  """A user-given mask image as a mask: any non-zero pixel (any channel) is True.

  Args:
    array: array of shape (H, W) or (H, W, C), any dtype (e.g. a decoded PNG).
    shape: optional target (height, width) (see `resize_mask`).

  Returns:
    array of shape (H, W) or ``shape``, bool.
  """
  a = np.asarray(array)
  if a.ndim == 3:
    a = a.any(axis=-1)
  if a.ndim != 2:
    raise ValueError(f"a mask image should have shape (H, W) or (H, W, C), got {np.shape(array)}")
  m = a != 0
  if not m.any():
    raise ValueError("the mask image is empty (all zero): it would hide every anomaly")
  return m if shape is None else resize_mask(m, shape)


__all__ = [
    "TEXTURE_MARGIN",
    "ObjectMaskSettings",
    "margin_mask",
    "mask_from_array",
    "object_mask",
    "object_score",
    "resize_mask",
]
