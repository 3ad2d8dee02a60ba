"""Parametric alignment of images on a reference: the robust inverse compositional algorithm.

GLAD aligns every image of an object category on one reference image before extracting
features (paper Section 4.1, Fig. 1), with the modified inverse compositional algorithm of
Briand, Facciolo and Sanchez ("Improvements of the Inverse Compositional Algorithm for
Parametric Motion Estimation", IPOL 2018), itself built on Baker and Matthews ("Lucas-Kanade
20 years on", IJCV 2004). This module is a JAX implementation of that algorithm:

* motion models: translation (2 parameters), euclidean (3), similarity (4), affine (6) and
  homography (8);
* coarse-to-fine Gaussian pyramid (factor 2), identity initialisation at the coarsest scale;
* Farid-Simoncelli 5-tap prefilter and derivative filters (the IPOL 2018 gradient), bicubic
  (Keys) interpolation of the moving image;
* robust error functions (Lorentzian by default, also Charbonnier, Geman-McClure, quadratic)
  with the IPOL decreasing threshold lambda and the Hessian recomputed at every iteration,
  H = sum_x rho'(x) G(x)^T G(x) (G: steepest-descent images of the reference);
* pixels whose warped position falls outside the moving image are discarded (IPOL 2018's
  improved domain), as is a 2-pixel reference border where the gradient is unreliable;
* at most ``n_iter`` iterations per level (``lax.while_loop``; an image stops once its update
  moves no corner by more than ``tol`` pixels), ``vmap`` over the batch, one compilation per
  (image shape, settings) shared by the five models.

Coordinates and parameters
--------------------------
A point is ``x = (col + 0.5 - W/2, row + 0.5 - H/2)``: pixel units, origin at the image centre,
x to the right, y downwards. A parameter vector ``p`` defines a 3x3 matrix ``M(p)`` mapping a
point of the *reference* to the corresponding point of the *image*; aligning means resampling
``aligned(x) = image(M(p) x)`` (`warp`). Parameterisations (``A`` is the 2x2 linear part,
``t`` the translation):

=============  ====================================  =================================
model          p                                      M(p)
=============  ====================================  =================================
translation    (tx, ty)                               A = I
euclidean      (tx, ty, theta)  [radians]             A = [[c, -s], [s, c]]
similarity     (tx, ty, a, b)                         A = [[1 + a, -b], [b, 1 + a]]
affine         (tx, ty, a00, a01, a10, a11)           A = I + [[a00, a01], [a10, a11]]
homography     (h0, ..., h7)                          [[1 + h0, h1, h2], [h3, 1 + h4, h5],
                                                       [h6, h7, 1]]
=============  ====================================  =================================

With y pointing down, M(p) with a positive theta turns reference points clockwise on screen,
so `warp` turns the image content counterclockwise. Internally the
solver works in coordinates divided by ``max(H, W) / 2`` so that all parameters have the same
order of magnitude; the same normalised frame serves every pyramid level.

Intensities: uint8 images are used on their 0-255 scale, float images are taken to lie in
[0, 1] and multiplied by 255 (the robust thresholds below are on the 0-255 scale, as in IPOL).
Colour images are converted to luma (ITU-R 601) for the estimation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Model = Literal["translation", "euclidean", "similarity", "affine", "homography"]
Robust = Literal["quadratic", "lorentzian", "charbonnier", "geman_mcclure"]

MODELS: tuple[str, ...] = ("translation", "euclidean", "similarity", "affine", "homography")
_N_PARAMS = {"translation": 2, "euclidean": 3, "similarity": 4, "affine": 6, "homography": 8}
ROBUST_FUNCTIONS: tuple[str, ...] = ("quadratic", "lorentzian", "charbonnier", "geman_mcclure")

# Farid & Simoncelli (2004) 5-tap prefilter and first derivative, as correlation kernels
# (out[i] = sum_k f[k] in[i + k - 2]). Renormalised: the prefilter sums to 1 and the
# derivative returns exactly 1 on the ramp in[i] = i.
_FARID_P = np.array([0.030320, 0.249724, 0.439911, 0.249724, 0.030320])
_FARID_P = _FARID_P / _FARID_P.sum()
_FARID_D = np.array([-0.104550, -0.292315, 0.0, 0.292315, 0.104550])
_FARID_D = _FARID_D / np.dot(_FARID_D, np.arange(-2, 3))
# Pyramid anti-aliasing before the 2x2 mean: a Gaussian of sigma 0.8; with the 2x2 box it
# gives about the sigma ~1 that IPOL uses for a zoom factor of 0.5.
_PYR_BLUR = np.exp(-0.5 * (np.arange(-2, 3) / 0.8) ** 2)
_PYR_BLUR = _PYR_BLUR / _PYR_BLUR.sum()
_BORDER = 2  # reference pixels this close to the border have no reliable gradient


def _check_model(model: str) -> None:
  if model not in _N_PARAMS:
    raise ValueError(f"unknown motion model {model!r}; expected one of {MODELS}")


def n_params(model: str) -> int:
  """Number of parameters of a motion model."""
  _check_model(model)
  return _N_PARAMS[model]


def _xp(x):
  """jax.numpy for JAX arrays (and tracers), NumPy otherwise: host glue stays off the device."""
  return jnp if isinstance(x, jax.Array) else np


# --------------------------------------------------------------------- parameters <-> matrices


def params_to_matrix(params, model: str):
  """M(p) of shape (..., 3, 3) from parameters of shape (..., p) (see the module docstring).

  NumPy in, NumPy out; JAX in (or traced), JAX out.
  """
  _check_model(model)
  xp = _xp(params)
  p = xp.asarray(params)
  if not xp.issubdtype(p.dtype, xp.floating):
    p = p.astype(xp.float32)
  if p.shape[-1:] != (_N_PARAMS[model],):
    raise ValueError(f"parameters of model {model!r} should have shape (..., "
                     f"{_N_PARAMS[model]}), got {tuple(p.shape)}")
  one = xp.ones(p.shape[:-1], p.dtype)
  zero = xp.zeros(p.shape[:-1], p.dtype)
  if model == "translation":
    rows = [[one, zero, p[..., 0]], [zero, one, p[..., 1]]]
  elif model == "euclidean":
    c, s = xp.cos(p[..., 2]), xp.sin(p[..., 2])
    rows = [[c, -s, p[..., 0]], [s, c, p[..., 1]]]
  elif model == "similarity":
    a, b = p[..., 2], p[..., 3]
    rows = [[1 + a, -b, p[..., 0]], [b, 1 + a, p[..., 1]]]
  elif model == "affine":
    rows = [[1 + p[..., 2], p[..., 3], p[..., 0]], [p[..., 4], 1 + p[..., 5], p[..., 1]]]
  else:
    rows = [[1 + p[..., 0], p[..., 1], p[..., 2]], [p[..., 3], 1 + p[..., 4], p[..., 5]],
            [p[..., 6], p[..., 7], one]]
  if model != "homography":
    rows.append([zero, zero, one])
  return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_params(matrix, model: str):
  """Parameters of shape (..., p) from matrices of shape (..., 3, 3) of that model's group."""
  _check_model(model)
  xp = _xp(matrix)
  m = xp.asarray(matrix)
  m = m / m[..., 2:3, 2:3]
  if model == "translation":
    return xp.stack([m[..., 0, 2], m[..., 1, 2]], axis=-1)
  if model == "euclidean":
    theta = xp.arctan2(m[..., 1, 0], m[..., 0, 0])
    return xp.stack([m[..., 0, 2], m[..., 1, 2], theta], axis=-1)
  if model == "similarity":
    return xp.stack([m[..., 0, 2], m[..., 1, 2], m[..., 0, 0] - 1, m[..., 1, 0]], axis=-1)
  if model == "affine":
    return xp.stack([m[..., 0, 2], m[..., 1, 2], m[..., 0, 0] - 1, m[..., 0, 1],
                     m[..., 1, 0], m[..., 1, 1] - 1], axis=-1)
  h = m.reshape(m.shape[:-2] + (9,))[..., :8]
  return h - xp.asarray([1, 0, 0, 0, 1, 0, 0, 0], h.dtype)


