"""Online update of a fitted model: global statistics (mixture/online.py), local counts (online.py),
and the GLAD update (facade, CLI). Float64 NumPy references on tiny data."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from glad_jax.mixture import online as mo
from glad_jax.mixture.gaussian import GaussianMixture
from glad_jax.mixture.oas import oas_covariance


# ------------------------------------------------------------------------------- NumPy references


def np_stats(x, z, k, weight=None):
  """counts, means, scatter about the mean (float64), samples weighted by `weight`."""
  x = np.asarray(x, np.float64)
  w = np.ones(len(x)) if weight is None else np.asarray(weight, np.float64)
  d = x.shape[1]
  counts, means, scatter = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
  for j in range(k):
    sel = z == j
    if not sel.any():
      continue
    wj, xj = w[sel], x[sel]
    counts[j] = wj.sum()
    means[j] = (wj[:, None] * xj).sum(0) / counts[j]
    diff = xj - means[j]
    scatter[j] = (wj[:, None, None] * diff[:, :, None] * diff[:, None, :]).sum(0)
  return counts, means, scatter


def np_oas(s, n):
  """Paper Eq. 9 (with the 2/d terms), float64."""
  d = s.shape[0]
  tr, tr2 = np.trace(s), np.sum(s * s)
  spread = tr2 - tr * tr / d
  if spread <= 1e-12 * max(tr2, 1e-300):
    rho = 1.0
  else:
    rho = min(((1 - 2 / d) * tr2 + tr * tr) / ((n + 1 - 2 / d) * spread), 1.0)
  return (1 - rho) * s + rho * tr / d * np.eye(d)


def np_m_step(counts, means, scatter, reg, use_oas=True, min_size=2):
  """Eq. 2-3, 9: weights, means, covariances of the kept components (float64)."""
  keep = counts >= min_size
  covs = []
  for j in np.nonzero(keep)[0]:
    s = scatter[j] / counts[j]
    covs.append((np_oas(s, counts[j]) if use_oas else s) + reg * np.eye(len(s)))
  w = counts[keep] / counts[keep].sum()
  return w, means[keep], np.array(covs), keep


def np_log_joint(x, w, mu, cov):
  """log pi_k + log N(x; mu_k, Sigma_k), (N, K), float64."""
  x = np.asarray(x, np.float64)
  out = np.zeros((len(x), len(w)))
  for j in range(len(w)):
    d = x.shape[1]
    diff = x - mu[j]
    sol = np.linalg.solve(cov[j], diff.T).T
    _, logdet = np.linalg.slogdet(cov[j])
    out[:, j] = np.log(w[j]) - 0.5 * (np.sum(diff * sol, 1) + logdet + d * np.log(2 * np.pi))
  return out


def clusters(rng, centres, n_each, scale=0.3):
  centres = np.asarray(centres, np.float64)
  d = centres.shape[1]
  x, z = [], []
  for j, c in enumerate(centres):
    a = np.random.default_rng(100 + j).normal(size=(d, d)) * scale   # one shape per cluster index
    x.append(c + rng.normal(size=(n_each[j], d)) @ a)
    z.append(np.full(n_each[j], j))
  return np.concatenate(x).astype(np.float32), np.concatenate(z)


CENTRES = [[0, 0, 0], [6, 0, 0], [0, 6, 0]]
REG = 1e-4


def fitted(rng, n_each=(60, 50, 40)):
  """A 'fitted' mixture: the M-step of its training data's true labels, and their statistics."""
  x, z = clusters(rng, CENTRES, n_each)
  stats = mo.component_statistics(x, z, 3, reg_covar=REG)
  mixture, live = mo.mixture_from_stats(stats)
  assert bool(np.all(np.asarray(live)))
  return x, z, mixture, stats


def as_np(m: GaussianMixture):
  chol = np.asarray(m.cov_chol, np.float64)
  return np.asarray(m.weights, np.float64), np.asarray(m.means, np.float64), chol @ np.swapaxes(chol, 1, 2)


# ------------------------------------------------------------------------------------ statistics


def test_pack_unpack_round_trip():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 5, 5)).astype(np.float32)
  s = a + np.swapaxes(a, 1, 2)
  packed = mo.pack_scatter(jnp.asarray(s))
  assert packed.shape == (4, 15)
  np.testing.assert_array_equal(np.asarray(mo.unpack_scatter(packed, 5)), s)


