"""Benchmark of the global mixture fit: seconds per iteration and assignment-step efficiency.

Prints, for each problem size (N samples, d dimensions, K components), measured side by side in
one process on the default JAX backend (the CPU unless a GPU is visible):

* ``kmle s/it``     seconds per K-MLE iteration (assignment + statistics + M-step with OAS), the
                    jitted step of `glad_jax.mixture.kmle` after compilation, best of repeats;
* ``em s/it``       the same for our EM step (soft responsibilities);
* ``sklearn s/it``  seconds per EM iteration of scikit-learn's
                    ``GaussianMixture(covariance_type='full')`` (one E-step + one M-step, float64,
                    timed on its ``_e_step`` / ``_m_step`` from the same start, best of
                    --sklearn-repeats, the faster of default and 1 BLAS thread); above
                    --sklearn-max-rows samples it is timed on that many rows and scaled by N/rows
                    (its cost is linear in N): the "(rows, BLAS thr)" column says which;
* ``ratio``         sklearn s/it divided by kmle s/it (target >= 15);
* ``assign GF/s``   GFLOP/s of the assignment pass alone (`kmle.assignment_pass`: features and
                    float32 matmuls per chunk, packed up to d = 48, argmax, log-likelihoods);
* ``matmul GF/s``   GFLOP/s of plain ``jnp.dot`` float32 matmuls doing the same work: N / chunk
                    products (chunk, F + d + 1) x (F + d + 1, K) of precomputed features in a
                    loop, same process, same duration (so the same machine load);
* ``fraction``      assign / matmul (target >= 0.6);
* ``before ...``    the same for the pass as it was before the packed layout (bands, jnp.argmax,
                    jax.nn.logsumexp), and ``speed-up`` = assign / before GF/s. All GF/s count the
                    useful 2 N K (d (d + 1) / 2 + d + 1) flops.

Usage:
  python scripts/bench_mixture.py            # N=50,000 d=64 K=100 and N=200,000 d=128 K=256
  python scripts/bench_mixture.py --quick    # smaller sizes (about a minute on 2 CPU cores)
  python scripts/bench_mixture.py --sizes 20000x32x50 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from threadpoolctl import threadpool_limits

from glad_jax.mixture import gaussian
from glad_jax.mixture.fit import centre_samples, compiled_step, default_chunk_size
from glad_jax.mixture.kmle import assignment_pass, kmle_init

DEFAULT_SIZES = ("50000x64x100", "200000x128x256")
# The GLAD layers on a 2-core CPU (EfficientNet-Lite0 layers 1-2: d = 24, 40; K = 1000):
#   python scripts/bench_mixture.py --low-d --sklearn-repeats 0
LOW_D_SIZES = ("200000x24x1024", "200000x40x1024")
QUICK_SIZES = ("10000x32x50", "20000x64x100")


def _timed(fn, repeats):
  """Best of `repeats` wall-clock runs (the least disturbed by other processes)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def _data(n, d, k, seed=0):
  """k well-populated anisotropic clusters, as in real features."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, d)) * 2.0
  z = rng.integers(0, k, n)
  scales = rng.uniform(0.2, 1.0, size=(k, d))
  return (centres[z] + rng.normal(size=(n, d)) * scales[z]).astype(np.float32)


def _banded_pass(params, x, mask, *, chunk_size):
  """The dense assignment pass before the packed layout: band-by-band matmuls, jnp.argmax and
  jax.nn.logsumexp (kept here only as the 'before' of the speed-up)."""
  w, b = params
  k, d = b.shape[0], x.shape[1]
  pieces = gaussian.split_rows(w, d)

  def body(carry, inputs):
    xb, mb = inputs
    lj = gaussian.log_joint(xb, pieces, b)
    z = jnp.where(mb, jnp.argmax(lj, axis=1), k).astype(jnp.int32)
    ll = jnp.sum(jnp.where(mb, jax.nn.logsumexp(lj, axis=1), 0.0))
    cl = jnp.sum(jnp.where(mb, jnp.max(lj, axis=1), 0.0))
    return (carry[0] + ll, carry[1] + cl), z

  xs, ms = x.reshape(-1, chunk_size, d), mask.reshape(-1, chunk_size)
  (ll, cl), z = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (xs, ms))
  return z.reshape(-1), ll, cl


def _sklearn_seconds(xn, mix, reg, repeats, max_rows):
  """Seconds of one scikit-learn EM iteration (E-step + M-step, float64) from `mix`.

  Timed on the first `max_rows` samples and scaled by N / rows (its cost is linear in N, up to
  the K Cholesky factorisations), with BLAS at its default thread count and at 1 thread: on a
  loaded machine multi-threaded OpenBLAS can be several times slower, so the faster is kept
  (the baseline most favourable to scikit-learn).
  """
  rows = min(len(xn), max_rows)
  x_rows = xn[:rows]
  cov = np.asarray(mix.covariances, np.float64)
  best = (np.inf, None)
  for threads in (1, None):
    sk = SkGaussianMixture(mix.n_components, covariance_type="full", reg_covar=reg, max_iter=1)
    sk.weights_ = np.asarray(mix.weights, np.float64)
    sk.means_ = np.asarray(mix.means, np.float64)
    sk.covariances_ = cov
    sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(cov))

    def iteration(sk=sk):
      _, log_resp = sk._e_step(x_rows)
      sk._m_step(x_rows, log_resp)

    with threadpool_limits(limits=threads), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      seconds = _timed(iteration, repeats)
    if seconds < best[0]:
      best = (seconds, "default" if threads is None else str(threads))
  return best[0] * len(xn) / rows, rows, best[1]


def bench(n, d, k, repeats, sk_repeats, sk_max_rows):
  x = _data(n, d, k)
  chunk = min(default_chunk_size(d), n)
  n = n // chunk * chunk                    # whole chunks: no padding in the timings
  x = jnp.asarray(x[:n])
  mask = jnp.ones((n,), bool)
  xc, _, mean_var = centre_samples(x, mask)
  reg = jnp.float32(1e-6 * float(mean_var))
  mix = kmle_init(jax.random.key(0), xc, k, reg_covar=reg)
  row = {"N": n, "d": d, "K": k, "chunk": chunk}

  for name, hard in (("kmle", True), ("em", False)):
    step = compiled_step(hard, None, True, chunk)
    min_size = jnp.float32(2.0)
    jax.block_until_ready(step(mix, xc, mask, reg, min_size))            # compile
    row[name] = _timed(lambda: step(mix, xc, mask, reg, min_size), repeats)

  row["sklearn"], row["sk_rows"], row["sk_threads"] = float("nan"), 0, "-"
  if sk_repeats > 0:
    row["sklearn"], row["sk_rows"], row["sk_threads"] = _sklearn_seconds(
        np.asarray(xc, np.float64), mix, float(reg), sk_repeats, sk_max_rows)

  # assignment pass vs a plain matmul of the same inner/outer sizes
  w, b = gaussian.log_joint_params(mix)
  assign = jax.jit(functools.partial(assignment_pass, chunk_size=chunk))
  jax.block_until_ready(assign(mix, xc, mask))
  t_assign = _timed(lambda: assign(mix, xc, mask), repeats)
  # Before (the pass as it was until this change: bands + jnp.argmax + jax.nn.logsumexp).
  before = jax.jit(functools.partial(_banded_pass, chunk_size=chunk))
  jax.block_until_ready(before((w, b), xc, mask))
  t_before = _timed(lambda: before((w, b), xc, mask), repeats)
  width = gaussian.packed_size(d)      # useful multiply-adds: each pair i <= j once
  # The plain matmul does the same work in the same loop structure (n / chunk products of one
  # precomputed (chunk, F + d + 1) feature block), so both see the same machine load.
  feats = jax.jit(gaussian.packed_features)(xc[:chunk])
  w_plain = gaussian.log_joint_params(mix, packed=True)[0]

  @jax.jit
  def plain(f, w):
    # w depends on i (an (F + d + 1) x K scaling, ~1/chunk of the product's cost) so that the
    # product cannot be hoisted out of the loop.
    body = lambda i, acc: acc + jnp.dot(f, w * (1.0 + i), precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jax.lax.fori_loop(0, n // chunk, body, jnp.zeros((chunk, k), f.dtype)))

  jax.block_until_ready(plain(feats, w_plain))
  t_plain = _timed(lambda: plain(feats, w_plain), repeats)
  row["assign_gf"] = 2.0 * n * width * k / t_assign / 1e9
  row["before_gf"] = 2.0 * n * width * k / t_before / 1e9
  row["matmul_gf"] = 2.0 * n * width * k / t_plain / 1e9
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help=f"sizes {', '.join(QUICK_SIZES)}")
  parser.add_argument("--low-d", action="store_true", help=f"sizes {', '.join(LOW_D_SIZES)}")
  parser.add_argument("--sizes", nargs="+", help="NxDxK triples (overrides --quick, --low-d)")
  parser.add_argument("--repeats", type=int, default=3, help="timed repeats of our steps")
  parser.add_argument("--sklearn-repeats", type=int, default=1,
                      help="timed sklearn iterations (0: skip scikit-learn)")
  parser.add_argument("--sklearn-max-rows", type=int, default=50_000,
                      help="time sklearn on at most this many samples and scale linearly in N")
  args = parser.parse_args(argv)
  sizes = args.sizes or (QUICK_SIZES if args.quick else LOW_D_SIZES if args.low_d
                         else DEFAULT_SIZES)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"jax={jax.__version__}")
  header = (f"{'N':>8} {'d':>4} {'K':>4} {'kmle s/it':>10} {'em s/it':>9} {'sklearn s/it':>12} "
            f"{'(rows, BLAS thr)':>17} {'ratio':>6} {'assign GF/s':>11} {'matmul GF/s':>11} "
            f"{'fraction':>8} {'before GF/s':>11} {'before frac':>11} {'speed-up':>8}")
  print(header)
  for size in sizes:
    n, d, k = (int(v) for v in size.lower().split("x"))
    r = bench(n, d, k, args.repeats, args.sklearn_repeats, args.sklearn_max_rows)
    timed_on = f"({r['sk_rows']}, {r['sk_threads']})"
    print(f"{r['N']:>8} {d:>4} {k:>4} {r['kmle']:>10.3f} {r['em']:>9.3f} {r['sklearn']:>12.3f} "
          f"{timed_on:>17} {r['sklearn'] / r['kmle']:>6.1f} {r['assign_gf']:>11.1f} "
          f"{r['matmul_gf']:>11.1f} {r['assign_gf'] / r['matmul_gf']:>8.2f} "
          f"{r['before_gf']:>11.1f} {r['before_gf'] / r['matmul_gf']:>11.2f} "
          f"{r['assign_gf'] / r['before_gf']:>8.2f}", flush=True)
  print(f"load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}"
        if sys.platform.startswith("linux") else "")


if __name__ == "__main__":
  main()