def identity_params(model: str, batch: int | None = None) -> np.ndarray:
  """Parameters of the identity motion: zeros of shape (p,) or (batch, p)."""
  shape = (n_params(model),) if batch is None else (batch, n_params(model))
  return np.zeros(shape, np.float32)


def _inv3(m):
  """Inverse of (..., 3, 3) matrices by the adjugate (XLA compiles LU solvers slowly)."""
  xp = _xp(m)
  a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
  d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
  g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
  co = [[e * i - f * h, c * h - b * i, b * f - c * e],
        [f * g - d * i, a * i - c * g, c * d - a * f],
        [d * h - e * g, b * g - a * h, a * e - b * d]]
  det = a * co[0][0] + b * co[1][0] + c * co[2][0]
  adj = xp.stack([xp.stack(r, axis=-1) for r in co], axis=-2)
  return adj / det[..., None, None]


def invert_params(params, model: str):
  """Parameters of M(p)^-1 (undoes a motion), shape (..., p)."""
  return matrix_to_params(_inv3(params_to_matrix(params, model)), model)


def compose_params(first, second, model: str):
  """Parameters of M(first) M(second), shape (..., p).

  ``warp(warp(image, first), second) ~ warp(image, compose_params(first, second))`` (up to
  interpolation and borders).
  """
  return matrix_to_params(params_to_matrix(first, model) @ params_to_matrix(second, model), model)


def _apply(m, pts):
  """Applies (3, 3) to points of shape (N, 2) (homogeneous division included)."""
  q = pts @ m[:2, :2].T + m[:2, 2]
  w = pts @ m[2, :2] + m[2, 2]
  return q / w[:, None]


def _corners(shape: tuple[int, int]) -> np.ndarray:
  h, w = shape
  return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])


