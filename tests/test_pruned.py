"""Certified candidate pruning of the K-MLE assignment (glad_jax.mixture.pruned) against float64
NumPy / SciPy references and against the dense pass; the tile layout it shares with the M-step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from glad_jax.mixture import GaussianMixture, KMLEConfig, fit_kmle, kmle_step, pruned
from glad_jax.mixture.gaussian import log_joint, precision_cholesky
from glad_jax.mixture import fit
from glad_jax.mixture.kmle import assignment_pass
from glad_jax.mixture.tiles import tile_layout


def _mixture(rng, k, d, spread=3.0):
  """Random anisotropic mixture (float32) and its float64 covariances."""
  means = rng.standard_normal((k, d)) * spread
  a = rng.standard_normal((k, d, d)) * rng.uniform(0.2, 1.0, (k, 1, d))
  covs = a @ np.swapaxes(a, 1, 2) / d + 0.05 * np.eye(d)
  weights = rng.uniform(0.5, 1.5, k)
  weights /= weights.sum()
  mix = GaussianMixture(weights=jnp.asarray(weights, jnp.float32),
                        means=jnp.asarray(means, jnp.float32),
                        cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))
  return mix, means, covs, weights


def _samples(rng, means, covs, n):
  z = rng.integers(0, len(means), n)
  chol = np.linalg.cholesky(covs)
  x = means[z] + np.einsum("nij,nj->ni", chol[z], rng.standard_normal((n, means.shape[1])))
  return x.astype(np.float32)


def _scores64(x, mix):
  """log pi_k + log N(x; mu_k, Sigma_k) in float64 (SciPy), shape (N, K)."""
  w = np.asarray(mix.weights, np.float64)
  mu = np.asarray(mix.means, np.float64)
  chol = np.asarray(mix.cov_chol, np.float64)
  covs = chol @ np.swapaxes(chol, 1, 2)
  return np.stack([np.log(w[k]) + multivariate_normal(mu[k], covs[k]).logpdf(x.astype(np.float64))
                   for k in range(len(w))], axis=1)


def test_tile_layout_groups_items_by_key():
  rng = np.random.default_rng(0)
  n, n_keys, tile = 200, 7, 8
  keys = rng.integers(0, n_keys + 1, n).astype(np.int32)   # n_keys: ignored items
  keys[keys == 3] = 4                                      # an empty key
  lay = jax.jit(tile_layout, static_argnums=(1, 2, 3))(jnp.asarray(keys), n_keys, tile, 4)
  order, dest, owner = (np.asarray(a) for a in (lay.order, lay.dest, lay.owner))
  assert lay.n_tiles % 4 == 0 and lay.n_tiles >= -(-n // tile) + n_keys
  np.testing.assert_array_equal(np.asarray(lay.counts), np.bincount(keys, minlength=n_keys + 1)[:-1])
  valid = keys[order] < n_keys
  assert np.all(valid[:valid.sum()]) and not np.any(valid[valid.sum():])  # ignored items last
  slots = dest[valid]
  assert len(np.unique(dest)) == n                                      # no two items share a slot
  assert np.all(slots < lay.n_tiles * tile) and np.all(dest[~valid] >= lay.n_tiles * tile)
  # Each valid item sits in a tile owned by its key; each key's run fills whole tiles in order.
  np.testing.assert_array_equal(owner[slots // tile], keys[order][valid])
  for key in range(n_keys):
    mine = np.sort(slots[keys[order][valid] == key])
    if mine.size:
      np.testing.assert_array_equal(mine, mine[0] + np.arange(mine.size))
      assert mine[0] % tile == 0
  used = np.unique(slots // tile)
  assert np.all(np.delete(owner, used) == n_keys)                       # the rest is unused


def test_projected_bound_is_an_upper_bound_of_every_score():
  """U_k(u) >= log pi_k + log N(u; k) for every sample and component, any projection rank."""
  rng = np.random.default_rng(1)
  k, d, n = 12, 10, 300
  mix, means, covs, _ = _mixture(rng, k, d)
  x = _samples(rng, means, covs, n)
  ref = _scores64(x, mix)
  for rank in (1, 3, d):
    basis = pruned.projection_basis(jnp.asarray(x), jnp.ones(n, bool), rank)
    np.testing.assert_allclose(np.asarray(basis.T @ basis), np.eye(rank), atol=1e-5)
    w, b = pruned.bound_params(mix, basis)
    bound = np.asarray(log_joint(jnp.asarray(x) @ basis, w, b), np.float64)
    slack = 1e-4 * np.abs(ref) + 1e-3
    assert np.all(bound >= ref - slack), (rank, np.min(bound - ref))
    if rank == d:   # a full-rank projection loses nothing: the bound is the score
      np.testing.assert_allclose(bound, ref, rtol=1e-4, atol=1e-2)


def test_pair_scores_match_scipy():
  rng = np.random.default_rng(2)
  k, d, n = 9, 6, 50
  mix, means, covs, _ = _mixture(rng, k, d)
  mix = mix.replace(weights=mix.weights.at[4].set(0.0))                 # a masked component
  x = _samples(rng, means, covs, n)
  sample = rng.integers(0, n, 400).astype(np.int32)
  component = rng.integers(0, k + 1, 400).astype(np.int32)              # k: skipped pairs
  layout = pruned.pair_layout(jnp.asarray(sample), jnp.asarray(component), k, n, d)
  got = np.asarray(jax.jit(pruned.pair_scores)(jnp.asarray(x), layout, mix,
                                               precision_cholesky(mix.cov_chol),
                                               pruned.log_norms(mix)))
  with np.errstate(divide="ignore"):
    ref = _scores64(x, mix.replace(weights=jnp.where(mix.weights > 0, mix.weights, 1.0)))
  expected = np.where(component < k, ref[sample, np.minimum(component, k - 1)], -np.inf)
  expected[component == 4] = -np.inf
  np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
  finite = np.isfinite(expected)
  np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rank, n_candidates", [(4, 8), (2, 3)])
def test_pruned_pass_gives_the_dense_labels_and_certifies_them(rank, n_candidates):
  """Same labels as the dense pass and as the float64 argmax; rank 2 with 3 candidates is too
  weak a bound for many samples, which the dense fallback must then assign."""
  rng = np.random.default_rng(3)
  k, d, n, cs = 40, 16, 2000, 256
  mix, means, covs, _ = _mixture(rng, k, d)
  mix = mix.replace(weights=mix.weights.at[7].set(0.0) / (1.0 - mix.weights[7]))
  x = _samples(rng, means, covs, n)
  n_pad = 2048
  xp = jnp.asarray(np.pad(x, ((0, n_pad - n), (0, 0))))
  mask = jnp.arange(n_pad) < n
  basis = pruned.projection_basis(xp, mask, rank)
  z, ll, cl, n_fallback = jax.jit(pruned.pruned_assignment_pass,
                                     static_argnames=("chunk_size", "n_candidates"))(
      mix, basis, xp, mask, chunk_size=cs, n_candidates=n_candidates)
  z_dense, ll_dense, cl_dense = jax.jit(assignment_pass, static_argnames="chunk_size")(
      mix, xp, mask, chunk_size=cs)
  z = np.asarray(z)
  np.testing.assert_array_equal(z, np.asarray(z_dense))
  assert np.all(z[n:] == k) and not np.any(z[:n] == 7)
  with np.errstate(divide="ignore"):
    ref = _scores64(x, mix.replace(weights=jnp.where(mix.weights > 0, mix.weights, 1e-300)))
  ref[:, 7] = -np.inf
  top2 = np.sort(ref, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-3
  np.testing.assert_array_equal(z[:n][clear], np.argmax(ref, axis=1)[clear])
  np.testing.assert_allclose(float(cl), ref.max(1).sum(), rtol=1e-5)
  assert float(ll) <= float(ll_dense) + 1e-5 * abs(float(ll_dense))    # logsumexp over candidates
  np.testing.assert_allclose(float(ll), float(ll_dense), rtol=1e-4)
  if n_candidates == 3:
    assert 0 < int(n_fallback) < n
  else:
    assert int(n_fallback) < n // 20


def test_pruned_fit_equals_the_dense_fit():
  """A whole K-MLE fit (OAS, dropped components, K buckets) is the same with projected bounds."""
  rng = np.random.default_rng(4)
  k, d, n = 24, 12, 3000
  _, means, covs, _ = _mixture(rng, k, d)
  x = _samples(rng, means, covs, n)
  cfg = KMLEConfig(n_components=48, max_iter=12, bucket=16, bound_rank=4, n_candidates=6)
  dense, info_d = fit_kmle(x, cfg.replace(assignment="dense"), jax.random.key(1))
  fast, info_f = fit_kmle(x, cfg.replace(assignment="pruned"), jax.random.key(1))
  assert info_d.n_iter == info_f.n_iter and info_d.n_live == info_f.n_live
  assert set(info_d.assignment) == {"dense"} and set(info_d.n_fallback) == {0}
  assert set(info_f.assignment) == {"pruned"}
  assert info_d.label_change == info_f.label_change
  # Same labels; the best scores come from another (equally exact) formula: float32 rounding.
  np.testing.assert_allclose(info_f.class_loglik, info_d.class_loglik, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(dense), jax.tree_util.tree_leaves(fast)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_rule_prunes_large_high_dimensional_fits_only():
  cfg = KMLEConfig(n_components=1000)
  big = dict(hard=True, d=112, k=1024, iteration=2, n=50_000)
  assert fit.use_pruning(cfg, **big)
  assert not fit.use_pruning(cfg, **{**big, "iteration": 1})         # kmle_init's shared covariance
  assert not fit.use_pruning(cfg, **{**big, "d": 40})                # bound too loose at low d
  assert not fit.use_pruning(cfg, **{**big, "n": 1000})              # not worth its compilation
  assert not fit.use_pruning(cfg, **{**big, "hard": False})          # EM has no argmax
  assert not fit.use_pruning(cfg, **{**big, "k": 32})                # K <= 2 C
  assert not fit.use_pruning(cfg.replace(bound_rank=112), **big)
  assert not fit.use_pruning(cfg.replace(assignment="dense"), **big)
  assert fit.use_pruning(cfg.replace(assignment="pruned"), **{**big, "d": 8, "iteration": 1})


def test_bound_ranks_double_while_the_bounds_stay_cheap():
  cfg = KMLEConfig(bound_rank=32)
  assert fit.bound_ranks(cfg, 112) == (32, 64)       # expanded_size 2369 / 6833 = 0.35
  assert fit.bound_ranks(cfg, 256) == (32, 64, 128)  # 8833 / 35073 = 0.25; 256 >= d
  assert fit.bound_ranks(cfg, 40) == (32,)           # 64 >= d
  assert fit.bound_ranks(cfg.replace(assignment="pruned"), 112) == (32,)   # 'pruned': as given
  assert fit.bound_ranks(cfg.replace(bound_rank=200), 112) == (112,)


def test_auto_fit_switches_to_pruning_and_kmle_step_accepts_a_basis(monkeypatch):
  monkeypatch.setattr(fit, "PRUNE_MIN_DIM", 16)      # the rule, at test-sized fits
  monkeypatch.setattr(fit, "PRUNE_MIN_WORK", 0)
  rng = np.random.default_rng(5)
  k, n, d = 40, 4000, 24
  _, means, covs, _ = _mixture(rng, k, d, spread=4.0)
  x = _samples(rng, means, covs, n)
  mix, info = fit_kmle(x, KMLEConfig(n_components=k, max_iter=3, bound_rank=6),
                       jax.random.key(0))
  assert info.assignment == ("dense", "pruned", "pruned")
  xj = jnp.asarray(x - x.mean(0))
  basis = pruned.projection_basis(xj, jnp.ones(n, bool), 6)
  a, sa = kmle_step(mix, xj, chunk_size=500)
  b, sb = kmle_step(mix, xj, chunk_size=500, basis=basis, n_candidates=8)
  np.testing.assert_array_equal(np.asarray(sa.counts), np.asarray(sb.counts))
  np.testing.assert_allclose(np.asarray(a.means), np.asarray(b.means), rtol=1e-6, atol=1e-6)
  assert int(sa.n_fallback) == 0


@pytest.mark.parametrize("changes, message", [
    (dict(assignment="fast"), "assignment must be"),
    (dict(bound_rank=0), "bound_rank must be a positive integer"),
    (dict(n_candidates=2.5), "n_candidates must be a positive integer"),
])
def test_bad_pruning_settings_are_named(changes, message):
  x = np.random.default_rng(6).standard_normal((100, 3)).astype(np.float32)
  with pytest.raises(ValueError, match=message):
    fit_kmle(x, KMLEConfig(n_components=2, **changes))


def test_auto_fit_backs_off_to_dense_and_retries_pruning(monkeypatch):
  """An iteration that leaves more than PRUNE_MAX_FALLBACK uncertified first doubles the bound's
  rank (while the bounds stay cheap: r = 6 -> 12 at d = 24), then runs the next PRUNE_BACKOFF
  iterations dense and tries pruning again, waiting twice as long after each failure; the labels
  (hence the fit) are those of the dense fit."""
  monkeypatch.setattr(fit, "PRUNE_MIN_DIM", 16)
  monkeypatch.setattr(fit, "PRUNE_MIN_WORK", 0)
  monkeypatch.setattr(fit, "PRUNE_MAX_FALLBACK", -1.0)   # every pruned iteration counts as a failure
  rng = np.random.default_rng(6)
  k, n, d = 40, 4000, 24
  _, means, covs, _ = _mixture(rng, k, d, spread=4.0)
  x = _samples(rng, means, covs, n)
  cfg = KMLEConfig(n_components=k, max_iter=12, tol=0.0, bound_rank=6)
  _, info = fit_kmle(x, cfg, jax.random.key(0))
  pruned_at = [i + 1 for i, mode in enumerate(info.assignment) if mode == "pruned"]
  assert fit.bound_ranks(cfg, d) == (6, 12)
  assert pruned_at == [2, 3, 6, 11]                # r = 12 from 3 on, then 2, 4 and 8 dense
  assert [info.bound_rank[i - 1] for i in pruned_at] == [6, 12, 12, 12]
  assert all(info.bound_rank[i] == 0 for i in range(cfg.max_iter) if i + 1 not in pruned_at)
  _, dense = fit_kmle(x, cfg.replace(assignment="dense"), jax.random.key(0))
  np.testing.assert_allclose(info.class_loglik, dense.class_loglik, rtol=1e-5)
