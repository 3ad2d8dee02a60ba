"""Synthetic defects pasted into good images, for label-free validation (issue 16).

A user setting up a line has good images only. To choose settings and to check a fitted model without
anomalous images, defects are made from the good images themselves:

* ``'cutpaste'``: a patch of the same or another good image, optionally rotated and rescaled, pasted
  elsewhere, with a mild brightness/contrast jitter (CutPaste, Li et al., CVPR 2021, Section 3.1).
* ``'scratch'``: a thin curved line of random intensity, alpha-blended into the image.
* ``'blob'``: an irregular, smooth-edged region (a thresholded smooth random field around a centre)
  filled with the content of another image at another place, blended with a random opacity
  (DRAEM, Zavrtanik et al., ICCV 2021, Eq. 1, with good images instead of DTD textures).

Every shape is drawn as the ``n`` pixels with the largest value of a shape field (a rotated-rectangle norm,
minus the distance to a curve, a smoothed random field), so a defect covers exactly ``n`` pixels, with ``n``
drawn log-uniformly between the requested fractions of the image area (default 0.05% to 2%: small defects
are common on real lines and the hardest to find). Only pixels of the returned mask are written: outside
it the image is unchanged, bit for bit.

Everything is NumPy (plus SciPy's Gaussian filter and k-d tree); randomness comes from
`numpy.random.Generator`s derived from one seed per (kind, image, copy), so a defect does not depend on
how many other images are processed. No file I/O.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy import spatial

KINDS = ("cutpaste", "scratch", "blob")
DEFAULT_AREA = (0.0005, 0.02)  # fractions of the image area: 0.05% .. 2%
MAX_AREA = 0.5


@dataclasses.dataclass(frozen=True)
class DefectConfig:
  """How defects are drawn.

  Attributes:
    area: (low, high) defect area as fractions of the image area, 0 < low <= high <= 0.5; the pixel count
      is drawn log-uniformly in [low, high] * H * W (at least one pixel).
    aspect: (low, high) width / height ratio of cut-paste patches (CutPaste: 0.3 to 3.3), log-uniform.
    rotate: rotate cut-paste patches by a uniform angle.
    scale: (low, high) zoom of the pasted patch relative to its source, log-uniform (1 = no rescaling).
    jitter: cut-paste brightness and contrast jitter: both factors uniform in [1 - jitter, 1 + jitter].
    scratch_width: (low, high) scratch thickness in pixels (capped so that the curve fits the image).
    min_contrast: a scratch's grey level differs from the local mean by at least this (0..255).
    opacity: (low, high) opacity of the blob's content over the image (DRAEM's 1 - beta).
  """

  area: tuple[float, float] = DEFAULT_AREA
  aspect: tuple[float, float] = (0.3, 3.3)
  rotate: bool = True
  scale: tuple[float, float] = (0.75, 1.33)
  jitter: float = 0.1
  scratch_width: tuple[float, float] = (1.0, 3.0)
  min_contrast: float = 48.0
  opacity: tuple[float, float] = (0.6, 1.0)

  def replace(self, **changes) -> "DefectConfig":
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------ checks


def check_config(config: DefectConfig) -> None:
  """Raises ValueError naming the first invalid field."""
  if not isinstance(config, DefectConfig):
    raise ValueError(f"config must be a DefectConfig, got {type(config).__name__}")
  lo, hi = _pair(config.area, "area")
  if not 0.0 < lo <= hi <= MAX_AREA:
    raise ValueError(f"area must be (low, high) fractions of the image with 0 < low <= high <= {MAX_AREA}, "
                     f"got {tuple(config.area)}")
  for name in ("aspect", "scale", "scratch_width"):
    a, b = _pair(getattr(config, name), name)
    if not 0.0 < a <= b:
      raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {getattr(config, name)}")
  a, b = _pair(config.opacity, "opacity")
  if not 0.0 < a <= b <= 1.0:
    raise ValueError(f"opacity must be (low, high) with 0 < low <= high <= 1, got {config.opacity}")
  if not 0.0 <= config.jitter < 1.0:
    raise ValueError(f"jitter must be in [0, 1), got {config.jitter}")
  if not 0.0 <= config.min_contrast <= 127.0:
    raise ValueError(f"min_contrast must be in [0, 127], got {config.min_contrast}")


def _pair(value, name: str) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
  return a, b


def pixel_range(shape: tuple[int, int], area: tuple[float, float]) -> tuple[int, int]:
  """(n_min, n_max) defect pixel counts for an image of `shape` (H, W) and area fractions (low, high).

  The integers in [low, high] * H * W, at least one pixel; when that interval holds no integer (a narrow
  range), the integer nearest to it.

  Raises:
    ValueError: when the largest allowed defect is smaller than one pixel.
  """
  h, w = shape
  lo, hi = area
  if hi * h * w < 1:
    raise ValueError(f"images of {h}x{w} pixels are too small for defects of {lo:.3%} to {hi:.3%} of the "
                     f"image (at most {hi * h * w:.2f} pixel): use larger images or a larger area range")
  n_min = max(1, int(math.ceil(lo * h * w)))
  n_max = int(math.floor(hi * h * w))
  if n_max < n_min:
    n_min = n_max = max(1, int(round(0.5 * (lo + hi) * h * w)))
  return n_min, n_max


def _check_images(images, name: str = "images") -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise ValueError(f"{name} must be a uint8 array of shape (N, H, W, 3), got {x.dtype} {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is empty (no image)")
  return x


def _rng_for(seed: int, kind: str, index: int, copy: int) -> np.random.Generator:
  """One independent stream per (seed, kind, image, copy): a defect does not depend on the others."""
  return np.random.default_rng([int(seed), KINDS.index(kind), int(index), int(copy)])


# ------------------------------------------------------------------------------------------ shapes


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
  return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _draw_count(rng: np.random.Generator, n_min: int, n_max: int) -> int:
  return int(np.clip(round(_log_uniform(rng, n_min, n_max + 1) - 0.5), n_min, n_max))


def _top_pixels(field: np.ndarray, n: int, allowed: np.ndarray | None) -> np.ndarray:
  """Bool mask of the n pixels of largest `field` (among `allowed` ones): exactly n pixels."""
  f = field.astype(np.float64, copy=True)
  if allowed is not None:
    f[~allowed] = -np.inf
  flat = np.argpartition(-f.ravel(), n - 1)[:n]
  mask = np.zeros(field.size, bool)
  mask[flat] = True
  return mask.reshape(field.shape)


def _pick_centre(rng: np.random.Generator, shape: tuple[int, int], radius: float,
                 allowed: np.ndarray | None) -> tuple[float, float]:
  """A centre (y, x) at least `radius` from the border when possible, inside `allowed` when given."""
  h, w = shape
  yy, xx = np.mgrid[0:h, 0:w]
  r = min(radius, (min(h, w) - 1) / 2.0)
  ok = (yy >= r) & (yy <= h - 1 - r) & (xx >= r) & (xx <= w - 1 - r)
  if allowed is not None:
    ok = ok & allowed if np.any(ok & allowed) else allowed
  idx = np.flatnonzero(ok.ravel())
  i = int(idx[rng.integers(len(idx))])
  return float(i // w), float(i % w)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  return yy.astype(np.float64), xx.astype(np.float64)


def _bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """image (H, W, C) sampled at float coordinates (clipped to the image): (M, C) float64."""
  h, w = image.shape[:2]
  y = np.clip(y, 0, h - 1)
  x = np.clip(x, 0, w - 1)
  y0 = np.minimum(np.floor(y).astype(np.int64), h - 2 if h > 1 else 0)
  x0 = np.minimum(np.floor(x).astype(np.int64), w - 2 if w > 1 else 0)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (y - y0)[:, None], (x - x0)[:, None]
  img = image.astype(np.float64)
  top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
  bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
  return top * (1 - fy) + bottom * fy


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- defects


def cut_paste(image: np.ndarray, source: np.ndarray, rng: np.random.Generator,
              config: DefectConfig = DefectConfig(), *, same_image: bool = False,
              allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pastes a (rotated, rescaled, jittered) patch of `source` into `image` (CutPaste, Section 3.1).

  The pasted region is a rotated rectangle of n pixels (aspect ratio from ``config.aspect``); each of its
  pixels takes the bilinear sample of the source patch (axis-aligned in the source, zoomed by
  ``config.scale``) at the matching point.

  Args:
    image: uint8 array of shape (H, W, 3), the good image.
    source: uint8 array of shape (H, W, 3) the patch is cut from (may be `image` itself).
    rng: the random stream of this defect.
    config: sizes and ranges.
    same_image: True when `source` is `image`: the patch is then cut away from where it is pasted.
    allowed: optional bool array of shape (H, W): the defect stays inside it.

  Returns:
    (defective image uint8 (H, W, 3), mask bool (H, W)).
  """
  shape = image.shape[:2]
  n = _draw_count(rng, *pixel_range(shape, config.area))
  aspect = _log_uniform(rng, *config.aspect)
  theta = rng.uniform(0, np.pi) if config.rotate else 0.0
  zoom = _log_uniform(rng, *config.scale)
  half_u, half_v = math.sqrt(n * aspect) / 2.0, math.sqrt(n / aspect) / 2.0
  cy, cx = _pick_centre(rng, shape, math.hypot(half_u, half_v), allowed)
  yy, xx = _grid(shape)
  c, s = math.cos(theta), math.sin(theta)
  u = c * (xx - cx) + s * (yy - cy)  # patch frame: u along the patch's width
  v = -s * (xx - cx) + c * (yy - cy)
  # Chebyshev norm of the rectangle: its top-n pixels are a rotated rectangle of n pixels.
  mask = _top_pixels(-np.maximum(np.abs(u) / half_u, np.abs(v) / half_v), n, allowed)
  # Source patch centre: the whole (unrotated, zoomed) patch inside the source; away from the pasted
  # place when it is the same image, so that the paste changes something.
  h, w = shape
  su, sv = min(half_u / zoom, (w - 1) / 2.0), min(half_v / zoom, (h - 1) / 2.0)
  for _ in range(20):
    scx, scy = rng.uniform(su, w - 1 - su), rng.uniform(sv, h - 1 - sv)
    if not same_image or math.hypot(scx - cx, scy - cy) >= math.hypot(half_u, half_v):
      break
  values = _bilinear(source, scy + v[mask] / zoom, scx + u[mask] / zoom)
  brightness, contrast = rng.uniform(1 - config.jitter, 1 + config.jitter, size=2)
  mean = values.mean(axis=0, keepdims=True)
  values = ((values - mean) * contrast + mean) * brightness
  out = image.copy()
  out[mask] = _to_uint8(values)
  return out, mask