def corner_error(params, reference_params, model: str, shape: tuple[int, int]) -> np.ndarray:
  """Mean distance in pixels between the image corners mapped by two motions.

  The usual accuracy measure of parametric registration (IPOL 2018, Section 5).

  Args:
    params: array of shape (..., p).
    reference_params: array of shape (..., p), broadcastable with ``params``.
    model: motion model of both.
    shape: (height, width) of the image.

  Returns:
    array of shape (...): mean over the 4 corners of ``|M(params) c - M(reference_params) c|``.
  """
  ma = params_to_matrix(np.asarray(params, np.float64), model)
  mb = params_to_matrix(np.asarray(reference_params, np.float64), model)
  ma, mb = np.broadcast_arrays(ma, mb)
  c = np.concatenate([_corners(shape), np.ones((4, 1))], axis=1)  # (4, 3) homogeneous

  def mapped(m):
    q = np.einsum("...ij,kj->...ki", m, c)
    return q[..., :2] / q[..., 2:]

  return np.linalg.norm(mapped(ma) - mapped(mb), axis=-1).mean(axis=-1)


# ------------------------------------------------------------------------------ image helpers


def _correlate1d(img: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
  """Correlation along ``axis`` of (H, W) with an odd kernel, edge-replicated borders."""
  r = len(kernel) // 2
  pad = [(0, 0), (0, 0)]
  pad[axis] = (r, r)
  padded = jnp.pad(img, pad, mode="edge")
  n = img.shape[axis]
  out = jnp.zeros_like(img)
  for k, c in enumerate(kernel):
    out = out + float(c) * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
  return out


def _separable(img: jax.Array, krow: np.ndarray, kcol: np.ndarray) -> jax.Array:
  """Applies ``kcol`` along rows (axis 1, x) and ``krow`` along columns (axis 0, y)."""
  return _correlate1d(_correlate1d(img, kcol, 1), krow, 0)


def _downsample(img: jax.Array) -> jax.Array:
  """(H, W) -> (H // 2, W // 2): blur, then 2x2 means.

  A coarse pixel centre u_c = j + 0.5 sits exactly at the fine position u = 2 j + 1, so the
  continuous coordinates of consecutive levels differ by exactly a factor 2 (odd sizes lose
  their last row/column, which does not move the origin).
  """
  h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
  b = _separable(img, _PYR_BLUR, _PYR_BLUR)[:h, :w]
  return b.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _pyramid(img: jax.Array, n_scales: int) -> list[jax.Array]:
  levels = [img]
  for _ in range(n_scales - 1):
    levels.append(_downsample(levels[-1]))
  return levels


def _keys_weights(t: jax.Array) -> jax.Array:
  """Keys (a = -0.5) cubic weights for offsets -1, 0, 1, 2 at fractional position t; (..., 4)."""
  a = -0.5

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return jnp.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=-1)


def _sample(img: jax.Array, rows: jax.Array, cols: jax.Array, order: int) -> jax.Array:
  """Interpolates (H, W, C) at float pixel indices (N,), (N,); borders edge-replicated -> (N, C)."""
  h, w = img.shape[:2]
  # Non-finite coordinates (a degenerate homography) sample a corner instead of poisoning sums.
  rows = jnp.where(jnp.isfinite(rows), rows, -1.0)
  cols = jnp.where(jnp.isfinite(cols), cols, -1.0)
  if order == 0:
    ri = jnp.clip(jnp.floor(rows + 0.5), 0, h - 1).astype(jnp.int32)
    ci = jnp.clip(jnp.floor(cols + 0.5), 0, w - 1).astype(jnp.int32)
    return img[ri, ci]
  rows = jnp.clip(rows, -2.0, h + 1.0)
  cols = jnp.clip(cols, -2.0, w + 1.0)
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  tr, tc = rows - r0, cols - c0
  if order == 1:
    offs = jnp.arange(0, 2)
    wr = jnp.stack([1 - tr, tr], axis=-1)
    wc = jnp.stack([1 - tc, tc], axis=-1)
  else:
    offs = jnp.arange(-1, 3)
    wr, wc = _keys_weights(tr), _keys_weights(tc)
  ri = jnp.clip(r0.astype(jnp.int32)[:, None] + offs, 0, h - 1)  # (N, k)
  ci = jnp.clip(c0.astype(jnp.int32)[:, None] + offs, 0, w - 1)
  vals = img[ri[:, :, None], ci[:, None, :]]  # (N, k, k, C)
  return jnp.einsum("nijc,ni,nj->nc", vals, wr, wc)


# ------------------------------------------------------------------------------ motion models
#
# The solver is compiled once for all five models: each model is a runtime (8, 8) basis B that
# maps its (zero-padded) parameter increment to the 8 homography entries
# h = (A00 - 1, A01, tx, A10, A11 - 1, ty, h6, h7), plus a flag for the euclidean model whose
# group element needs cos/sin. Unused parameters get zero Jacobian columns and a unit Hessian
# diagonal, so their increments are exactly 0.


