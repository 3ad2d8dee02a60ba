"""EM against scikit-learn's GaussianMixture (OAS off) and a NumPy transcription (OAS on)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from glad_jax.mixture import EMConfig, GaussianMixture, em_step, fit_em


def _data(seed=0, d=3, sizes=(150, 200, 250), sep=4.0):
  """Overlapping clusters, so that responsibilities are really soft."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(len(sizes), d)) * sep
  return np.concatenate([rng.normal(size=(n, d)) @ (np.eye(d) + 0.4 * rng.normal(size=(d, d))).T
                         + m for m, n in zip(means, sizes)])


def _start(x, k, seed=1):
  rng = np.random.default_rng(seed)
  means = x[rng.choice(len(x), k, replace=False)]
  covs = np.tile(np.cov(x.T, bias=True), (k, 1, 1)) * rng.uniform(0.5, 1.5, size=(k, 1, 1))
  return np.full(k, 1.0 / k), means, covs


def _mixture(w, mu, cov):
  return GaussianMixture(weights=jnp.asarray(w, jnp.float32), means=jnp.asarray(mu, jnp.float32),
                         cov_chol=jnp.asarray(np.linalg.cholesky(cov), jnp.float32))


@pytest.mark.parametrize("n_iter", [1, 6])
def test_matches_sklearn_from_the_same_start(n_iter):
  x = _data()
  w0, mu0, cov0 = _start(x, 4)
  cfg = EMConfig(n_components=4, max_iter=n_iter, tol=0.0, use_oas=False, reg_covar=1e-3)
  reg_abs = cfg.reg_covar * x.var(0).mean()    # our reg_covar is relative to the mean variance
  ours, info = fit_em(x, cfg, init=_mixture(w0, mu0, cov0))
  sk = SkGaussianMixture(4, covariance_type="full", max_iter=n_iter, tol=0.0, reg_covar=reg_abs,
                         weights_init=w0, means_init=mu0, precisions_init=np.linalg.inv(cov0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    sk.fit(x)
  assert info.n_iter == n_iter and ours.n_components == 4 and info.objective == "mixture"
  np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ours.means, sk.means_, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours.covariances, sk.covariances_, rtol=1e-3, atol=1e-4)
  # the mean log-likelihood of the final model, and the per-iteration curve (of the mixture that
  # entered each iteration: the last one is sklearn's lower bound before its last M-step)
  lj = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(x)
                 for w, m, c in zip(np.asarray(ours.weights), np.asarray(ours.means),
                                    np.asarray(ours.covariances, np.float64))], axis=1)
  np.testing.assert_allclose(logsumexp(lj, axis=1).mean(), sk.score(x), rtol=1e-5)
  assert np.all(np.diff(info.loglik) > 0)                       # EM without OAS is monotone


def test_step_with_oas_matches_numpy_soft_counts():
  x = _data(seed=2)
  w0, mu0, cov0 = _start(x, 3, seed=3)
  reg = 1e-3
  lj = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(x)
                 for w, m, c in zip(w0, mu0, cov0)], axis=1)
  resp = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
  nk = resp.sum(0)
  mu = resp.T @ x / nk[:, None]
  ref_cov = []
  for k in range(3):
    diff = x - mu[k]
    s = (resp[:, k, None] * diff).T @ diff / nk[k]
    d = s.shape[0]
    tr, tr_s2 = np.trace(s), np.trace(s @ s)
    rho = min(((1 - 2 / d) * tr_s2 + tr**2) / ((nk[k] + 1 - 2 / d) * (tr_s2 - tr**2 / d)), 1.0)
    ref_cov.append((1 - rho) * s + rho * tr / d * np.eye(d) + reg * np.eye(d))
  step = jax.jit(functools.partial(em_step, use_oas=True, chunk_size=128))
  new, stats = step(_mixture(w0, mu0, cov0), jnp.asarray(x, jnp.float32), reg_covar=reg)
  np.testing.assert_allclose(stats.counts, nk, rtol=1e-4)
  np.testing.assert_allclose(new.weights, nk / len(x), rtol=1e-4)
  np.testing.assert_allclose(new.means, mu, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new.covariances, np.stack(ref_cov), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(stats.loglik, logsumexp(lj, axis=1).mean(), rtol=1e-5)


def test_fit_validates_and_reports_progress():
  x = _data(seed=4)
  with pytest.raises(ValueError, match=r"non-finite .* row 7"):
    fit_em(np.where(np.arange(x.size).reshape(x.shape) == 21, np.nan, x), EMConfig(n_components=2))
  with pytest.raises(ValueError, match=r"n_components \(601\) exceeds the number of samples"):
    fit_em(x, EMConfig(n_components=601))
  seen = []
  mix, info = fit_em(x, EMConfig(n_components=3, max_iter=200), jax.random.key(0),
                     callback=lambda *a: seen.append(a))
  assert info.converged and info.n_iter < 200
  assert [s[1] for s in seen] == list(info.loglik) == list(info.mixture_loglik)
  assert abs(float(jnp.sum(mix.weights)) - 1) < 1e-5