def test_component_statistics_match_numpy():
  rng = np.random.default_rng(1)
  x, z = clusters(rng, CENTRES, (30, 20, 1))
  x = x + 100.0   # far from the origin: the two-pass scatter keeps float32 accuracy
  z = z.copy()
  z[:3] = 7       # out of range: ignored
  st = mo.component_statistics(x, z, 4)
  c, m, s = np_stats(x[3:], z[3:], 4)
  np.testing.assert_allclose(np.asarray(st.counts), c)
  np.testing.assert_allclose(np.asarray(st.means), m, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(st.scatter), s, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("forgetting", [1.0, 0.3])
def test_merge_of_two_halves_equals_statistics_of_the_whole(forgetting):
  rng = np.random.default_rng(2)
  x, z = clusters(rng, CENTRES, (40, 30, 20))
  perm = rng.permutation(len(x))
  x, z = x[perm], z[perm]
  half = len(x) // 2
  a = mo.component_statistics(x[:half], z[:half], 3)
  b = mo.component_statistics(x[half:], z[half:], 3)
  merged = mo.merge_stats(a, b, forgetting)
  weight = np.where(np.arange(len(x)) < half, forgetting, 1.0)
  c, m, s = np_stats(x, z, 3, weight)
  np.testing.assert_allclose(np.asarray(merged.counts), c, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.means), m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(merged.scatter), s, rtol=1e-4, atol=1e-3)


def test_merge_with_an_empty_side_keeps_the_other():
  rng = np.random.default_rng(3)
  x, z = clusters(rng, CENTRES, (10, 10, 10))
  a = mo.component_statistics(x, z, 3)
  b = mo.component_statistics(x[:10], z[:10], 3)   # components 1, 2 empty here
  merged = mo.merge_stats(a, b)
  np.testing.assert_allclose(np.asarray(merged.means)[1:], np.asarray(a.means)[1:], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.scatter)[1:], np.asarray(a.scatter)[1:], rtol=1e-6)


def test_mixture_from_stats_is_the_m_step_with_oas_of_oas_py():
  rng = np.random.default_rng(4)
  x, z = clusters(rng, CENTRES + [[6, 6, 0]], (25, 15, 8, 1))
  st = mo.component_statistics(x, z, 4, reg_covar=REG)
  mix, live = mo.mixture_from_stats(st)
  np.testing.assert_array_equal(np.asarray(live), [True, True, True, False])   # 1 sample: dropped
  w, mu, cov = as_np(mix)
  c, m, s = np_stats(x, z, 4)
  rw, rmu, rcov, _ = np_m_step(c, m, s, REG)
  np.testing.assert_allclose(w[:3], rw, rtol=1e-6)
  assert w[3] == 0.0
  np.testing.assert_allclose(mu[:3], rmu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cov[:3], rcov, rtol=1e-4, atol=1e-5)
  # The same shrinkage as mixture/oas.py on the merged sample covariance and count.
  want = np.asarray(oas_covariance(st.scatter[:3] / st.counts[:3, None, None], st.counts[:3]))
  np.testing.assert_allclose(cov[:3] - REG * np.eye(3), want, rtol=1e-4, atol=1e-5)


def test_fit_statistics_threshold_is_the_quantile_of_training_log_likelihoods():
  rng = np.random.default_rng(5)
  x, z, mix, _ = fitted(rng)
  st = mo.fit_statistics(mix, x, reg_covar=REG, quantile=0.05)
  w, mu, cov = as_np(mix)
  lj = np_log_joint(x, w, mu, cov)
  ll = np.log(np.sum(np.exp(lj), 1))
  np.testing.assert_allclose(float(st.loglik_threshold), np.quantile(ll, 0.05), rtol=1e-4)
  c, m, s = np_stats(x, np.argmax(lj, 1), 3)
  np.testing.assert_allclose(np.asarray(st.counts), c)
  np.testing.assert_allclose(np.asarray(st.scatter), s, rtol=1e-4, atol=1e-3)
  assert float(st.reg_covar) == pytest.approx(REG)