def _model_basis(model: str) -> np.ndarray:
  """(8, 8) matrix B with h = B @ [p, 0...] at first order around the identity."""
  b = np.zeros((8, 8), np.float32)
  if model == "homography":
    return np.eye(8, dtype=np.float32)
  b[2, 0] = b[5, 1] = 1.0  # tx, ty
  if model == "euclidean":
    b[1, 2], b[3, 2] = -1.0, 1.0  # d/dtheta of [[c, -s], [s, c]] at 0
  elif model == "similarity":
    b[0, 2] = b[4, 2] = 1.0
    b[1, 3], b[3, 3] = -1.0, 1.0
  elif model == "affine":
    b[0, 2], b[1, 3], b[3, 4], b[4, 5] = 1.0, 1.0, 1.0, 1.0
  return b


def _increment_matrix(dp: jax.Array, basis: jax.Array, euclidean: jax.Array) -> jax.Array:
  """Group element M(dp) of shape (3, 3) from a padded increment (8,) (see `_model_basis`)."""
  h = basis @ dp
  c, s = jnp.cos(dp[2]), jnp.sin(dp[2])
  rot = jnp.array([c - 1, -s, dp[0], s, c - 1, dp[1], 0.0, 0.0])
  h = jnp.where(euclidean, rot, h)
  return jnp.array([[1 + h[0], h[1], h[2]], [h[3], 1 + h[4], h[5]], [h[6], h[7], 1.0]])


def _homography_jacobian(xn: jax.Array, yn: jax.Array) -> jax.Array:
  """dW/dh at the identity for the 8 homography entries; (N,), (N,) -> (N, 2, 8)."""
  one, zero = jnp.ones_like(xn), jnp.zeros_like(xn)
  jx = [xn, yn, one, zero, zero, zero, -xn * xn, -xn * yn]
  jy = [zero, zero, zero, xn, yn, one, -xn * yn, -yn * yn]
  return jnp.stack([jnp.stack(jx, -1), jnp.stack(jy, -1)], axis=-2)


def _solve_spd(hess: jax.Array, b: jax.Array) -> jax.Array:
  """Solves (p, p) x = (p,) for a symmetric positive definite matrix (Gauss-Jordan, no pivot).

  A p-step loop of vector operations: exact enough for these small well-posed systems and much
  cheaper to compile than LAPACK-backed ``jnp.linalg.solve``.
  """
  n = hess.shape[0]
  aug = jnp.concatenate([hess, b[:, None]], axis=1)

  def body(k, a):
    row = a[k] / a[k, k]
    a = a - a[:, k][:, None] * row[None, :]
    return a.at[k].set(row)

  return jax.lax.fori_loop(0, n, body, aug)[:, n]


def _robust_weight(t2: jax.Array, lam: jax.Array, robust: str) -> jax.Array:
  """rho'(t^2) of the IPOL robust error functions (t = intensity difference)."""
  lam2 = lam * lam
  if robust == "quadratic":
    return jnp.ones_like(t2)
  if robust == "lorentzian":
    return 1.0 / (lam2 + t2)
  if robust == "charbonnier":
    return 1.0 / jnp.sqrt(lam2 + t2)
  return lam2 / jnp.square(lam2 + t2)  # geman_mcclure


@dataclasses.dataclass(frozen=True)
class AlignSettings:
  """Settings of the inverse compositional algorithm (defaults: IPOL 2018's).

  Attributes:
    n_scales: pyramid levels (None: as many as keep the coarsest side >= 32 px, at most 5).
    n_iter: iterations per level (IPOL: at most 30).
    robust: robust error function.
    lambda0: initial robust threshold (0-255 intensity scale; IPOL LAMBDA_0 = 80).
    lambda_min: final robust threshold (IPOL LAMBDA_N = 5).
    lambda_ratio: lambda is multiplied by this at every iteration (IPOL LAMBDA_RATIO = 0.9).
    tol: an image stops updating once its increment moves no corner by more than ``tol``
      pixels of the current level (IPOL TOL = 0.001).
    first_scale: finest pyramid level refined (IPOL's "first scale"): 0 refines at full
      resolution; 1 stops at half resolution (about 4x faster, accuracy about halved).
  """

  n_scales: int | None = None
  n_iter: int = 30
  robust: Robust = "lorentzian"
  lambda0: float = 80.0
  lambda_min: float = 5.0
  lambda_ratio: float = 0.9
  tol: float = 1e-3
  first_scale: int = 0


def auto_n_scales(shape: tuple[int, int], min_size: int = 32, max_scales: int = 5) -> int:
  """Pyramid depth keeping the coarsest side >= ``min_size`` pixels (1 to ``max_scales``)."""
  n = 1
  while n < max_scales and min(shape) >> n >= min_size:
    n += 1
  return n