def _curve(rng: np.random.Generator, centre: tuple[float, float], length: float) -> np.ndarray:
  """Points (M, 2) (y, x) every 0.5 px along a smooth curve of `length` through `centre`."""
  step = 0.5
  m = max(2, int(math.ceil(length / step)) + 1)
  s = np.linspace(-length / 2.0, length / 2.0, m)
  theta0 = rng.uniform(0, 2 * np.pi)
  bend = rng.uniform(-np.pi / 2, np.pi / 2) / max(length, 1.0)  # total turn up to +-90 degrees
  wobble, freq, phase = rng.uniform(0, 0.3), rng.uniform(0.5, 2.0) * 2 * np.pi / max(length, 1.0), \
      rng.uniform(0, 2 * np.pi)
  heading = theta0 + bend * s + wobble * np.sin(freq * s + phase)
  dy, dx = np.sin(heading) * step, np.cos(heading) * step
  y, x = np.cumsum(dy), np.cumsum(dx)
  y, x = y - y[m // 2] + centre[0], x - x[m // 2] + centre[1]
  return np.stack([y, x], axis=1)


def _distance_to(points: np.ndarray, shape: tuple[int, int], *, margin: float, n: int,
                 allowed: np.ndarray | None) -> np.ndarray:
  """Distance (H, W) of every pixel to the nearest of `points` (M, 2); +inf far outside their box.

  Only the curve's bounding box grown by `margin` is measured (the n nearest pixels lie in it when it
  holds enough usable pixels); otherwise the whole image is.
  """
  h, w = shape
  y0, x0 = np.floor(points.min(axis=0) - margin).astype(int)
  y1, x1 = np.ceil(points.max(axis=0) + margin).astype(int)
  y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1 + 1, h), min(x1 + 1, w)
  usable = (y1 - y0) * (x1 - x0) if allowed is None else int(allowed[y0:y1, x0:x1].sum())
  if y1 <= y0 or x1 <= x0 or usable < 4 * n:
    y0, x0, y1, x1 = 0, 0, h, w
  yy, xx = np.mgrid[y0:y1, x0:x1]
  dist = np.full(shape, np.inf)
  d, _ = spatial.cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64))
  dist[y0:y1, x0:x1] = d.reshape(y1 - y0, x1 - x0)
  return dist