def test_kmle_final_stats_are_the_last_assignment_and_give_the_mixture_back():
  """FitInfo.final_stats: the NumPy statistics of the labels that the last iteration's input
  mixture gives (Eq. 1), whose M-step (Eq. 2-3, 9) is the returned mixture."""
  from glad_jax.mixture import KMLEConfig, fit_kmle

  rng = np.random.default_rng(7)
  x, _ = clusters(rng, CENTRES + [[6, 6, 0], [3, 3, 3]], (80, 70, 60, 50, 40), scale=0.5)
  x = x + 50.0                                    # far from the origin: the fit centres
  cfg = KMLEConfig(n_components=12, max_iter=4, tol=0.0)
  mix, info = fit_kmle(x, cfg, jax.random.key(3))
  before, _ = fit_kmle(x, cfg.replace(max_iter=3), jax.random.key(3))   # the 4th's input
  w, mu, cov = as_np(before)
  z = np.argmax(np_log_joint(x, w, mu, cov), axis=1)
  c, m, sc = np_stats(x, z, before.n_components)
  kept = c >= cfg.min_cluster_size                # the 4th update drops the smaller clusters
  assert mix.n_components == kept.sum() < before.n_components   # (here: one of them)
  st = info.final_stats
  np.testing.assert_array_equal(np.asarray(st.counts), c[kept])
  np.testing.assert_allclose(np.asarray(st.means), m[kept], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(st.scatter), sc[kept], rtol=1e-3, atol=1e-2)
  assert np.isnan(float(st.loglik_threshold))
  assert float(st.reg_covar) == pytest.approx(1e-6 * np.mean(np.var(x, axis=0)), rel=1e-3)
  back, live = mo.mixture_from_stats(st)
  assert bool(np.all(np.asarray(live)))
  np.testing.assert_allclose(np.asarray(back.weights), np.asarray(mix.weights), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(back.means), np.asarray(mix.means), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(back.cov_chol), np.asarray(mix.cov_chol), atol=1e-5)


def test_layer_update_stats_keep_the_fit_statistics_and_take_the_threshold_from_a_subsample():
  from glad_jax import online
  from glad_jax.mixture import KMLEConfig, fit_kmle

  rng = np.random.default_rng(8)
  x, _ = clusters(rng, CENTRES, (300, 250, 200))
  mix, info = fit_kmle(x, KMLEConfig(n_components=6), jax.random.key(0))
  stats = online.layer_update_stats(mix, x, n_all=len(x), n_images=3, grid_shape=(5, 5),
                                    radius=1.0, quantile=0.01, fit_stats=info.final_stats)
  np.testing.assert_array_equal(np.asarray(stats.mixture.counts),
                                np.asarray(info.final_stats.counts))
  w, mu, cov = as_np(mix)
  lj = np_log_joint(x, w, mu, cov)
  ll = np.log(np.sum(np.exp(lj), axis=1))            # every row: fewer than THRESHOLD_SAMPLE_ROWS
  np.testing.assert_allclose(float(stats.mixture.loglik_threshold), np.quantile(ll, 0.01),
                             rtol=1e-4)
  # Converged: the statistics equal those of one more assignment under the fitted mixture.
  again = online.layer_update_stats(mix, x, n_all=len(x), n_images=3, grid_shape=(5, 5),
                                    radius=1.0, quantile=0.01)
  np.testing.assert_array_equal(np.asarray(again.mixture.counts), np.asarray(stats.mixture.counts))
  np.testing.assert_allclose(np.asarray(again.mixture.scatter_triu),
                             np.asarray(stats.mixture.scatter_triu), rtol=1e-4, atol=1e-3)
  k = mix.n_components
  with pytest.raises(ValueError, match=f"fit_stats has {k - 1} components but the mixture has {k}"):
    online.layer_update_stats(mix, x, n_all=len(x), n_images=3, grid_shape=(5, 5), radius=1.0,
                              fit_stats=info.final_stats.take(np.arange(k - 1)))


# --------------------------------------------------------------------------------------- update