def _level_solve(ref_lvl: jax.Array, img_lvl: jax.Array, m0: jax.Array, basis: jax.Array,
                 euclidean: jax.Array, *, level: int, full_shape: tuple[int, int],
                 st: AlignSettings) -> jax.Array:
  """Inverse compositional iterations at one pyramid level, for a batch.

  Args:
    ref_lvl: reference level image, array of shape (h, w).
    img_lvl: moving images, array of shape (B, h, w).
    m0: current motions in normalised coordinates, array of shape (B, 3, 3).
    basis: (8, 8) model basis; euclidean: () bool flag (see `_model_basis`).

  Returns:
    the refined motions, array of shape (B, 3, 3).
  """
  hf, wf = full_shape
  scale = max(hf, wf) / 2.0  # full-resolution pixels per normalised unit
  step = float(2**level)  # full-resolution pixels per pixel of this level
  h, w = ref_lvl.shape
  cols, rows = jnp.meshgrid(jnp.arange(w, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32))
  cols, rows = cols.ravel(), rows.ravel()
  xn = ((cols + 0.5) * step - wf / 2) / scale
  yn = ((rows + 0.5) * step - hf / 2) / scale
  pts = jnp.stack([xn, yn], axis=-1)

  ref_p = _separable(ref_lvl, _FARID_P, _FARID_P).ravel()
  # Gradient per level pixel -> per normalised unit.
  gx = _separable(ref_lvl, _FARID_P, _FARID_D).ravel() * (scale / step)
  gy = _separable(ref_lvl, _FARID_D, _FARID_P).ravel() * (scale / step)
  jac = _homography_jacobian(xn, yn) @ basis  # (N, 2, 8), zero columns for unused params
  g = gx[:, None] * jac[:, 0] + gy[:, None] * jac[:, 1]  # steepest-descent images (N, 8)
  inner = ((rows >= _BORDER) & (rows < h - _BORDER) & (cols >= _BORDER) & (cols < w - _BORDER))
  unused = jnp.diag((jnp.abs(basis).sum(axis=0) == 0).astype(jnp.float32))
  corners = jnp.asarray(_corners(full_shape) / scale, jnp.float32)

  def solve_one(img: jax.Array, m_init: jax.Array) -> jax.Array:
    img_p = _separable(img, _FARID_P, _FARID_P)[..., None]

    def body(carry):
      i, m, _ = carry
      q = _apply(m, pts)
      c = (q[:, 0] * scale + wf / 2) / step - 0.5
      r = (q[:, 1] * scale + hf / 2) / step - 0.5
      diff = _sample(img_p, r, c, order=3)[:, 0] - ref_p  # I2(W(x; p)) - I1(x)
      inside = (c >= 0) & (c <= w - 1) & (r >= 0) & (r <= h - 1)
      lam = jnp.maximum(st.lambda0 * st.lambda_ratio ** i.astype(jnp.float32), st.lambda_min)
      rho = jnp.where(inside & inner, _robust_weight(diff * diff, lam, st.robust), 0.0)
      hess = g.T @ (rho[:, None] * g)
      b = g.T @ (rho * diff)
      # A tiny ridge keeps textureless inputs finite; it is negligible for real images.
      ridge = 1e-9 * jnp.trace(hess) / 8 + 1e-20
      dp = _solve_spd(hess + unused + ridge * jnp.eye(8), b)
      dp = jnp.where(jnp.all(jnp.isfinite(dp)), dp, jnp.zeros_like(dp))
      m_dp = _increment_matrix(dp, basis, euclidean)
      m_new = m @ _inv3(m_dp)  # inverse compositional update W(p) <- W(p) o W(dp)^-1
      m_new = m_new / m_new[2, 2]
      moved = jnp.max(jnp.linalg.norm(_apply(m_dp, corners) - corners, axis=-1)) * scale / step
      return i + 1, m_new, moved < st.tol

    def cond(carry):
      i, _, done = carry
      return (i < st.n_iter) & ~done

    # Under vmap the loop runs until every image has converged; finished ones stay frozen.
    _, m, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), m_init, jnp.array(False)))
    return m

  return jax.vmap(solve_one)(img_lvl, m0)


@functools.partial(jax.jit, static_argnames=("n_scales", "st"))
def _estimate(reference: jax.Array, images: jax.Array, m_init: jax.Array, basis: jax.Array,
              euclidean: jax.Array, *, n_scales: int, st: AlignSettings) -> jax.Array:
  """Coarse-to-fine estimation; (H, W), (B, H, W), (B, 3, 3) normalised -> (B, 3, 3)."""
  full_shape = reference.shape
  ref_pyr = _pyramid(reference, n_scales)
  img_pyr = jax.vmap(lambda im: _pyramid(im, n_scales))(images)
  m = m_init
  for level in reversed(range(st.first_scale, n_scales)):
    m = _level_solve(ref_pyr[level], img_pyr[level], m, basis, euclidean, level=level,
                     full_shape=full_shape, st=st)
  return m


# ----------------------------------------------------------------------------- public API