def scratch(image: np.ndarray, rng: np.random.Generator, config: DefectConfig = DefectConfig(), *,
            allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Draws a thin curved line of random grey level into `image`.

  The line is the n pixels nearest to a smooth curve of length n / width (a random heading, a bend of up
  to 90 degrees and a small wobble); its grey level differs from the local mean by at least
  ``config.min_contrast`` and is alpha-blended with an opacity in [0.7, 1].

  Args:
    image: uint8 array of shape (H, W, 3).
    rng: the random stream of this defect.
    config: sizes and ranges.
    allowed: optional bool array of shape (H, W): the defect stays inside it.

  Returns:
    (defective image uint8 (H, W, 3), mask bool (H, W)).
  """
  shape = image.shape[:2]
  n = _draw_count(rng, *pixel_range(shape, config.area))
  width = rng.uniform(*config.scratch_width)
  length = min(max(n / width, 1.0), 0.75 * max(shape))  # a long scratch gets thicker, not longer
  centre = _pick_centre(rng, shape, length / 3.0, allowed)
  points = _curve(rng, centre, length)
  dist = _distance_to(points, shape, margin=n / length + 2.0, n=n, allowed=allowed)
  mask = _top_pixels(-dist, n, allowed)
  # Grey level at least min_contrast from the local mean: uniform over [0, mean - c] U [mean + c, 255].
  local = float(image[mask].mean())
  lo, hi = local - config.min_contrast, local + config.min_contrast
  dark, bright = max(lo, 0.0), max(255.0 - hi, 0.0)  # lengths of the two intervals
  if dark + bright == 0:
    level = 0.0 if local > 127.5 else 255.0
  else:
    t = rng.uniform(0, dark + bright)
    level = t if t < dark else hi + (t - dark)
  alpha = rng.uniform(0.7, 1.0)
  out = image.copy()
  out[mask] = _to_uint8((1 - alpha) * image[mask].astype(np.float64) + alpha * level)
  return out, mask


def blob(image: np.ndarray, source: np.ndarray, rng: np.random.Generator,
         config: DefectConfig = DefectConfig(), *, same_image: bool = False,
         allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Fills an irregular smooth-edged region of `image` with the content of `source` (DRAEM-style).

  The region is the n pixels of largest ``noise - (d / R)^2`` around a random centre, where ``noise`` is
  white noise smoothed at the blob's scale (unit variance) and d / R the distance to the centre relative to
  the radius of an n-pixel disk: a lumpy, smooth-edged blob. It takes the source's pixels at a random
  offset, blended with an opacity from ``config.opacity`` (DRAEM Eq. 1, 1 - beta).

  Args:
    image: uint8 array of shape (H, W, 3).
    source: uint8 array of shape (H, W, 3) whose content fills the blob (may be `image`).
    rng: the random stream of this defect.
    config: sizes and ranges.
    same_image: True when `source` is `image`: the content then comes from elsewhere in it.
    allowed: optional bool array of shape (H, W): the defect stays inside it.

  Returns:
    (defective image uint8 (H, W, 3), mask bool (H, W)).
  """
  shape = image.shape[:2]
  h, w = shape
  n = _draw_count(rng, *pixel_range(shape, config.area))
  radius = math.sqrt(n / math.pi)
  cy, cx = _pick_centre(rng, shape, radius, allowed)
  noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma=max(radius / 2.0, 0.5), mode="wrap")
  noise /= max(float(noise.std()), 1e-12)
  yy, xx = _grid(shape)
  mask = _top_pixels(noise - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2, n, allowed)
  ys, xs = np.nonzero(mask)
  # Offset of the content: the shifted region stays inside the source, and leaves the blob itself when
  # the source is the image (when the blob is small enough for that).
  for _ in range(20):
    oy = int(rng.integers(-ys.min(), h - ys.max()))
    ox = int(rng.integers(-xs.min(), w - xs.max()))
    if not same_image or math.hypot(oy, ox) >= 2 * radius:
      break
  content = source[ys + oy, xs + ox].astype(np.float64)
  opacity = rng.uniform(*config.opacity)
  out = image.copy()
  out[mask] = _to_uint8((1 - opacity) * image[mask].astype(np.float64) + opacity * content)
  return out, mask


