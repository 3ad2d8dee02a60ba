"""Multi-process fits on jax.distributed (2 processes x 2 CPU devices, gloo, localhost) give the
one-process model; plus the host-side pieces of glad_jax.distributed."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from glad_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "distributed_fit.py"
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(commands: list[list[str]], timeout_s: float = TIMEOUT_S) -> None:
  """Runs the commands at once; fails naming each process that failed or timed out."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in commands]
  failures = []
  for i, p in enumerate(procs):
    try:
      out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
      failures.append(f"process {i} timed out after {timeout_s} s:\n{out[-2000:]}")
      continue
    if p.returncode != 0:
      failures.append(f"process {i} exited with {p.returncode}:\n{out[-2000:]}")
  assert not failures, "\n".join(failures)


def worker(out: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, str(WORKER), "--out", str(out), *extra]


def _labels(r, x):
  """argmax_k log pi_k + log N(x; mu_k, Sigma_k) with SciPy (float64)."""
  covs = np.einsum("kij,klj->kil", r["cov_chol"].astype(np.float64), r["cov_chol"])
  dens = np.stack([stats.multivariate_normal(m, c).logpdf(x) for m, c in zip(r["means"], covs)], 1)
  return np.argmax(dens + np.log(r["weights"]), axis=1)


def test_two_processes_fit_the_one_process_model(tmp_path):
  port = free_port()
  multi = [worker(tmp_path / "multi", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                  "--process-id", str(i), "--local-devices", "2") for i in range(2)]
  single = [worker(tmp_path / "single", "--num-processes", "1", "--local-devices", "1",
                   "--no-mesh")]
  run_processes(multi + single)
  ref = np.load(tmp_path / "single" / "p0.npz")
  p0, p1 = (np.load(tmp_path / "multi" / f"p{i}.npz") for i in range(2))
  assert int(p0["devices"]) == 4 and int(p0["processes"]) == 2 and int(ref["devices"]) == 1
  for name in ("weights", "means", "cov_chol", "log_weights"):
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=f"processes differ on {name}")
  assert p0["weights"].shape == ref["weights"].shape and int(p0["n_iter"]) == int(ref["n_iter"])
  np.testing.assert_allclose(p0["weights"], ref["weights"], rtol=1e-6)
  np.testing.assert_allclose(p0["means"], ref["means"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p0["cov_chol"], ref["cov_chol"], rtol=1e-4, atol=1e-5)
  sys.path.insert(0, str(ROOT / "scripts"))
  from distributed_fit import synthetic_features  # noqa: PLC0415
  x = synthetic_features(7, (6, 5), 3, 4, 0).reshape(-1, 3)
  np.testing.assert_array_equal(_labels(p0, x), _labels(ref, x))
  # Local weights: the same zero pattern and the same counts (ratios of integers).
  finite = np.isfinite(ref["log_weights"])
  assert finite.any(axis=-1).all()
  np.testing.assert_array_equal(np.isfinite(p0["log_weights"]), finite)
  np.testing.assert_allclose(p0["log_weights"][finite], ref["log_weights"][finite], rtol=1e-6)


def test_bad_setup_is_one_clear_error():
  with pytest.raises(distributed.DistributedError, match="process id 2 is not in"):
    distributed.initialize("localhost:1234", 2, 2)
  with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
    distributed.initialize("localhost", 2, 0)
  with pytest.raises(distributed.DistributedError, match=">= 1"):
    distributed.initialize("localhost:1234", 0, 0)
  os.environ["JAX_NUM_PROCESSES"] = "two"
  try:
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='two'"):
      distributed.initialize()
  finally:
    del os.environ["JAX_NUM_PROCESSES"]


def test_shards_are_disjoint_contiguous_blocks_that_cover_the_list():
  items = list(range(11))
  for n_proc in (1, 2, 3, 4, 5, 12):
    for multiple in (1, 2, 4):
      parts = [distributed.process_shard(items, process_id=p, num_processes=n_proc,
                                         multiple=multiple) for p in range(n_proc)]
      assert sum(parts, []) == items                   # disjoint, in order, complete
      sizes = [len(q) for q in parts]
      block = max(sizes)
      # Full blocks (whole devices' worth) first, then at most one partial block, then empty
      # ones: the padding of `to_global` is then all at the global end.
      first_short = next((i for i, s in enumerate(sizes) if s < block), n_proc)
      assert all(s == 0 for s in sizes[first_short + 1:])
      assert all(s % multiple == 0 for s in sizes[:first_short]) or first_short == 1
  assert distributed.process_shard(items) == items      # this (one-process) run


def test_one_process_global_array_and_samples():
  mesh = distributed.global_mesh()
  x = np.arange(5 * 2 * 3 * 2, dtype=np.float32).reshape(5, 2, 3, 2)
  g, mask = distributed.to_global(x, mesh)
  n_dev = len(jax.devices())
  assert g.shape[0] % n_dev == 0 and g.shape[0] >= 5
  np.testing.assert_array_equal(np.asarray(g)[:5], x)
  np.testing.assert_array_equal(np.asarray(mask), np.arange(g.shape[0]) < 5)
  assert distributed.valid_prefix(mask) == 5
  samples = distributed.global_samples(g, mask, mesh)
  np.testing.assert_array_equal(np.asarray(samples), x.reshape(-1, 2))
  np.testing.assert_array_equal(distributed.gather(np.arange(3)), np.arange(3))
  distributed.barrier("one_process")   # no-op


def test_memory_estimate_and_refusal():
  grids = {"layer1": (64, 64, 24), "layer2": (32, 32, 40), "layer3": (16, 16, 112)}
  one = distributed.estimate_fit_bytes(200, grids, 1000)
  feats = 200 * 4 * (64 * 64 * 24 + 32 * 32 * 40 + 16 * 16 * 112)
  assert one == feats + 1000 * 112 * 112 * 4
  assert distributed.estimate_fit_bytes(200, grids, 1000, n_devices=8) == \
      -(-feats // 8) + 1000 * 112 * 112 * 4
  distributed.check_fit_memory(one, available=one)             # fits exactly: accepted
  with pytest.raises(distributed.FitMemoryError,
                     match=r"needs about 0\.\d+ GiB per device but cpu device 0 has 0\.10 GiB "
                           r"free: use fewer training images"):
    distributed.check_fit_memory(one, available=int(0.1 * 2**30))
  assert distributed.device_memory_bytes() > 0                  # CPU: available host memory