def _prepare(arr, name: str, batched: bool) -> np.ndarray:
  """Validates one image (H, W[, C]) or a batch (B, H, W[, C]) -> float32 luma, 0-255 scale."""
  a = np.asarray(arr)
  base = 3 if batched else 2
  if a.ndim not in (base, base + 1):
    want = "(B, H, W) or (B, H, W, C)" if batched else "(H, W) or (H, W, C)"
    raise ValueError(f"{name} should have shape {want}, got {a.shape}")
  if a.ndim == base + 1 and a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{name} should have 1, 3 or 4 channels, got shape {a.shape}")
  x = a.astype(np.float32)
  if a.ndim == base + 1:
    x = x[..., 0] if a.shape[-1] == 1 else x[..., :3] @ np.float32([0.299, 0.587, 0.114])
  if np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_:
    x = x * np.float32(255.0)
  return x


def _checked_reference(reference, settings: AlignSettings) -> tuple[np.ndarray, AlignSettings]:
  """The reference as float32 luma (H, W), and `settings` validated against it, with
  n_scales resolved (`auto_n_scales` when 0)."""
  if settings.robust not in ROBUST_FUNCTIONS:
    raise ValueError(f"unknown robust function {settings.robust!r}; expected one of "
                     f"{ROBUST_FUNCTIONS}")
  if settings.n_iter < 1:
    raise ValueError(f"n_iter must be >= 1, got {settings.n_iter}")
  ref = _prepare(reference, "reference", batched=False)
  return ref, _resolved_settings(ref.shape, settings)


def _resolved_settings(shape: tuple[int, int], settings: AlignSettings) -> AlignSettings:
  """`settings` checked against an (H, W) image shape, n_scales resolved (static work only)."""
  n_scales = settings.n_scales or auto_n_scales(shape)
  if n_scales < 1 or min(shape) >> (n_scales - 1) < 8:
    raise ValueError(f"n_scales={n_scales} is too many for {shape[0]}x{shape[1]} images "
                     f"(the coarsest level must keep >= 8 pixels a side)")
  if not 0 <= settings.first_scale < n_scales:
    raise ValueError(f"first_scale must be in [0, n_scales={n_scales}), got "
                     f"{settings.first_scale}")
  return dataclasses.replace(settings, n_scales=n_scales)


def estimate_motion(reference, images, model: str, *, init=None,
                    settings: AlignSettings = AlignSettings(), batch_size: int = 16) -> jax.Array:
  """Estimates the motion aligning each image on the reference (robust inverse compositional).

  Args:
    reference: the reference image, array of shape (H, W) or (H, W, C), uint8 or float in [0, 1].
    images: the images to align, array of shape (B, H, W) or (B, H, W, C), same H, W.
    model: 'translation', 'euclidean', 'similarity', 'affine' or 'homography'.
    init: optional initial parameters, array of shape (B, p) (default: identity).
    settings: algorithm settings (`AlignSettings`).
    batch_size: images solved together (the last chunk is padded: one compilation per shape,
      shared by all five models).

  Returns:
    array of shape (B, p): ``warp(images, params, model)`` is aligned on ``reference``.

  Raises:
    ValueError: unknown model or robust function, shapes that do not match.

  References:
    Briand, Facciolo, Sanchez, IPOL 2018; Baker & Matthews, IJCV 2004 (inverse compositional).
  """
  _check_model(model)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ref, st = _checked_reference(reference, settings)
  imgs = _prepare(images, "images", batched=True)
  if imgs.shape[1:] != ref.shape:
    raise ValueError(f"images are {imgs.shape[1]}x{imgs.shape[2]} (HxW) but the reference is "
                     f"{ref.shape[0]}x{ref.shape[1]}: resize them to one size first")
  n_scales = st.n_scales
  b, p = imgs.shape[0], n_params(model)
  init = np.zeros((b, p), np.float32) if init is None else np.asarray(init, np.float32)
  if init.shape != (b, p):
    raise ValueError(f"init should have shape ({b}, {p}) for {b} images and model {model!r}, "
                     f"got {init.shape}")
  if b == 0:
    return jnp.asarray(init)
  s = max(ref.shape) / 2.0
  d, d_inv = np.diag([s, s, 1.0]), np.diag([1 / s, 1 / s, 1.0])
  m_init = (d_inv @ params_to_matrix(init.astype(np.float64), model) @ d).astype(np.float32)
  basis = jnp.asarray(_model_basis(model))
  euclidean = jnp.asarray(model == "euclidean")
  chunk = min(batch_size, b)
  out = []
  for start in range(0, b, chunk):
    part, minit = imgs[start:start + chunk], m_init[start:start + chunk]
    n = part.shape[0]
    if n < chunk:  # pad with copies of the reference: same shapes, no recompilation
      part = np.concatenate([part, np.broadcast_to(ref, (chunk - n,) + ref.shape)])
      minit = np.concatenate([minit, np.broadcast_to(np.eye(3, dtype=np.float32),
                                                     (chunk - n, 3, 3))])
    res = _estimate(ref, part, minit, basis, euclidean, n_scales=n_scales, st=st)
    out.append(np.asarray(res, np.float64)[:n])
  m = d @ np.concatenate(out) @ d_inv  # normalised -> pixel frame
  return jnp.asarray(matrix_to_params(m, model).astype(np.float32))