# ------------------------------------------------------------------------------------------ batches


def add_defects(images, kind: str, *, seed: int | np.random.Generator = 0, n_per_image: int = 1,
                config: DefectConfig = DefectConfig(), sources=None,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Defective copies of good images: `n_per_image` copies of each, one defect of `kind` per copy.

  Args:
    images: uint8 array of shape (N, H, W, 3), good images.
    kind: 'cutpaste', 'scratch' or 'blob' (see the module docstring).
    seed: base seed; copy j of image i uses the stream (seed, kind, i, j) (a Generator gives the base seed).
    n_per_image: defective copies per image.
    config: sizes and ranges (`DefectConfig`).
    sources: optional uint8 array (M, H, W, 3) the cut-paste patches and blob contents come from
      (default: `images`). Cut-paste takes the same image or another one (even odds); a blob takes
      another image whenever there is one.
    allowed: optional bool array of shape (H, W): defects stay inside it (e.g. a model's mask).

  Returns:
    (defective images uint8 (N * n_per_image, H, W, 3), masks bool (N * n_per_image, H, W)), copy j of
    image i at row i * n_per_image + j; outside its mask every image equals its original.

  Raises:
    ValueError: unknown kind, bad shapes or config, images too small for the requested area.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown defect kind {kind!r}; choose among {', '.join(KINDS)}")
  x = _check_images(images)
  check_config(config)
  if isinstance(n_per_image, bool) or not isinstance(n_per_image, (int, np.integer)) or n_per_image < 1:
    raise ValueError(f"n_per_image must be a positive integer, got {n_per_image!r}")
  if isinstance(seed, np.random.Generator):
    seed = int(seed.integers(2**31))
  src = x if sources is None else _check_images(sources, "sources")
  if src.shape[1:] != x.shape[1:]:
    raise ValueError(f"sources must have the images' shape {x.shape[1:]}, got {src.shape[1:]}")
  if allowed is not None:
    allowed = np.asarray(allowed, bool)
    if allowed.shape != x.shape[1:3]:
      raise ValueError(f"allowed must have shape {x.shape[1:3]}, got {allowed.shape}")
  n_min, _ = pixel_range(x.shape[1:3], config.area)
  if allowed is not None and int(allowed.sum()) < n_min:
    raise ValueError(f"the allowed region has {int(allowed.sum())} pixels, fewer than the smallest "
                     f"defect ({n_min} pixels)")
  out = np.empty((x.shape[0] * n_per_image,) + x.shape[1:], np.uint8)
  masks = np.empty((x.shape[0] * n_per_image,) + x.shape[1:3], bool)
  for i in range(x.shape[0]):
    for j in range(n_per_image):
      rng = _rng_for(seed, kind, i, j)
      row = i * n_per_image + j
      if kind == "scratch":
        out[row], masks[row] = scratch(x[i], rng, config, allowed=allowed)
        continue
      k = _pick_source(rng, kind, i, len(src), sources is None)
      same = sources is None and k == i
      fn = cut_paste if kind == "cutpaste" else blob
      out[row], masks[row] = fn(x[i], src[k], rng, config, same_image=same, allowed=allowed)
  return out, masks


def _pick_source(rng: np.random.Generator, kind: str, i: int, n_src: int, own: bool) -> int:
  """Index of the source image: cut-paste the same image or another (even odds), a blob another one."""
  if not own or n_src == 1:
    return int(rng.integers(n_src))
  if kind == "cutpaste" and rng.uniform() < 0.5:
    return i
  k = int(rng.integers(n_src - 1))
  return k + (k >= i)  # any image but i


def defect_set(images, kinds: Sequence[str] = KINDS, *, seed: int = 0, n_per_image: int = 1,
               config: DefectConfig = DefectConfig(), sources=None,
               allowed: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`add_defects` for each kind: {kind: (images (N * n_per_image, H, W, 3), masks (N * n_per_image, H, W))}."""
  kinds = tuple(kinds)
  if not kinds:
    raise ValueError(f"no defect kind given; choose among {', '.join(KINDS)}")
  if len(set(kinds)) != len(kinds):
    raise ValueError(f"defect kinds named more than once: {list(kinds)}")
  return {k: add_defects(images, k, seed=seed, n_per_image=n_per_image, config=config, sources=sources,
                         allowed=allowed) for k in kinds}


__all__ = [
    "DEFAULT_AREA",
    "KINDS",
    "DefectConfig",
    "add_defects",
    "blob",
    "check_config",
    "cut_paste",
    "defect_set",
    "pixel_range",
    "scratch",
]
