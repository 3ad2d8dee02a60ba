"""Benchmark of the global mixture fit: seconds per iteration and assignment-step efficiency.

Prints, for each problem size (N samples, d dimensions, K components), measured side by side in
one process on the default JAX backend (the CPU unless a GPU is visible):

* ``kmle s/it``     seconds per K-MLE iteration (assignment + statistics + M-step with OAS), the
                    jitted step of `glad_jax.mixture.kmle` after compilation, best of repeats;
* ``em s/it``       the same for our EM step (soft responsibilities);
* ``sklearn s/it``  seconds per EM iteration of scikit-learn's
                    ``GaussianMixture(covariance_type='full')`` (one E-step + one M-step, float64,
                    timed on its ``_e_step`` / ``_m_step`` from the same start,
                    best of --sklearn-repeats);
* ``ratio``         sklearn s/it divided by kmle s/it (target >= 15);
* ``assign GF/s``   GFLOP/s of the assignment pass alone (`kmle.assignment_pass`: features and
                    float32 matmuls band by band per chunk, argmax, log-likelihoods), counting
                    2 N K (F + d + 1) flops, F ~ d^2/2 quadratic features (`gaussian.expanded_size`);
* ``matmul GF/s``   GFLOP/s of a plain ``jnp.dot`` float32 matmul of (rows, F + d + 1) x
                    (F + d + 1, K) on precomputed features, same process (best over rows =
                    1, 4, 16 chunks);
* ``fraction``      assign / matmul (target >= 0.6).

Usage:
  python scripts/bench_mixture.py            # N=50,000 d=64 K=100 and N=200,000 d=128 K=256
  python scripts/bench_mixture.py --quick    # smaller sizes (about a minute on 2 CPU cores)
  python scripts/bench_mixture.py --sizes 20000x32x50 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from glad_jax.mixture import gaussian
from glad_jax.mixture.kmle import (_centre, _compiled_step, assignment_pass, default_chunk_size,
                                   kmle_init)

DEFAULT_SIZES = ("50000x64x100", "200000x128x256")
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


def bench(n, d, k, repeats, sk_repeats):
  x = _data(n, d, k)
  chunk = min(default_chunk_size(d), n)
  n = n // chunk * chunk                    # whole chunks: no padding in the timings
  x = jnp.asarray(x[:n])
  mask = jnp.ones((n,), bool)
  xc, _, mean_var = _centre(x, mask)
  reg = jnp.float32(1e-6 * float(mean_var))
  mix = kmle_init(jax.random.key(0), xc, k, reg_covar=reg)
  row = {"N": n, "d": d, "K": k, "chunk": chunk}

  for name, hard in (("kmle", True), ("em", False)):
    step = _compiled_step(hard, None, True, chunk)
    min_size = jnp.float32(2.0)
    jax.block_until_ready(step(mix, xc, mask, reg, min_size))            # compile
    row[name] = _timed(lambda: step(mix, xc, mask, reg, min_size), repeats)

  # scikit-learn: one E-step + one M-step from the same start, float64 as it computes.
  xn = np.asarray(xc, np.float64)
  sk = SkGaussianMixture(k, covariance_type="full", reg_covar=float(reg), max_iter=1)
  sk.weights_ = np.asarray(mix.weights, np.float64)
  sk.means_ = np.asarray(mix.means, np.float64)
  cov = np.asarray(mix.covariances, np.float64)
  sk.covariances_ = cov
  sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(cov))

  def sk_iteration():
    _, log_resp = sk._e_step(xn)
    sk._m_step(xn, log_resp)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    row["sklearn"] = _timed(sk_iteration, sk_repeats)

  # assignment pass vs a plain matmul of the same inner/outer sizes
  w, b = gaussian.log_joint_params(mix)
  assign = jax.jit(functools.partial(assignment_pass, chunk_size=chunk))
  jax.block_until_ready(assign((w, b), xc, mask))
  t_assign = _timed(lambda: assign((w, b), xc, mask), repeats)
  width = gaussian.expanded_size(d)
  mm = jax.jit(lambda f, w: jnp.dot(f, w, precision=jax.lax.Precision.HIGHEST))
  best_mm = 0.0
  # the plain matmul's best over a few row counts (<= 512 MiB of features): a demanding baseline
  for rows in sorted({min(n, r) for r in (chunk, 4 * chunk, 16 * chunk)
                      if r * width * 4 <= (512 << 20)} or {chunk}):
    feats = jax.jit(gaussian.expanded_features)(xc[:rows])
    jax.block_until_ready(mm(feats, w))
    best_mm = max(best_mm, 2.0 * rows * width * k / _timed(lambda: mm(feats, w), repeats) / 1e9)
    del feats
  row["assign_gf"] = 2.0 * n * width * k / t_assign / 1e9
  row["matmul_gf"] = best_mm
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help=f"sizes {', '.join(QUICK_SIZES)}")
  parser.add_argument("--sizes", nargs="+", help="NxDxK triples (overrides --quick)")
  parser.add_argument("--repeats", type=int, default=3, help="timed repeats of our steps")
  parser.add_argument("--sklearn-repeats", type=int, default=2, help="timed sklearn iterations")
  args = parser.parse_args(argv)
  sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"jax={jax.__version__}")
  header = (f"{'N':>8} {'d':>4} {'K':>4} {'kmle s/it':>10} {'em s/it':>9} {'sklearn s/it':>12} "
            f"{'ratio':>6} {'assign GF/s':>11} {'matmul GF/s':>11} {'fraction':>8}")
  print(header)
  for size in sizes:
    n, d, k = (int(v) for v in size.lower().split("x"))
    r = bench(n, d, k, args.repeats, args.sklearn_repeats)
    print(f"{r['N']:>8} {d:>4} {k:>4} {r['kmle']:>10.3f} {r['em']:>9.3f} {r['sklearn']:>12.3f} "
          f"{r['sklearn'] / r['kmle']:>6.1f} {r['assign_gf']:>11.1f} {r['matmul_gf']:>11.1f} "
          f"{r['assign_gf'] / r['matmul_gf']:>8.2f}", flush=True)


if __name__ == "__main__":
  main()