@functools.partial(jax.jit, static_argnames=("order", "mode"))
def _warp_batch(images: jax.Array, mats: jax.Array, cval: jax.Array, *, order: int,
                mode: str) -> jax.Array:
  """(B, H, W, C) float, (B, 3, 3) pixel-centred matrices -> (B, H, W, C)."""
  _, h, w, c = images.shape
  cols, rows = jnp.meshgrid(jnp.arange(w, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32))
  pts = jnp.stack([cols.ravel() + 0.5 - w / 2, rows.ravel() + 0.5 - h / 2], axis=-1)

  def one(img, m):
    q = _apply(m, pts)
    cc = q[:, 0] + w / 2 - 0.5
    rr = q[:, 1] + h / 2 - 0.5
    vals = _sample(img, rr, cc, order)
    if mode == "constant":
      outside = (rr < -0.5) | (rr > h - 0.5) | (cc < -0.5) | (cc > w - 0.5) | ~jnp.isfinite(rr)
      vals = jnp.where(outside[:, None], cval, vals)
    return vals.reshape(h, w, c)

  return jax.vmap(one)(images, mats)


def warp(images, params, model: str, *, order: int = 3, mode: str = "edge",
         cval: float = 0.0) -> jax.Array:
  """Resamples images by motions: ``out(x) = image(M(p) x)`` (aligns them on the reference).

  The same call warps images and their masks identically; bool arrays (masks) are always
  resampled with nearest neighbour so that they stay binary.

  Args:
    images: array of shape (B, H, W) or (B, H, W, C); uint8, bool or float.
    params: array of shape (B, p) (e.g. from `estimate_motion`), or (p,) for all images.
    model: motion model of ``params``.
    order: 0 nearest, 1 bilinear, 3 bicubic (Keys) interpolation (ignored for bool).
    mode: 'edge' (replicate the border) or 'constant' (``cval`` outside the image).
    cval: fill value for mode 'constant' (in the images' own units).

  Returns:
    array of the shape and dtype of ``images`` (integers are rounded and clipped to the dtype).
  """
  _check_model(model)
  if order not in (0, 1, 3):
    raise ValueError(f"order must be 0, 1 or 3, got {order}")
  if mode not in ("edge", "constant"):
    raise ValueError(f"mode must be 'edge' or 'constant', got {mode!r}")
  if not hasattr(images, "ndim"):
    images = np.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f"images should have shape (B, H, W) or (B, H, W, C), got "
                     f"{tuple(images.shape)}")
  b, p = images.shape[0], n_params(model)
  params = np.asarray(params, np.float32)
  if params.shape == (p,):
    params = np.broadcast_to(params, (b, p))
  if params.shape != (b, p):
    raise ValueError(f"params should have shape ({b}, {p}) for {b} images and model {model!r}, "
                     f"got {params.shape}")
  dtype = images.dtype
  x = images if images.ndim == 4 else images[..., None]
  if dtype == np.bool_:
    order = 0
  out = _warp_batch(jnp.asarray(x, jnp.float32), jnp.asarray(params_to_matrix(params, model)),
                    jnp.float32(cval), order=order, mode=mode)
  if images.ndim == 3:
    out = out[..., 0]
  if dtype == np.bool_:
    return out > 0.5
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    return jnp.clip(jnp.round(out), info.min, info.max).astype(dtype)
  return out.astype(dtype)


def _luma(x: jax.Array) -> jax.Array:
  """(..., H, W, C) float32, C in {1, 3, 4} -> (..., H, W) luma (ITU-R 601), as `_prepare` does."""
  return x[..., 0] if x.shape[-1] == 1 else x[..., :3] @ jnp.float32([0.299, 0.587, 0.114])


def align_to_reference(reference: jax.Array, images: jax.Array, model: str,
                       settings: AlignSettings = AlignSettings()) -> tuple[jax.Array, jax.Array]:
  """Aligns uint8 images on a (traced or concrete) uint8 reference: pure and jittable.

  The one alignment path of glad_jax: `Aligner`, `GLAD.fit` / `GLAD.score` and the protocols all
  run it (the reference may be an array field of a model state, traced under ``jax.jit``). Same
  algorithm as `estimate_motion` + `warp`; the motions stay 3x3 float32 matrices instead of going
  through the model's parameters in float64, so aligned pixels can differ from `align`'s by one
  grey level at most.

  Args:
    reference: uint8 array of shape (H, W, C), C in {1, 3}.
    images: uint8 array of shape (B, H, W, C).
    model: motion model (static).
    settings: `AlignSettings` (static); n_scales=None picks `auto_n_scales` of (H, W).

  Returns:
    (aligned uint8 images (B, H, W, C), motions (B, 3, 3)): ``aligned(x) = image(M x)`` in
    pixel-centred coordinates.
  """
  _check_model(model)
  st = _resolved_settings(tuple(reference.shape[:2]), settings)
  ref = _luma(jnp.asarray(reference).astype(jnp.float32))
  x = images.astype(jnp.float32)
  eye = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (x.shape[0], 3, 3))
  s = max(ref.shape) / 2.0
  to_pixels = jnp.asarray(np.diag([s, s, 1.0]), jnp.float32)
  to_normalised = jnp.asarray(np.diag([1 / s, 1 / s, 1.0]), jnp.float32)
  m = _estimate(ref, _luma(x), eye, jnp.asarray(_model_basis(model)),
                jnp.asarray(model == "euclidean"), n_scales=st.n_scales, st=st)
  motions = to_pixels @ m @ to_normalised
  out = _warp_batch(x, motions, jnp.float32(0.0), order=3, mode="edge")
  return jnp.clip(jnp.round(out), 0, 255).astype(images.dtype), motions


