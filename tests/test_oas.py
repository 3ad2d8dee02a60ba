"""OAS shrinkage (paper Eq. 9) against a NumPy transcription; the scikit-learn difference."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import oas as sklearn_oas

from glad_jax.mixture.oas import oas_covariance, oas_shrinkage


def _eq9(s, n):
  """Eq. 9 of the paper, literally, in float64."""
  d = s.shape[0]
  tr = np.trace(s)
  tr_s2 = np.trace(s @ s)
  den = (n + 1 - 2 / d) * (tr_s2 - tr**2 / d)
  if den == 0:
    return 1.0, s.copy()
  rho = min(((1 - 2 / d) * tr_s2 + tr**2) / den, 1.0)
  return rho, (1 - rho) * s + rho * tr / d * np.eye(d)


def _sample_cov(x):
  """Eq. 3: divided by n."""
  xc = x - x.mean(0)
  return xc.T @ xc / len(x)


@pytest.mark.parametrize("d,ns", [(2, (3, 10, 200)), (5, (2, 4, 6, 50)), (16, (3, 8, 15, 40, 400)),
                                  (64, (5, 30, 63, 65, 1000))])
def test_matches_numpy_eq9_including_n_below_d(d, ns):
  rng = np.random.default_rng(d)
  a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  covs, rhos, refs = [], [], []
  for n in ns:
    s = _sample_cov(rng.normal(size=(n, d)) @ a.T)
    rho, ref = _eq9(s, n)
    covs.append(s)
    rhos.append(rho)
    refs.append(ref)
  counts = jnp.asarray(ns, jnp.float32)
  got_rho = np.asarray(oas_shrinkage(jnp.asarray(np.stack(covs), jnp.float32), counts))
  got = np.asarray(oas_covariance(jnp.asarray(np.stack(covs), jnp.float32), counts))
  np.testing.assert_allclose(got_rho, rhos, rtol=2e-5, atol=1e-6)
  scale = np.abs(np.stack(refs)).max()
  np.testing.assert_allclose(got, np.stack(refs), rtol=1e-4, atol=1e-5 * scale)
  # n < d must actually shrink (the reason OAS is used), and rho must stay in (0, 1].
  assert all(0 < r <= 1 for r in got_rho)
  assert any(r > 0.1 for r, n in zip(got_rho, ns) if n < d) or min(ns) >= d


def test_soft_counts_are_accepted():
  rng = np.random.default_rng(1)
  s = _sample_cov(rng.normal(size=(30, 6)) * np.arange(1, 7))
  for n in (2.5, 7.25, 100.5):
    rho, ref = _eq9(s, n)
    np.testing.assert_allclose(float(oas_shrinkage(jnp.asarray(s[None], jnp.float32),
                                                   jnp.asarray([n], jnp.float32))[0]), rho,
                               rtol=1e-5)


def test_sklearn_uses_a_different_formula():
  """scikit-learn drops the 2/d terms of Eq. 9 (as the docstring of oas.py says)."""
  rng = np.random.default_rng(2)
  d, n = 4, 12
  x = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.5, 0.2])
  s = _sample_cov(x)
  _, sk_rho = sklearn_oas(x)
  ours = float(oas_shrinkage(jnp.asarray(s[None], jnp.float32), jnp.asarray([n], jnp.float32))[0])
  rho_eq9, _ = _eq9(s, n)
  tr, tr_s2 = np.trace(s), np.trace(s @ s)
  rho_without_2_over_d = min((tr_s2 + tr**2) / ((n + 1) * (tr_s2 - tr**2 / d)), 1.0)
  np.testing.assert_allclose(ours, rho_eq9, rtol=1e-5)
  np.testing.assert_allclose(sk_rho, rho_without_2_over_d, rtol=1e-10)
  assert abs(ours - sk_rho) > 0.01 * sk_rho


def test_degenerate_clusters_give_no_nan():
  d = 5
  one_sample = np.zeros((d, d))                       # a 1-sample cluster: S = 0 (0/0 in Eq. 9)
  isotropic = 2.0 * np.eye(d)                         # Tr(S^2) = Tr^2(S)/d: denominator 0
  rank_one = np.outer(np.arange(1.0, d + 1), np.arange(1.0, d + 1))  # a 2-sample cluster
  covs = jnp.asarray(np.stack([one_sample, isotropic, rank_one]), jnp.float32)
  counts = jnp.asarray([1.0, 10.0, 2.0])
  rho = np.asarray(oas_shrinkage(covs, counts))
  out = np.asarray(oas_covariance(covs, counts))
  assert np.all(np.isfinite(rho)) and np.all(np.isfinite(out))
  np.testing.assert_array_equal(rho[:2], [1.0, 1.0])
  np.testing.assert_array_equal(out[0], np.zeros((d, d)))   # OAS cannot repair it: dropped upstream
  np.testing.assert_allclose(out[1], isotropic, rtol=1e-6)
  rho2, ref2 = _eq9(rank_one, 2)
  np.testing.assert_allclose(rho[2], rho2, rtol=1e-5)
  assert np.linalg.eigvalsh(out[2]).min() > 0                # a rank-1 S becomes definite


def test_one_dimension():
  covs = jnp.asarray([[[2.0]], [[0.0]]])
  out = np.asarray(oas_covariance(covs, jnp.asarray([5.0, 1.0])))
  np.testing.assert_allclose(out[:, 0, 0], [2.0, 0.0])
