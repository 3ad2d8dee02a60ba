"""Wall time of the same GLAD fit (global K-MLE + local weights) run by 1, 2 and 4 processes on localhost.

Each run starts N copies of scripts/distributed_fit.py at once (jax.distributed over a free localhost port, CPU
collectives through gloo, `--local-devices` CPU devices per process), on the same seeded synthetic features; each
process fits on its shard of the images and writes the model it got. Printed, one row per process count:

  processes   N
  devices     N x local devices (the global mesh)
  wall s      from starting the N processes to the last one's exit: JAX start-up, jax.distributed.initialize,
              compilation, the fit and the final barrier (what a user waits for)
  fit s       process 0's global (K-MLE) + local weight fit, start-up excluded (compilation included)
  x wall / x fit   those times divided by the 1-process run's (the first row): on one machine, more processes
              split the same cores, so a ratio above 1 is the cost of the collectives and of the extra processes
  equal       the fitted mixture (K, weights, means, covariance factors, iterations) and the local weights equal
              the first row's to float32 round-off (the tolerances of tests/test_distributed.py)
  labels      fraction of a seeded sample of the features that both models assign to the same component, and
  loglik diff the relative difference of their mean log-likelihood (float64, SciPy): K-MLE's hard assignments
              can turn round-off into a different fit (a nearly tied sample changes side, two means move, later
              iterations follow another path), so these say how different the fitted densities are
  max|d mu|   max |difference| of the means (same K); local supp: fraction of (position, component) entries
              whose local weight is zero in both or non-zero in both

The exit status is 1 when the processes of one run do not hold the very same model (a bug); a fit different
from the first row's is reported, not an error.

On a multi-host cluster the same processes run one per host, each on its own cores or accelerator: there the
processes add compute instead of sharing it. This benchmark shows the coordination overhead, not that speed-up.

Usage:
  python scripts/bench_distributed.py                          # 1, 2, 4 processes (a few minutes)
  python scripts/bench_distributed.py --processes 1,2 --images 16 --grid 8 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "distributed_fit.py"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", default="1,2,4", help="comma-separated process counts; the first is the reference")
  p.add_argument("--local-devices", type=int, default=None,
                 help="CPU devices per process (default: 2, or 1 on a machine with 2 cores or fewer: see below)")
  # The default size: a 1-process fit of ~20-60 s on a 2-core CPU (most of it the K-MLE iterations).
  p.add_argument("--images", type=int, default=256, help="synthetic training images")
  p.add_argument("--grid", type=int, nargs=2, default=(32, 32), help="feature grid (h, w) per image")
  p.add_argument("--dim", type=int, default=32, help="feature dimension d")
  p.add_argument("--clusters", type=int, default=16, help="clusters the synthetic features are drawn from")
  p.add_argument("--k", type=int, default=256, help="initial K of the global mixture")
  p.add_argument("--max-iter", type=int, default=30, help="K-MLE iteration cap")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--judge-samples", type=int, default=16384,
                 help="feature vectors on which the fitted models' labels and log-likelihoods are compared")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take before it is killed")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  try:
    args.processes = [int(v) for v in args.processes.split(",") if v.strip()]
  except ValueError:
    p.error(f"--processes takes comma-separated integers, got {args.processes!r}")
  if not args.processes or min(args.processes) < 1:
    p.error("--processes needs counts >= 1")
  if args.local_devices is None:
    args.local_devices = default_local_devices()
  if args.local_devices < 1:
    p.error("--local-devices must be >= 1")
  return args


def default_local_devices() -> int:
  """2 CPU devices per process, unless the machine has no more cores than that.

  XLA:CPU runs each device's program on the process's intra-op thread pool (one thread per core), and the
  batched LAPACK kernels (the Cholesky factorisations of the M-step) split their batch into tasks on that same
  pool and block until the tasks are done. With as many devices as pool threads, every thread can be such a
  blocked waiter and nothing runs the tasks: the fit hangs with idle CPUs (seen with jaxlib 0.10 on a 2-core
  machine: 2 devices, K >= 64, d = 24). One device per process leaves a thread free.
  """
  return 2 if (os.cpu_count() or 1) > 2 else 1


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(n: int, out: pathlib.Path, args: argparse.Namespace) -> float:
  """Runs the n-process fit; returns its wall seconds. Raises naming each process that failed or hung."""
  data = ["--images", str(args.images), "--grid", *map(str, args.grid), "--dim", str(args.dim), "--clusters",
          str(args.clusters), "--k", str(args.k), "--max-iter", str(args.max_iter), "--seed", str(args.seed),
          "--local-devices", str(args.local_devices), "--num-processes", str(n), "--out", str(out)]
  # One process needs no coordinator (distributed.initialize skips the service for a count of 1).
  where = [] if n == 1 else ["--coordinator", f"localhost:{free_port()}"]
  commands = [[sys.executable, str(WORKER), *data, *where, "--process-id", str(i)] for i in range(n)]
  # The caller's forced device counts or platforms must not change what the workers see.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
  t0 = time.perf_counter()
  procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for c in commands]
  failures = []
  deadline = t0 + args.timeout
  for i, p in enumerate(procs):
    try:
      output, _ = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
      for q in procs:   # one hung process blocks the others' collectives: end them all
        q.kill()
      output, _ = p.communicate()
      failures.append(f"process {i} of {n} timed out after {args.timeout:.0f} s:\n{output[-2000:]}")
      continue
    if p.returncode != 0:
      failures.append(f"process {i} of {n} exited with {p.returncode}:\n{output[-2000:]}")
  wall = time.perf_counter() - t0
  if failures:
    raise RuntimeError(f"the {n}-process fit failed:\n" + "\n".join(failures))
  return wall


def mixture_scores(r: dict, x: np.ndarray) -> tuple[np.ndarray, float]:
  """(labels argmax_k log pi_k + log N(x; mu_k, Sigma_k), mean log-likelihood) of a fitted global mixture on x,
  in float64 (NumPy/SciPy): a judge independent of the JAX code that fitted it."""
  from scipy.linalg import solve_triangular  # noqa: PLC0415

  chol = r["cov_chol"].astype(np.float64)
  means = r["means"].astype(np.float64)
  d = x.shape[1]
  dens = np.empty((x.shape[0], chol.shape[0]))
  for k in range(chol.shape[0]):
    z = solve_triangular(chol[k], (x - means[k]).T, lower=True)
    dens[:, k] = (-0.5 * np.sum(z * z, axis=0) - np.sum(np.log(np.diag(chol[k])))
                  - 0.5 * d * np.log(2 * np.pi))
  with np.errstate(divide="ignore"):
    dens += np.log(r["weights"].astype(np.float64))
  top = dens.max(axis=1)
  loglik = float(np.mean(top + np.log(np.sum(np.exp(dens - top[:, None]), axis=1))))
  return np.argmax(dens, axis=1), loglik


def compare(result: dict, ref: dict, x: np.ndarray) -> dict:
  """How the run's model differs from the reference run's.

  Two questions. `equal`: the parameters are the reference's to float32 round-off (the tolerances of
  tests/test_distributed.py: sums in another order, nothing more). K-MLE's hard assignments can turn such
  round-off into a different fit: a sample nearly tied between two components changes side, the two means move,
  and later iterations follow another path. So also: how much the fitted densities differ where it matters, on
  the data (`label_agreement`: the fraction of samples both models assign to the same component;
  `loglik_rel_diff`: relative difference of the mean log-likelihood).
  """
  out = {"same_k": result["weights"].shape == ref["weights"].shape,
         "same_n_iter": int(result["n_iter"]) == int(ref["n_iter"])}
  labels, loglik = mixture_scores(result, x)
  ref_labels, ref_loglik = mixture_scores(ref, x)
  out["label_agreement"] = float(np.mean(labels == ref_labels)) if out["same_k"] else float("nan")
  out["loglik"], out["loglik_rel_diff"] = loglik, abs(loglik - ref_loglik) / abs(ref_loglik)
  nan = float("nan")
  out["max_abs_diff_means"] = float(np.max(np.abs(result["means"] - ref["means"]))) if out["same_k"] else nan
  finite = np.isfinite(ref["log_weights"])
  same_shape = result["log_weights"].shape == ref["log_weights"].shape
  support = np.isfinite(result["log_weights"]) == finite if same_shape else np.zeros(1, bool)
  out["local_support_agreement"] = float(np.mean(support))
  same_support = same_shape and bool(np.all(support))
  out["max_abs_diff_log_weights"] = (
      float(np.max(np.abs(result["log_weights"][finite] - ref["log_weights"][finite]))) if same_support else nan)
  out["equal"] = bool(
      out["same_k"] and out["same_n_iter"] and same_support
      and np.allclose(result["weights"], ref["weights"], rtol=1e-5, atol=1e-7)
      and np.allclose(result["means"], ref["means"], rtol=1e-4, atol=1e-4)
      and np.allclose(result["cov_chol"], ref["cov_chol"], rtol=1e-4, atol=1e-4)
      and np.allclose(result["log_weights"][finite], ref["log_weights"][finite], rtol=1e-5, atol=1e-5))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.stdout.reconfigure(line_buffering=True)
  h, w = args.grid
  print(f"data: {args.images} synthetic images x {h}x{w} positions x d={args.dim} "
        f"({args.images * h * w} feature vectors), {args.clusters} clusters; K={args.k}, max_iter={args.max_iter}; "
        f"{args.local_devices} CPU device(s) per process, gloo collectives on localhost; {os.cpu_count()} CPU cores; "
        f"load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
  # The judge's samples: a seeded subset of the same synthetic features (float64 scoring of all of them against
  # K components would take longer than the fits).
  sys.path.insert(0, str(ROOT / "scripts"))
  from distributed_fit import synthetic_features  # noqa: PLC0415
  feats = synthetic_features(args.images, tuple(args.grid), args.dim, args.clusters, args.seed).reshape(-1, args.dim)
  pick = np.random.default_rng(args.seed + 1).choice(feats.shape[0], min(args.judge_samples, feats.shape[0]),
                                                     replace=False)
  judge = feats[np.sort(pick)].astype(np.float64)
  del feats
  rows, ref = [], None
  with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
    for n in args.processes:
      out = pathlib.Path(tmp) / f"n{n}"
      wall = launch(n, out, args)
      results = [dict(np.load(out / f"p{i}.npz")) for i in range(n)]
      # Every process holds the whole (replicated) model: they must agree among themselves exactly.
      same_everywhere = all(np.array_equal(r[k], results[0][k]) for r in results[1:]
                            for k in ("weights", "means", "cov_chol", "log_weights"))
      r0 = results[0]
      if ref is None:
        ref = r0
      row = {"processes": n, "devices": int(r0["devices"]), "wall_s": wall,
             "fit_s": float(r0["global_s"] + r0["local_s"]), "global_s": float(r0["global_s"]),
             "local_s": float(r0["local_s"]), "k_end": int(r0["weights"].shape[0]), "n_iter": int(r0["n_iter"]),
             "processes_identical": same_everywhere, **compare(r0, ref, judge)}
      rows.append(row)
      print(f"  {n} process(es): wall {wall:.1f} s, fit {row['fit_s']:.1f} s "
            f"(global {row['global_s']:.1f} s, local {row['local_s']:.1f} s), K end {row['k_end']}, "
            f"{row['n_iter']} iterations, processes identical: {'yes' if same_everywhere else 'NO'}")
  base = rows[0]
  print(f"\n{'processes':>9s} {'devices':>7s} {'wall s':>7s} {'fit s':>7s} {'x wall':>6s} {'x fit':>6s} "
        f"{'equal':>5s} {'labels':>7s} {'loglik diff':>11s} {'max|d mu|':>9s} {'local supp':>10s}")
  for r in rows:
    r["wall_ratio"] = r["wall_s"] / base["wall_s"]
    r["fit_ratio"] = r["fit_s"] / base["fit_s"]
    print(f"{r['processes']:9d} {r['devices']:7d} {r['wall_s']:7.1f} {r['fit_s']:7.1f} {r['wall_ratio']:6.2f} "
          f"{r['fit_ratio']:6.2f} {'yes' if r['equal'] else 'NO':>5s} {100 * r['label_agreement']:6.2f}% "
          f"{r['loglik_rel_diff']:11.1e} {r['max_abs_diff_means']:9.1e} "
          f"{100 * r['local_support_agreement']:9.2f}%")
  print("equal: parameters equal to the first row's to float32 round-off; labels: samples assigned to the same "
        f"component (of {judge.shape[0]}); loglik diff: relative difference of the mean log-likelihood; local "
        "supp: local weights non-zero at the same (position, component) entries")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                   "rows": rows}, indent=2, default=list) + "\n")
  # The processes of one run disagreeing among themselves is a bug; a different fit than the reference's is a
  # finding (see `compare`), reported above.
  return 0 if all(r["processes_identical"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