@pytest.mark.parametrize("forgetting", [1.0, 0.5])
def test_update_equals_batch_m_step_on_all_data(forgetting):
  rng = np.random.default_rng(6)
  xa, za, mix, stats = fitted(rng)
  xb, _ = clusters(rng, np.asarray(CENTRES) + 0.4, (20, 30, 25))
  cfg = mo.OnlineConfig(forgetting=forgetting, n_iter=1, new_components=False)
  new_mix, new_stats, info = mo.update_mixture(mix, stats, xb, cfg)
  # Reference: the new samples' labels under the fitted mixture (Eq. 1), then one batch M-step on
  # old + new samples, the old ones weighted by lambda.
  zb = np.argmax(np_log_joint(xb, *as_np(mix)), 1)
  x = np.concatenate([xa, xb])
  z = np.concatenate([za, zb])
  weight = np.concatenate([np.full(len(xa), forgetting), np.ones(len(xb))])
  rw, rmu, rcov, _ = np_m_step(*np_stats(x, z, 3, weight), REG)
  w, mu, cov = as_np(new_mix)
  np.testing.assert_allclose(w, rw, rtol=1e-5)
  np.testing.assert_allclose(mu, rmu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cov, rcov, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new_stats.counts), np_stats(x, z, 3, weight)[0], rtol=1e-6)
  assert info.n_iter == 1 and info.n_added == 0 and info.n_dropped == 0
  np.testing.assert_array_equal(info.index, [0, 1, 2])


def test_update_iterates_to_a_fixed_point():
  rng = np.random.default_rng(7)
  _, _, mix, stats = fitted(rng)
  xb, _ = clusters(rng, CENTRES, (20, 20, 20))
  new_mix, new_stats, info = mo.update_mixture(mix, stats, xb, mo.OnlineConfig(n_iter=10))
  assert info.converged and info.n_iter <= 10
  # At the fixed point the statistics are those of the new samples' labels under the output.
  zb = np.argmax(np_log_joint(xb, *as_np(new_mix)), 1)
  want = np.asarray(stats.counts) + np.bincount(zb, minlength=3)
  np.testing.assert_allclose(np.asarray(new_stats.counts), want)


def test_poorly_explained_samples_create_a_component():
  rng = np.random.default_rng(8)
  xa, _, mix, _ = fitted(rng)
  stats = mo.fit_statistics(mix, xa, reg_covar=REG, quantile=0.001)
  xnew, _ = clusters(rng, [[0.0, 0.0, 9.0]], (80,))
  xold, _ = clusters(rng, CENTRES, (10, 10, 10))
  x = np.concatenate([xold, xnew])
  cfg = mo.OnlineConfig(min_new_samples=20, new_cluster_size=100)
  new_mix, new_stats, info = mo.update_mixture(mix, stats, x, cfg)
  assert info.n_poorly_explained >= 80 and info.n_added == 1 and info.n_dropped == 0
  np.testing.assert_array_equal(info.index, [0, 1, 2, -1])
  np.testing.assert_allclose(np.asarray(new_mix.means)[3], xnew.mean(0), atol=0.2)
  assert float(new_stats.counts[3]) == pytest.approx(80, abs=2)
  # The new samples are now explained about as well as training samples.
  _, ll = mo.assign(new_mix, xnew)
  assert float(np.median(np.asarray(ll))) > float(stats.loglik_threshold)


def test_no_component_is_created_for_well_explained_data():
  rng = np.random.default_rng(9)
  xa, _, mix, _ = fitted(rng)
  stats = mo.fit_statistics(mix, xa, reg_covar=REG, quantile=0.001)
  xb, _ = clusters(rng, CENTRES, (30, 30, 30))
  _, _, info = mo.update_mixture(mix, stats, xb)
  assert info.n_added == 0 and info.n_poorly_explained < 20


def test_forgetting_drops_a_component_whose_mass_falls_below_the_minimum():
  rng = np.random.default_rng(10)
  xa, za, mix, stats = fitted(rng, n_each=(60, 50, 3))
  xb, _ = clusters(rng, CENTRES[:2], (30, 30))
  cfg = mo.OnlineConfig(forgetting=0.5, n_iter=3, new_components=False)   # 3 * 0.5 < 2
  new_mix, new_stats, info = mo.update_mixture(mix, stats, xb, cfg)
  assert new_mix.n_components == 2 and info.n_dropped == 1
  np.testing.assert_array_equal(info.index, [0, 1])
  np.testing.assert_allclose(float(jnp.sum(new_mix.weights)), 1.0, rtol=1e-6)
  assert new_stats.n_components == 2


