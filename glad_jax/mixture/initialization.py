"""Initialisation and input validation of the mixture fits.

* `kmle_init`: k-means++ means on a random subsample, the global covariance, equal weights
  (the starting point of K-MLE and of EM).
* `validate_samples`, `validate_config`, `validate_init`: the checks run once at the edge of
  `fit.fit_mixture`, each failure one `ValueError` naming the value; the math below trusts its
  input.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax.mixture.gaussian import GaussianMixture

if TYPE_CHECKING:
  from glad_jax.mixture.fit import KMLEConfig

_HIGHEST = jax.lax.Precision.HIGHEST


def _kmeans_pp(key: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """k-means++ (D^2) seeding: k rows of `points` (m, d), each drawn with prob. ~ distance^2."""
  m = points.shape[0]
  keys = jax.random.split(key, k)
  first = points[jax.random.randint(keys[0], (), 0, m)]
  centers = jnp.zeros((k,) + points.shape[1:], points.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(points - first), axis=1)

  def body(i, carry):
    centers, d2 = carry
    # If every point coincides with a centre (duplicated data), fall back to uniform: the
    # duplicate components then lose every tie in Eq. 1 and are dropped after one step.
    logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    logits = jnp.where(jnp.any(d2 > 0), logits, 0.0)
    c = points[jax.random.categorical(keys[i], logits)]
    return centers.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(points - c), axis=1))

  centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
  return centers


@functools.partial(jax.jit, static_argnames=("n_components", "n_samples", "init_sample_size"))
def kmle_init(key: jax.Array, x: jax.Array, n_components: int, *, n_samples: int | None = None,
              init_sample_size: int = 10_000, reg_covar: jax.Array | float = 0.0
              ) -> GaussianMixture:
  """Initial mixture: k-means++ means on a random subsample, the global covariance, pi = 1/K.

  Seeding runs on ``min(N, max(init_sample_size, 4 K))`` rows drawn without replacement, so its
  cost O(init_sample_size * K * d) does not grow with N (N ~ 1e6, K = 1000 is fine). Every
  component starts with the covariance of the whole data set (plus ``reg_covar * I``), which
  makes the first assignment a Mahalanobis nearest-mean rule.

  Args:
    key: a `jax.random` key.
    x: array of shape (N_rows, d); only the first `n_samples` rows are data (the rest is
      padding, e.g. from `sharding.place_samples`).
    n_components: K (<= n_samples).
    n_samples: number of data rows (default: all rows).
    init_sample_size: size of the seeding subsample.
    reg_covar: absolute floor added to the diagonal of the initial covariance.

  Returns:
    a `GaussianMixture` with K components.
  """
  n = x.shape[0] if n_samples is None else n_samples
  d = x.shape[1]
  m = min(n, max(init_sample_size, 4 * n_components))
  k_sub, k_pp = jax.random.split(key)
  # Drawn among range(n) (not the padded row count): the same seed gives the same subsample
  # whatever the padding, hence the same model sharded or not.
  idx = jax.random.choice(k_sub, n, (m,), replace=False)
  means = _kmeans_pp(k_pp, x[idx], n_components)
  valid = (jnp.arange(x.shape[0]) < n)[:, None]
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=0) / n
  xc = jnp.where(valid, x - mean, 0.0)
  cov = jnp.dot(xc.T, xc, precision=_HIGHEST) / n + reg_covar * jnp.eye(d, dtype=x.dtype)
  chol = jnp.linalg.cholesky(cov)
  return GaussianMixture(weights=jnp.full((n_components,), 1.0 / n_components, x.dtype),
                         means=means,
                         cov_chol=jnp.broadcast_to(chol, (n_components, d, d)))



def validate_samples(x: Any) -> Any:
  """Checks x once, at the edge; returns it as float32 (NumPy or JAX, as given)."""
  if isinstance(x, jax.Array):
    xp = jnp
  else:
    xp = np
    try:
      x = np.asarray(x)
    except (TypeError, ValueError) as e:
      raise ValueError(f"x must be a numeric array of shape (n_samples, n_features): {e}") from e
  if x.ndim != 2:
    raise ValueError(f"x must be a 2-D array of shape (n_samples, n_features), got shape "
                     f"{tuple(x.shape)}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == np.bool_):
    raise ValueError(f"x must hold real numbers, got dtype {x.dtype}")
  n, d = x.shape
  if n == 0 or d == 0:
    raise ValueError(f"x is empty: got shape {tuple(x.shape)}")
  with np.errstate(over="ignore"):   # values beyond float32 become inf and are reported below
    x = x.astype(xp.float32)
  bad = ~xp.isfinite(x)
  n_bad = int(xp.sum(bad))
  if n_bad:
    row = int(xp.argmax(xp.any(bad, axis=1)))
    raise ValueError(f"x contains {n_bad} non-finite values (NaN or inf) in float32, the first "
                     f"in row {row}")
  if n < d:
    raise ValueError(f"x has fewer samples ({n}) than dimensions ({d}): a full-covariance "
                     f"mixture needs n_samples >= n_features")
  return x


def validate_config(config: KMLEConfig, n: int) -> None:
  """Checks every field of `config` (a `fit.KMLEConfig`) for a fit on n samples."""
  k = config.n_components
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"n_components must be a positive integer, got {k!r}")
  if k > n:
    raise ValueError(f"n_components ({k}) exceeds the number of samples ({n})")
  if not isinstance(config.max_iter, (int, np.integer)) or config.max_iter < 1:
    raise ValueError(f"max_iter must be a positive integer, got {config.max_iter!r}")
  if not config.tol >= 0:
    raise ValueError(f"tol must be >= 0, got {config.tol!r}")
  if not config.reg_covar >= 0:
    raise ValueError(f"reg_covar must be >= 0, got {config.reg_covar!r}")
  if config.min_cluster_size < 2:
    raise ValueError(f"min_cluster_size must be >= 2 (a 1-sample cluster has zero scatter), got "
                     f"{config.min_cluster_size!r}")
  if config.chunk_size is not None and (not isinstance(config.chunk_size, (int, np.integer))
                                        or config.chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None, got "
                     f"{config.chunk_size!r}")
  if not isinstance(config.bucket, (int, np.integer)) or config.bucket < 1:
    raise ValueError(f"bucket must be a positive integer, got {config.bucket!r}")
  if not isinstance(config.init_sample_size, (int, np.integer)) or config.init_sample_size < 1:
    raise ValueError(f"init_sample_size must be a positive integer, got "
                     f"{config.init_sample_size!r}")
  if config.assignment not in ("auto", "dense", "pruned"):
    raise ValueError(f"assignment must be 'auto', 'dense' or 'pruned', got {config.assignment!r}")
  for name in ("bound_rank", "n_candidates"):
    value = getattr(config, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if config.label_tol is not None and not 0 <= config.label_tol < 1:
    raise ValueError(f"label_tol must be None or in [0, 1), got {config.label_tol!r}")


def validate_init(init: GaussianMixture, d: int) -> GaussianMixture:
  """Checks a user-given starting mixture in dimension d; returns it normalised, float32."""
  w, mu, chol = (np.asarray(a, np.float32) for a in (init.weights, init.means, init.cov_chol))
  k = w.shape[0] if w.ndim == 1 else -1
  if w.ndim != 1 or mu.shape != (k, d) or chol.shape != (k, d, d):
    raise ValueError(f"init must have weights (K,), means (K, {d}), cov_chol (K, {d}, {d}); got "
                     f"{w.shape}, {mu.shape}, {chol.shape}")
  if not (np.all(np.isfinite(w)) and np.all(np.isfinite(mu)) and np.all(np.isfinite(chol))):
    raise ValueError("init contains non-finite values")
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError("init weights must be >= 0 with a positive sum")
  diag = np.diagonal(chol, axis1=1, axis2=2)
  if np.any(diag[w > 0] <= 0):
    raise ValueError("init cov_chol must be lower Cholesky factors with a positive diagonal")
  return GaussianMixture(weights=jnp.asarray(w / w.sum()), means=jnp.asarray(mu),
                         cov_chol=jnp.asarray(np.tril(chol)))