def unwarp_maps(maps: jax.Array, motions: jax.Array) -> jax.Array:
  """Maps (B, H, W) in the reference frame -> the frames of the input images (bilinear, border
  replicated): ``out(y) = map(M^{-1} y)``, with the motions of `align_to_reference`."""
  out = _warp_batch(maps[..., None], _inv3(motions), jnp.float32(0.0), order=1, mode="edge")
  return out[..., 0]


def warp_masks(masks: jax.Array, motions: jax.Array) -> jax.Array:
  """Bool masks (B, H, W) warped like their images by `align_to_reference`'s motions (nearest
  neighbour, False outside the image): ground truth in the reference frame."""
  out = _warp_batch(jnp.asarray(masks, jnp.float32)[..., None], motions, jnp.float32(0.0),
                    order=0, mode="constant")
  return out[..., 0] > 0.5


class Aligner:
  """Alignment on one fixed reference as a pure, jittable function of a uint8 batch.

  Validates the reference and settings once on the host, then runs `align_to_reference`.

      aligner = Aligner(reference, "similarity")
      aligned, motions = jax.jit(aligner)(images)       # uint8 (B, H, W, C) -> same, (B, 3, 3)
      back = aligner.unwarp(maps, motions)              # reference frame -> input frames
  """

  def __init__(self, reference, model: str, settings: AlignSettings = AlignSettings()):
    _check_model(model)
    ref, self.settings = _checked_reference(reference, settings)
    self.model = model
    self.shape = ref.shape
    self.reference = jnp.asarray(np.asarray(reference))
    if self.reference.ndim == 2:
      self.reference = self.reference[..., None]

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 images (B, H, W, C), C in {1, 3} -> (aligned uint8 images, motions (B, 3, 3))."""
    return align_to_reference(self.reference, images, self.model, self.settings)

  def unwarp(self, maps: jax.Array, motions: jax.Array) -> jax.Array:
    """See `unwarp_maps`."""
    return unwarp_maps(maps, motions)

  def warp_masks(self, masks: jax.Array, motions: jax.Array) -> jax.Array:
    """See `warp_masks`."""
    return warp_masks(masks, motions)


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Result of `align`.

  Attributes:
    images: aligned images, shape and dtype of the input.
    masks: aligned masks (bool, nearest neighbour) or None.
    params: array of shape (B, p), the motions (`warp` convention).
    model: the motion model.
  """

  images: jax.Array
  masks: jax.Array | None
  params: jax.Array
  model: str


def align(images, model: str, *, reference=None, masks=None,
          settings: AlignSettings = AlignSettings(), mode: str = "edge") -> Alignment:
  """Aligns images (and their masks) on a reference.

  Args:
    images: array of shape (B, H, W) or (B, H, W, C).
    model: motion model.
    reference: array of shape (H, W) or (H, W, C); default ``images[0]``. Pass the first
      *training* image when aligning a test set, so that both share one reference (paper 4.1).
    masks: optional bool array of shape (B, H, W), warped with the images' motions.
    settings: `AlignSettings`.
    mode: border handling of the image warp ('edge' or 'constant' 0).

  Returns:
    An `Alignment`.
  """
  a = images if hasattr(images, "ndim") else np.asarray(images)
  if a.ndim not in (3, 4) or a.shape[0] == 0:
    raise ValueError(f"images should have shape (B, H, W) or (B, H, W, C) with B >= 1, "
                     f"got {tuple(a.shape)}")
  ref = a[0] if reference is None else reference
  if masks is not None:
    masks = np.asarray(masks, bool)
    if masks.shape != tuple(a.shape[:3]):
      raise ValueError(f"masks should have shape {tuple(a.shape[:3])}, got {masks.shape}")
  params = estimate_motion(ref, a, model, settings=settings)
  out = warp(a, params, model, mode=mode)
  out_masks = None if masks is None else warp(masks, params, model, mode="constant")
  return Alignment(out, out_masks, params, model)


__all__ = [
    "MODELS",
    "Aligner",
    "ROBUST_FUNCTIONS",
    "AlignSettings",
    "Alignment",
    "align",
    "align_to_reference",
    "auto_n_scales",
    "compose_params",
    "corner_error",
    "estimate_motion",
    "identity_params",
    "invert_params",
    "matrix_to_params",
    "n_params",
    "params_to_matrix",
    "unwarp_maps",
    "warp",
    "warp_masks",
]
