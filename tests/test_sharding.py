"""Data parallelism: 8 forced host devices give the same model as 1 device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glad_jax import sharding


def test_pad_rows_and_placement_on_one_device():
  x = np.arange(10.0).reshape(5, 2)
  xp, mask = sharding.pad_rows(x, 8)
  assert isinstance(xp, np.ndarray) and xp.shape == (8, 2)
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(xp[5:], 0)
  xj, mj = sharding.pad_rows(jnp.asarray(x), 6)
  assert isinstance(xj, jax.Array) and xj.shape == (6, 2) and int(mj.sum()) == 5
  assert sharding.padded_size(5, 4) == 8 and sharding.padded_size(8, 4) == 8
  assert sharding.padded_size(0, 4) == 4
  mesh = sharding.make_mesh()
  xd, md = sharding.place_samples(x, mesh, multiple=3)
  assert xd.shape[0] % (3 * sharding.mesh_size(mesh)) == 0 and int(md.sum()) == 5


def test_data_parallel_sum_without_mesh_is_the_function():
  fn = lambda p, x, m: jnp.sum(jnp.where(m[:, None], x * p, 0.0))
  assert sharding.data_parallel_sum(fn, None) is fn
  with pytest.raises(ValueError, match="at least one device"):
    sharding.make_mesh([])


_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from glad_jax import sharding
    from glad_jax.mixture import EMConfig, KMLEConfig, fit_em, fit_kmle

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh()
    out = {}

    # a psum'd masked reduction over 8 shards with padding rows
    x = np.random.default_rng(0).normal(size=(1001, 3)).astype(np.float32)
    xd, md = sharding.place_samples(x, mesh, multiple=16)
    assert len(xd.sharding.device_set) == 8 and xd.shape[0] % 128 == 0
    total = sharding.data_parallel_sum(
        lambda p, xl, ml: p * jnp.sum(jnp.where(ml[:, None], xl, 0.0), axis=0), mesh)
    out["psum"] = np.asarray(jax.jit(total)(jnp.float32(2.0), xd, md))
    out["psum_ref"] = 2.0 * x.astype(np.float64).sum(0)

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 5)) * 6
    x = np.concatenate([rng.normal(size=(n, 5)) + c for n, c in zip([30, 25, 40, 35, 28, 33],
                                                                   centres)])
    # EM: a fixed number of iterations (with OAS its log-likelihood is not monotone, and near
    # tol = 1e-6 float32 summation order alone can decide whether it stops one step earlier).
    # kmle_pruned: the certified candidate pruning of the assignment (its dense fallback runs on
    # every shard that needs it) must give the dense model too.
    for name, fit, cfg in [("kmle", fit_kmle, KMLEConfig(n_components=24, chunk_size=32)),
                           ("kmle_pruned", fit_kmle,
                            KMLEConfig(n_components=24, chunk_size=32, assignment="pruned",
                                       bound_rank=2, n_candidates=4)),
                           ("em", fit_em, EMConfig(n_components=6, max_iter=3, tol=0.0,
                                                   chunk_size=32))]:
      for tag, m in [("sharded", mesh), ("single", None)]:
        mix, info = fit(x, cfg, jax.random.key(7), mesh=m)
        out[f"{name}_{tag}_w"] = np.asarray(mix.weights)
        out[f"{name}_{tag}_mu"] = np.asarray(mix.means)
        out[f"{name}_{tag}_cov"] = np.asarray(mix.covariances)
        out[f"{name}_{tag}_ll"] = np.asarray(info.loglik)
        out[f"{name}_{tag}_live"] = np.asarray(info.n_live)
    np.savez(sys.argv[1], **out)
""")


def test_eight_devices_give_the_same_model_as_one(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  path = tmp_path / "out.npz"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = np.load(path)
  np.testing.assert_allclose(r["psum"], r["psum_ref"], rtol=1e-5)
  for name in ("kmle", "kmle_pruned", "em"):
    s, o = f"{name}_sharded_", f"{name}_single_"
    assert r[s + "w"].shape == r[o + "w"].shape                     # same K after pruning
    np.testing.assert_array_equal(r[s + "live"], r[o + "live"])
    np.testing.assert_allclose(r[s + "w"], r[o + "w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r[s + "mu"], r[o + "mu"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r[s + "cov"], r[o + "cov"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r[s + "ll"], r[o + "ll"], rtol=1e-5)
  assert r["kmle_single_w"].shape[0] < 24                         # pruning did happen
  for field in ("w", "mu", "cov"):
    np.testing.assert_allclose(r[f"kmle_pruned_single_{field}"], r[f"kmle_single_{field}"],
                               rtol=1e-5, atol=1e-5)


def test_place_samples_marks_given_padding_and_to_local_keeps_values():
  x = np.arange(12.0, dtype=np.float32).reshape(6, 2)
  mesh = sharding.make_mesh()
  xd, md = sharding.place_samples(x, mesh, multiple=4, n_valid=4)   # rows 4, 5 are padding
  assert xd.shape[0] % (4 * sharding.mesh_size(mesh)) == 0
  np.testing.assert_array_equal(np.asarray(md), np.arange(xd.shape[0]) < 4)
  np.testing.assert_array_equal(np.asarray(xd)[:6], x)
  with pytest.raises(ValueError, match=r"n_valid should be in \[0, 6\]"):
    sharding.place_samples(x, mesh, n_valid=7)
  tree = {"a": sharding.replicate(jnp.ones((3,)), mesh), "b": 2.0}
  local = sharding.to_local(tree, mesh)
  assert local["a"].sharding.device_set == {jax.local_devices()[0]} and local["b"] == 2.0
  np.testing.assert_array_equal(np.asarray(local["a"]), np.ones(3))