@pytest.mark.parametrize("bad, message", [
    (dict(forgetting=0.0), "forgetting must be in \\(0, 1\\], got 0.0"),
    (dict(forgetting=1.5), "forgetting must be in \\(0, 1\\], got 1.5"),
    (dict(n_iter=0), "n_iter must be a positive integer, got 0"),
])
def test_update_rejects_bad_config(bad, message):
  rng = np.random.default_rng(11)
  _, _, mix, stats = fitted(rng)
  with pytest.raises(ValueError, match=message):
    mo.update_mixture(mix, stats, np.zeros((5, 3), np.float32), mo.OnlineConfig(**bad))


def test_update_rejects_bad_samples():
  rng = np.random.default_rng(12)
  _, _, mix, stats = fitted(rng)
  with pytest.raises(ValueError, match="new samples have dimension 4, the mixture 3"):
    mo.update_mixture(mix, stats, np.zeros((5, 4), np.float32))
  with pytest.raises(ValueError, match=r"new samples must be a non-empty \(N, d\) array, got shape \(0, 3\)"):
    mo.update_mixture(mix, stats, np.zeros((0, 3), np.float32))
  with pytest.raises(ValueError, match="new samples contain NaN or infinite values"):
    mo.update_mixture(mix, stats, np.full((5, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"statistics \(2 components, d=3\) do not match the mixture \(3, d=3\)"):
    mo.update_mixture(mix, stats.take(np.array([0, 1])), np.zeros((5, 3), np.float32))


# ---------------------------------------------------------------------------------- local weights

from glad_jax import local as local_lib
from glad_jax import online as lo


def np_local_update(log_w, totals, feats, w, mu, cov, index, lam, radius, max_iter):
  """Reference of the local count merge and its warm-started K-MLE, position by position."""
  h, wd, _ = log_w.shape
  m = feats.shape[0]
  index = np.asarray(index)
  old = np.exp(log_w) * lam * totals[..., None]
  c_old = np.where(index >= 0, old[..., np.maximum(index, 0)], 0.0)
  ld = np_log_joint(feats.reshape(-1, feats.shape[-1]), np.ones(len(w)), mu, cov)
  ld = ld.reshape(m, h, wd, len(w))
  offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx <= radius ** 2]
  out = np.full((h, wd, len(w)), -np.inf)
  tot = np.zeros((h, wd))
  for i in range(h):
    for j in range(wd):
      samples = np.array([ld[k, i + dy, j + dx] for dy, dx in offsets for k in range(m)
                          if 0 <= i + dy < h and 0 <= j + dx < wd])
      total = c_old[i, j].sum() + len(samples)
      pi = (c_old[i, j] + len(samples) * w) / total
      prev = None
      for _ in range(max_iter):
        with np.errstate(divide="ignore"):
          c_new = np.bincount(np.argmax(samples + np.log(pi), 1), minlength=len(w))
        if prev is not None and np.array_equal(c_new, prev):
          break
        prev = c_new
        pi = (c_old[i, j] + c_new) / total
      tot[i, j] = total
      with np.errstate(divide="ignore"):
        out[i, j] = np.log(pi)
  return out, tot


def local_case(rng, k_in=4, grid=(3, 4), m_old=2, m_new=3):
  """A fitted-looking sparse local map (counts summing to n(x)), a mixture and new features."""
  h, w = grid
  totals = lo.local_totals(grid, m_old, 1.0)
  counts = np.zeros((h, w, k_in))
  for i in range(h):
    for j in range(w):
      comps = rng.choice(k_in, size=2, replace=False)            # two components per position
      a = rng.integers(1, int(totals[i, j]))
      counts[i, j, comps] = [a, totals[i, j] - a]
  with np.errstate(divide="ignore"):
    log_w = np.log(counts / totals[..., None]).astype(np.float32)
  means = rng.normal(size=(k_in, 2)) * 2.0
  chol = np.tile(np.eye(2) * 0.8, (k_in, 1, 1))
  weights = np.full(k_in, 1.0 / k_in)
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32), means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(chol, jnp.float32))
  feats = (means[rng.integers(0, k_in, size=(m_new, h, w))] + rng.normal(size=(m_new, h, w, 2)) * 0.8)
  return log_w, totals, local_lib.sparsify(log_w), mix, feats.astype(np.float32)


