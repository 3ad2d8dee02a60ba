"""Every matrix product of the fits and scorers asks for full float32 precision (HIGHEST).

On GPUs the default precision of a float32 matmul is TF32 (10-bit mantissa), which moves
log-densities of d ~ 100 features by ~1e-2 and flips K-MLE assignments; CPUs ignore the flag, so
only the traced program shows it. These tests trace each step with `jax.make_jaxpr`, walk every
sub-jaxpr (scan, while, cond, pjit, shard_map, custom_jvp/vjp, ...) and list each `dot_general`
whose `precision` parameter is not (HIGHEST, HIGHEST), with its source line.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glad_jax import baselines, local, scoring
from glad_jax.mixture import em, kmle, pruned
from glad_jax.mixture.gaussian import GaussianMixture

_HIGHEST = jax.lax.Precision.HIGHEST


def _sub_jaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a sequence)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _where(eqn) -> str:
  frames = [f for f in eqn.source_info.traceback.frames if "glad_jax/" in f.file_name and "/tests/" not in f.file_name] \
      if eqn.source_info.traceback is not None else []
  return f"{frames[0].file_name}:{frames[0].line_num}" if frames else "?"


def dot_precisions(jaxpr) -> list[tuple[object, str]]:
  """(precision, source) of every dot_general in `jaxpr` and all its sub-jaxprs."""
  if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((eqn.params["precision"], _where(eqn)))
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        found.extend(dot_precisions(sub))
  return found


def _is_highest(precision) -> bool:
  return (isinstance(precision, tuple) and len(precision) == 2
          and all(p == _HIGHEST for p in precision))


def assert_all_highest(fn, *args):
  found = dot_precisions(jax.make_jaxpr(fn)(*args))
  assert found, "no dot_general traced: the test would not notice a missing precision"
  bad = sorted({f"{where} (precision={p})" for p, where in found if not _is_highest(p)})
  assert not bad, "dot_general without precision=HIGHEST:\n  " + "\n  ".join(bad)


def _mixture(k=6, d=4, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, d, d)) * 0.3
  covs = 0.5 * np.eye(d) + a @ np.swapaxes(a, 1, 2)
  return GaussianMixture(weights=jnp.full((k,), 1.0 / k),
                         means=jnp.asarray(rng.standard_normal((k, d)), jnp.float32),
                         cov_chol=jnp.asarray(np.linalg.cholesky(covs), jnp.float32))


def _samples(n=64, d=4, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


def test_walker_sees_a_default_precision_dot_inside_nested_control_flow():
  """The check itself: a default-precision product under scan/cond/jit is reported."""
  def fn(x):
    def body(c, xi):
      y = jax.lax.cond(xi[0] > 0, lambda v: jnp.dot(v, v.T), lambda v: jnp.dot(
          v, v.T, precision=_HIGHEST), xi[None])
      return c + jnp.sum(y), None
    return jax.jit(lambda x: jax.lax.scan(body, 0.0, x)[0])(x)

  with pytest.raises(AssertionError, match="without precision=HIGHEST"):
    assert_all_highest(fn, _samples())
  assert_all_highest(lambda x: jax.lax.scan(
      lambda c, xi: (c + jnp.dot(xi, xi, precision=_HIGHEST), None), 0.0, x)[0], _samples())


def test_kmle_step_dense_and_pruned():
  mix, x = _mixture(k=40), _samples(256)
  assert_all_highest(lambda m, x: kmle.kmle_step(m, x, chunk_size=64), mix, x)
  basis = jnp.eye(4, 2)
  assert_all_highest(lambda m, x: kmle.kmle_step(m, x, chunk_size=64, basis=basis,
                                                 n_candidates=4), mix, x)
  assert_all_highest(lambda key, x: kmle.kmle_init(key, x, 6), jax.random.key(0), x)
  assert_all_highest(lambda x: pruned.projection_basis(x, jnp.ones((256,), bool), 2), x)


def test_em_step():
  assert_all_highest(lambda m, x: em.em_step(m, x, chunk_size=64), _mixture(), _samples())


def test_local_weight_fit():
  mix = _mixture()
  feats = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 6, 4)), jnp.float32)
  assert_all_highest(lambda f: local.fit_local_log_weights(f, mix, max_iter=3)[0], feats)


def test_fused_scorer():
  mix = _mixture()
  rng = np.random.default_rng(3)
  feats = {"a": jnp.asarray(rng.standard_normal((2, 5, 6, 4)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)}
  lw = np.log(rng.dirichlet(np.ones(6), size=(5, 6))).astype(np.float32)
  lw[rng.uniform(size=lw.shape) < 0.5] = -np.inf
  lw[..., 0] = np.log(0.1)
  layers = {"a": scoring.make_layer_model(mix, (5, 6), local.sparsify(lw, tile_size=4)),
            "b": scoring.make_layer_model(mix, (3, 3), None)}     # global-only path
  assert_all_highest(lambda f: scoring.score_unchecked(layers, f, None, 0.005, (16, 16)), feats)


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_baseline_scorers(name):
  method = baselines.get_baseline(name)
  rng = np.random.default_rng(4)
  train = {"layer1": rng.standard_normal((12, 4, 4, 6)).astype(np.float32),
           "layer2": rng.standard_normal((12, 2, 2, 8)).astype(np.float32),
           "layer3": rng.standard_normal((12, 2, 2, 8)).astype(np.float32)}
  # Tiny sizes: PaDiM keeps 5 of its 14 channels, PatchCore projects to 6 dimensions.
  small = {"padim": dict(n_features=5), "patchcore": dict(projection_dim=6),
           "mahaad": dict(layers=("layer1", "layer2", "layer3"))}
  config = dataclasses.replace(method.config_cls(), **small.get(name, {}))
  state = method.fit(train, config, jax.random.key(0))
  test = {k: jnp.asarray(v[:2]) for k, v in train.items()}
  assert_all_highest(lambda f: method.score(state, f, out_size=16), test)
