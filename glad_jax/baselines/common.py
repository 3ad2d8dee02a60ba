"""What the baselines share: feature checks, map resizing and smoothing, the `Baseline` interface.

Every baseline reads the same input as GLAD, a mapping ``{layer_name: array (N, h_l, w_l, d_l)}``
of backbone features, and answers with ``(image_scores (B,), anomaly_maps (B, S, S))`` where a
higher value means more anomalous. Pure JAX below the `check_*` helpers (which run once, at the
public entry points, on static shapes only, so they also work under `jax.grad` / `jax.jit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Features = Mapping[str, jax.Array]

# Distances decide nearest neighbours and Mahalanobis scores; TF32 matmuls (the GPU default for
# float32) lose ~3 decimal digits, enough to reorder close neighbours, so every dot is exact fp32.
HIGHEST = jax.lax.Precision.HIGHEST


class Baseline(NamedTuple):
  """One comparison method behind a uniform interface (see `glad_jax.baselines.get_baseline`).

  Attributes:
    name: registry name ("mahaad", "padim", "patchcore").
    config_cls: frozen dataclass of the method's hyperparameters; `config_cls()` holds the
      original paper's defaults.
    fit: ``fit(features, config, key) -> state``.
    score: ``score(state, features, out_size) -> (image_scores (B,), anomaly_maps (B, S, S))``.
  """

  name: str
  config_cls: type
  fit: Callable[[Features, Any, jax.Array], Any]
  score: Callable[..., tuple[jax.Array, jax.Array]]


def model_size_bytes(state: Any) -> int:
  """Bytes of every array stored in a fitted state (the "memory" column of GLAD's Table 5).

  Static metadata (layer names, shapes, the config) is not counted: it is a few bytes.
  """
  total = 0
  for leaf in jax.tree.leaves(state):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Validation (host side, static shapes only)
# ---------------------------------------------------------------------------------------------


def check_features(features: Any, layers: tuple[str, ...], *, min_samples: int = 1,
                   what: str = "features") -> dict[str, jax.Array]:
  """Checks a feature dict and returns the requested layers as float32 arrays.

  Args:
    features: mapping ``{layer_name: array (N, h, w, d)}``.
    layers: the layer names the method needs.
    min_samples: smallest acceptable N.
    what: how to call the argument in error messages.

  Returns:
    dict ``{layer: float32 array (N, h, w, d)}`` restricted to `layers`.

  Raises:
    ValueError: naming the missing layer, the bad shape or the inconsistent sample count.
  """
  if not isinstance(features, Mapping):
    raise ValueError(f"{what} should be a dict {{layer_name: array (N, h, w, d)}}, got "
                     f"{type(features).__name__}")
  if not layers:
    raise ValueError("the config names no layer: `layers` should be a non-empty tuple")
  out = {}
  n = None
  for name in layers:
    if name not in features:
      raise ValueError(f"{what} has no layer {name!r} (it has {sorted(features)}); "
                       f"set `layers` in the config to layers the backbone returns")
    x = features[name]
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4 or min(shape, default=0) < 1:
      raise ValueError(f"{what}[{name!r}] should have shape (N, h, w, d) with every size >= 1, "
                       f"got {shape}")
    if n is None:
      n = shape[0]
    elif shape[0] != n:
      raise ValueError(f"{what}[{name!r}] has {shape[0]} samples but {what}[{layers[0]!r}] has "
                       f"{n}: every layer should come from the same images")
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating)
                                  or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"{what}[{name!r}] should hold real numbers, got dtype {dtype}")
    out[name] = jnp.asarray(x, dtype=jnp.float32)
  if n < min_samples:
    raise ValueError(f"{what} holds {n} sample(s); this method needs at least {min_samples}")
  return out


def check_layer_shapes(feats: Mapping[str, jax.Array], layers: tuple[str, ...],
                       shapes: tuple[tuple[int, int, int], ...], what: str = "features") -> None:
  """Checks that scoring features have the (h, w, d) of the features the state was fitted on."""
  for name, expected in zip(layers, shapes):
    got = tuple(feats[name].shape[1:])
    if got != tuple(expected):
      raise ValueError(f"{what}[{name!r}] has (h, w, d) = {got} but the model was fitted on "
                       f"{tuple(expected)}: use the same backbone and image size as for fitting")


def check_out_size(out_size: Any) -> int:
  if isinstance(out_size, bool) or not isinstance(out_size, (int, np.integer)) or out_size < 1:
    raise ValueError(f"out_size should be a positive int (the side of the anomaly maps), "
                     f"got {out_size!r}")
  return int(out_size)


# ---------------------------------------------------------------------------------------------
# Resampling and smoothing
# ---------------------------------------------------------------------------------------------


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) with gradient 0 (not inf/NaN) at 0, so that PGD can differentiate scores."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of (N, h, w, d) to (N, H, W, d), PyTorch's ``mode="nearest"``.

  Output pixel i reads input pixel floor(i * h / H): for an integer factor this repeats every
  feature f x f times, which is what PaDiM's ``embedding_concat`` does.
  """
  h, w = x.shape[1:3]
  rows = (np.arange(size[0]) * h) // size[0]
  cols = (np.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of the two spatial axes following the batch axis (axes 1, 2).

  Half-pixel centres and edge clamping, i.e. PyTorch's ``interpolate(mode="bilinear",
  align_corners=False)`` that PaDiM and PatchCore use to upsample their maps.

  Args:
    x: array of shape (N, h, w) or (N, h, w, d).
    size: (H, W).

  Returns:
    array of shape (N, H, W) or (N, H, W, d).
  """
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  shape = (x.shape[0], *size, *x.shape[3:])
  # antialias=False: a plain 2-tap interpolation also when shrinking, like PyTorch.
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


def _gaussian_blur_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
  """(n, n) matrix applying scipy's 1-D ``gaussian_filter1d(mode="reflect")`` to a length-n axis.

  The boundary extension (half-sample symmetric: ... b a | a b c ... ) is folded into the matrix,
  so the blur is two small matmuls and needs no padding. Built with NumPy at trace time: it only
  depends on static sizes.
  """
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  src = np.arange(n)[:, None] + offsets[None, :]  # (n, 2r+1) source positions
  src = np.mod(src, 2 * n)  # symmetric extension has period 2n, folds any number of times
  src = np.where(src >= n, 2 * n - 1 - src, src)
  mat = np.zeros((n, n), dtype=np.float64)
  np.add.at(mat, (np.repeat(np.arange(n), offsets.size), src.ravel()),
            np.tile(kernel, n))
  return mat.astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
  """Gaussian smoothing of anomaly maps, as PaDiM / PatchCore do (sigma = 4 on 256x256 maps).

  Same result as ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=4.0)``
  applied to each map (the filter of the original PaDiM and PatchCore code).

  Args:
    maps: array of shape (B, H, W).
    sigma: standard deviation in pixels; 0 returns `maps` unchanged.
    truncate: kernel radius in standard deviations.

  Returns:
    array of shape (B, H, W).
  """
  if sigma <= 0:
    return maps
  h, w = maps.shape[1:]
  mat_h = jnp.asarray(_gaussian_blur_matrix(h, sigma, truncate))
  mat_w = jnp.asarray(_gaussian_blur_matrix(w, sigma, truncate))
  return jnp.einsum("ij,bjk,lk->bil", mat_h, maps, mat_w, precision=HIGHEST)


def finish_maps(maps: jax.Array, out_size: int, sigma: float) -> jax.Array:
  """Feature-grid maps (B, h, w) -> (B, out_size, out_size): bilinear upsampling, then blur."""
  return gaussian_blur(resize_bilinear(maps, (out_size, out_size)), sigma)