def test_local_totals_count_the_disk_samples():
  t = lo.local_totals((3, 4), 5, 1.0)
  want = 5 * np.array([[3, 4, 4, 3], [4, 5, 5, 4], [3, 4, 4, 3]])
  np.testing.assert_array_equal(t, want)


@pytest.mark.parametrize("max_iter, forgetting", [(1, 1.0), (10, 1.0), (10, 0.5)])
def test_local_update_matches_numpy_count_merge(max_iter, forgetting):
  rng = np.random.default_rng(20)
  log_w, totals, sparse, mix, feats = local_case(rng)
  index = np.arange(4)
  new, new_totals, info = lo.update_local_weights(sparse, totals, feats, mix, index,
                                                  forgetting=forgetting, max_iter=max_iter)
  w, mu, cov = as_np(mix)
  want, want_tot = np_local_update(log_w, totals, feats, w, mu, cov, index, forgetting, 1.0, max_iter)
  got = np.asarray(local_lib.to_dense(new))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new_totals), want_tot, rtol=1e-6)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)
  assert new.n_components == 4 and new.grid_shape == (3, 4)
  assert 1 <= info.n_iter <= max_iter


def test_local_update_remaps_dropped_and_created_components():
  rng = np.random.default_rng(21)
  log_w, totals, sparse, mix, feats = local_case(rng)
  # Component 1 dropped, components kept as 3, 0, 2 (reordered), one created (-1).
  index = np.array([3, 0, 2, -1])
  means = np.concatenate([np.asarray(mix.means)[[3, 0, 2]], [[8.0, 8.0]]])
  new_mix = GaussianMixture(weights=jnp.full((4,), 0.25), means=jnp.asarray(means, jnp.float32),
                            cov_chol=mix.cov_chol)
  feats = feats.copy()
  feats[0, 0, 0] = [8.0, 8.0]             # a sample only the created component explains
  new, new_totals, _ = lo.update_local_weights(sparse, totals, feats, new_mix, index, max_iter=10)
  w, mu, cov = as_np(new_mix)
  want, want_tot = np_local_update(log_w, totals, feats, w, mu, cov, index, 1.0, 1.0, 10)
  got = np.asarray(local_lib.to_dense(new))
  np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new_totals), want_tot, rtol=1e-6)
  assert np.isfinite(got[0, 0, 3]) and np.isfinite(got[1, 0, 3])   # the disk of (0, 0) holds it
  # Totals: what is left of n(x) after dropping component 1, plus the new samples.
  left = totals - np.exp(log_w[..., 1]) * totals
  np.testing.assert_allclose(np.asarray(new_totals), left + lo.local_totals((3, 4), 3, 1.0), rtol=1e-5)


def test_local_update_rejects_bad_input():
  rng = np.random.default_rng(22)
  _, totals, sparse, mix, feats = local_case(rng)
  index = np.arange(4)
  with pytest.raises(ValueError, match=r"new features should have shape \(M, 3, 4, 2\), got \(3, 4, 4, 2\)"):
    lo.update_local_weights(sparse, totals, np.zeros((3, 4, 4, 2), np.float32), mix, index)
  with pytest.raises(ValueError, match=r"no new images \(features of shape \(0, ...\)\)"):
    lo.update_local_weights(sparse, totals, feats[:0], mix, index)
  with pytest.raises(ValueError, match="index should map the 4 updated components into the 4 fitted ones"):
    lo.update_local_weights(sparse, totals, feats, mix, np.array([0, 1, 2, 4]))
  with pytest.raises(ValueError, match=r"forgetting must be in \(0, 1\], got 2.0"):
    lo.update_local_weights(sparse, totals, feats, mix, index, forgetting=2.0)


# --------------------------------------------------------------------------- GLAD.update, glad update

import hashlib
import pathlib

from PIL import Image

from glad_jax import cli
from glad_jax.config import GLADConfig
from glad_jax.model import GLAD

from conftest import texture, with_defect

TINY = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=20)


def brighter(images, by=70):
  return np.clip(images.astype(np.int32) + by, 0, 255).astype(np.uint8)


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_update_with_brighter_good_images_brings_their_scores_down():
  """A line whose images got brighter: after an update with such good images they score like ordinary good
  images, while anomalies (bright or not) still score above the threshold kept from the fit."""
  rng = np.random.default_rng(1)
  train = np.stack([texture(rng) for _ in range(12)])
  good = np.stack([texture(rng) for _ in range(6)])
  bad = np.stack([with_defect(texture(rng), rng)[0] for _ in range(6)])
  new_train = brighter(np.stack([texture(rng) for _ in range(12)]))
  new_good = brighter(np.stack([texture(rng) for _ in range(6)]))
  new_bad = brighter(np.stack([with_defect(texture(rng), rng)[0] for _ in range(6)]))
  model = GLAD(TINY).fit(train).calibrate(good, fpr=0.2)
  threshold = model.image_threshold
  before = model.score(new_good).image_scores
  assert before.min() > 2 * threshold          # the shifted appearance looks anomalous at first
  model.update(new_train)
  assert model.image_threshold == threshold   # no holdout: thresholds kept
  after_new = model.score(new_good).image_scores
  after_good = model.score(good).image_scores
  assert np.median(after_new) <= 1.05 * np.max(after_good)
  assert np.max(after_new) < 1.1 * threshold
  assert model.score(bad).image_scores.min() > 2 * threshold
  assert model.score(new_bad).image_scores.min() > 2 * threshold
  record = model.state.update_history[-1]
  assert record.n_images == 12 and record.forgetting == 1.0 and not record.recalibrated


@pytest.fixture(scope="module")
def small_fit():
  """A fitted tiny model and its images (never modified by a test: tests update copies)."""
  rng = np.random.default_rng(3)
  train = np.stack([texture(rng) for _ in range(6)])
  new = np.stack([texture(rng) for _ in range(4)])
  return GLAD(TINY.replace(max_iter=5)).fit(train), new


def test_update_keeps_the_original_model_and_records_history(small_fit):
  model, new = small_fit
  copy = model.copy()
  before = copy.state
  copy.update(new[:3], holdout=new[3:], fpr=0.5)
  assert model.state is before or model.state.update_history == ()   # the fixture is untouched
  assert copy.state.update_history[-1].recalibrated
  assert copy.state.update_history[-1].n_images == 3
  assert copy.image_threshold == pytest.approx(float(np.quantile(copy.score(new[3:]).image_scores, 0.5)))
  for name, stats in copy.state.update_stats.items():
    assert float(stats.n_images) == 9.0
    assert stats.mixture.n_components == copy.state.layers[name].n_components


def test_update_errors_are_one_line_and_clear(small_fit):
  model, new = small_fit
  copy = model.copy()
  with pytest.raises(ValueError, match=r"new images are 32x32x3 but the model was fitted on 64x64x3 images"):
    copy.update(new[:, :32, :32])
  with pytest.raises(ValueError, match=r"new images are 64x64x1 but the model was fitted on 64x64x3 images"):
    copy.update(new[..., 0])
  with pytest.raises(ValueError, match=r"no images given \(empty list\)"):
    copy.update([])
  with pytest.raises(ValueError, match=r"forgetting must be in \(0, 1\], got 0"):
    copy.update(new, forgetting=0)
  stale = GLAD.from_state(model.state.replace(update_stats=None))
  with pytest.raises(ValueError, match="cannot update this model: it has no update statistics .* refit it "
                                       "with `glad fit`"):
    stale.update(new)


def _write_images(folder: pathlib.Path, images) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(folder / f"{i:03d}.png")
  return folder


def test_cli_update_writes_a_new_checkpoint_and_leaves_the_original_byte_identical(small_fit, tmp_path, capsys):
  model, new = small_fit
  ckpt = tmp_path / "ck"
  model.save(ckpt)
  digest = tree_digest(ckpt)
  images = _write_images(tmp_path / "new", new)
  out = tmp_path / "ck2"
  rc = cli.main(["--quiet", "update", str(ckpt), str(images), "--out", str(out), "--holdout", "0.25",
                 "--fpr", "0.5"])
  assert rc == 0
  assert tree_digest(ckpt) == digest
  updated = GLAD.load(out)
  assert updated.state.update_history[-1].n_images == 3 and updated.state.update_history[-1].recalibrated
  capsys.readouterr()
  assert cli.main(["info", str(out)]) == 0
  text = capsys.readouterr().out
  assert "updates: 1" in text and "3 images" in text and "thresholds recalibrated" in text


def test_cli_update_refuses_bad_input(small_fit, tmp_path, capsys):
  model, new = small_fit
  ckpt = tmp_path / "ck"
  model.save(ckpt)
  digest = tree_digest(ckpt)
  images = _write_images(tmp_path / "new", new)
  small = _write_images(tmp_path / "small", new[:, :32, :32])
  gray = _write_images(tmp_path / "gray", new[..., 0])
  (tmp_path / "empty").mkdir()
  stale = tmp_path / "stale"
  GLAD.from_state(model.state.replace(update_stats=None)).save(stale)
  cases = [
      ([str(ckpt), str(images), "--out", str(ckpt)], "is the checkpoint being updated"),
      ([str(ckpt), str(small), "--out", str(tmp_path / "o1")],
       "000.png is 32x32 with 3 channels but the model was fitted on 64x64 images with 3 channels"),
      ([str(ckpt), str(gray), "--out", str(tmp_path / "o2")],
       "000.png is 64x64 with 1 channel but the model was fitted on 64x64 images with 3 channels"),
      ([str(ckpt), str(tmp_path / "empty"), "--out", str(tmp_path / "o3")], "no image in"),
      ([str(stale), str(images), "--out", str(tmp_path / "o4")],
       "cannot update this model: it has no update statistics"),
  ]
  for argv, message in cases:
    capsys.readouterr()
    assert cli.main(["--quiet", "update"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glad: error: ") and message in err and "\n" not in err
  assert tree_digest(ckpt) == digest
  assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_update_uses_each_layers_own_radius():
  """radius="auto" may give the layers different radii: the local update of a layer counts the new images'
  samples over that layer's disk (stored with its model), and a model stored before the per-layer radius
  falls back to its configuration's number."""
  from glad_jax import scoring
  from glad_jax.methods import glad as glad_method

  rng = np.random.default_rng(4)
  feats = {"layer1": rng.normal(size=(12, 6, 6, 2)).astype(np.float32)}
  cfg = GLADConfig(layers=("layer1",), image_size=24, n_components=3, max_iter=10, local_max_iter=10, radius=2.0)
  state = glad_method.fit(feats, cfg, jax.random.key(0))
  assert state.layers["layer1"].radius == 2.0
  new = {"layer1": rng.normal(size=(4, 6, 6, 2)).astype(np.float32)}
  updated = glad_method.update(state, new)
  # The same update with the stored radius said explicitly, and with another radius (different counts).
  lm, stats = state.layers["layer1"], state.update_stats["layer1"]
  upd = lo.UpdateConfig()
  key = jax.random.fold_in(jax.random.key(upd.seed), 0)
  same, _, _ = lo.update_layer(lm, state.mixture("layer1"), stats, new["layer1"], upd, use_oas=True, radius=2.0,
                                   key=key)
  other, _, _ = lo.update_layer(lm, state.mixture("layer1"), stats, new["layer1"], upd, use_oas=True,
                                    radius=1.0, key=key)
  got = updated.layers["layer1"]
  assert got.radius == 2.0
  np.testing.assert_array_equal(np.asarray(got.local.tile_log_weight), np.asarray(same.local.tile_log_weight))
  assert (np.asarray(other.local.tile_log_weight).shape != np.asarray(same.local.tile_log_weight).shape
          or not np.array_equal(np.asarray(other.local.tile_log_weight), np.asarray(same.local.tile_log_weight)))
  old_style = lm.replace(radius=None)
  assert lo.layer_radius(old_style, cfg) == 2.0 and lo.layer_radius(lm, cfg.replace(radius="auto")) == 2.0
  with pytest.raises(ValueError, match="refit"):
    lo.layer_radius(old_style, cfg.replace(radius="auto"))
  assert isinstance(got, scoring.LayerModel)
