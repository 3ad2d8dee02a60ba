"""Multi-process fits on jax.distributed (2 processes x 2 CPU devices, gloo, localhost) give the
one-process model; plus the host-side pieces of glad_jax.distributed."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from scipy import stats

from glad_jax import cli, distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "distributed_fit.py"
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(commands: list[list[str]], timeout_s: float = TIMEOUT_S,
                  envs: list[dict[str, str]] | None = None,
                  names: list[str] | None = None) -> list[str]:
  """Runs the commands at once; fails naming each process that failed or timed out.

  Args:
    commands: one argv per process.
    timeout_s: wall-clock limit of the whole run (then every process is killed).
    envs: optional extra environment variables per process.
    names: how failures name the processes (default "process i").

  Returns:
    the output (stdout and stderr) of each process.
  """
  base = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  envs = envs or [{}] * len(commands)
  names = names or [f"process {i}" for i in range(len(commands))]
  procs = [subprocess.Popen(c, env={**base, **e}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c, e in zip(commands, envs)]
  deadline = time.monotonic() + timeout_s
  failures, outputs = [], []
  for name, p in zip(names, procs):
    try:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
      failures.append(f"{name} timed out after {timeout_s} s:\n{out[-2000:]}")
      outputs.append(out)
      continue
    outputs.append(out)
    if p.returncode != 0:
      failures.append(f"{name} exited with {p.returncode}:\n{out[-2000:]}")
  assert not failures, "\n".join(failures)
  return outputs


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


# ---------------------------------------------------------------------------------- glad fit, 2 processes

# One layer (compilations dominate the time of such a tiny fit), a max_samples subset of it, the
# alignment reference and the margin mask. max_iter 6 stops both fits before the tolerance rule
# does: that rule compares a float32 mean log-likelihood's relative change with 1e-6, so once the
# change nears 1e-6, round-off (here, the sum order over 4 devices) decides the iteration it stops.
# resnet_tiny's layer1 (d = 8) also keeps the K Cholesky factorisations below the size at which
# jaxlib 0.10 splits them over its thread pool, which with 2 devices per process on a 2-core
# machine can deadlock (see distributed._warn_lapack_pool); the subprocess timeout reports it.
TINY_FIT = ["--backbone", "resnet_tiny", "--layers", "layer1", "--image-size", "64", "--k", "4",
            "--max-iter", "6", "--max-samples", "1500", "--align", "translation", "--mask", "margin",
            "--holdout", "0.2", "--fpr", "0.1"]


def glad_fit(data: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "glad_jax", "fit", str(data), "--out", str(out), *TINY_FIT, *extra]


def test_glad_fit_on_two_processes_writes_the_one_process_model(tmp_path):
  from conftest import make_category
  from glad_jax import local
  from glad_jax.model import GLAD

  # 12 images: 10 for training (process 0 holds 6, process 1 holds 4 and 2 padding rows in the
  # global arrays), 2 held out (both on process 0: process 1 calibrates with an empty block).
  data = make_category(tmp_path / "cat", n_train=12)
  multi, single = tmp_path / "multi" / "ck", tmp_path / "single" / "ck"
  port = free_port()
  # Process 0 from the flags, process 1 from the environment variables.
  commands = [glad_fit(data, multi, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                       "--process-id", "0", "--local-devices", "2"),
              glad_fit(data, multi, "--local-devices", "2"),
              glad_fit(data, single)]
  envs = [{}, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": "1"}, {}]
  out0, out1, _ = run_processes(commands, envs=envs,
                                names=["distributed process 0", "distributed process 1",
                                       "one-process fit"])
  assert "saved" in out0 and "over 2 processes, 4 devices" in out0
  assert "written by process 0" in out1 and "saved" not in out1
  # Written once, atomically: the checkpoint and nothing else (no temporary or second copy).
  assert sorted(p.name for p in multi.parent.iterdir()) == ["ck"]

  m, s = GLAD.load(multi), GLAD.load(single)   # restores in this (one-process) run
  assert m.config == s.config and m.state.source_shape == s.state.source_shape == (64, 64, 3)
  np.testing.assert_array_equal(m.reference, s.reference)
  np.testing.assert_array_equal(m.mask, s.mask)
  assert set(m.layers) == set(s.layers) == {"layer1"}
  for name in s.layers:
    fm, fs = m.fit_info[name], s.fit_info[name]
    assert (fm.n_components, fm.n_iter, fm.n_samples, fm.n_samples_global) == \
        (fs.n_components, fs.n_iter, fs.n_samples, fs.n_samples_global), name
    a, b = m.layers[name].mixture, s.layers[name].mixture
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(a.means, b.means, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(a.cov_chol, b.cov_chol, rtol=1e-3, atol=1e-4, err_msg=name)
    dense_m, dense_s = (np.asarray(local.to_dense(x.local)) for x in (m.layers[name],
                                                                       s.layers[name]))
    finite = np.isfinite(dense_s)
    np.testing.assert_array_equal(np.isfinite(dense_m), finite, err_msg=name)
    np.testing.assert_allclose(dense_m[finite], dense_s[finite], rtol=1e-5, err_msg=name)
  assert s.image_threshold is not None and s.pixel_threshold is not None
  np.testing.assert_allclose(m.image_threshold, s.image_threshold, rtol=1e-4)
  np.testing.assert_allclose(m.pixel_threshold, s.pixel_threshold, rtol=1e-4)


def test_align_auto_on_two_processes_makes_the_one_process_choice(tmp_path):
  """align='auto' is chosen by process 0 on every process's images (gathered) and shared: the record and the
  model's alignment equal a one-process fit's."""
  from conftest import make_category
  from glad_jax.model import GLAD

  data = make_category(tmp_path / "cat", n_train=12)
  multi, single = tmp_path / "multi" / "ck", tmp_path / "single" / "ck"
  port = free_port()
  auto = ("--align", "auto")
  commands = [glad_fit(data, multi, *auto, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                       "--process-id", "0"),
              glad_fit(data, multi, *auto), glad_fit(data, single, *auto)]
  envs = [{}, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": "1"}, {}]
  out0, _, _ = run_processes(commands, envs=envs, names=["distributed process 0", "distributed process 1",
                                                         "one-process fit"])
  assert "saved" in out0
  m, s = GLAD.load(multi), GLAD.load(single)
  drop = lambda c: {k: v for k, v in c.as_dict().items() if k != "seconds"}  # noqa: E731
  assert drop(m.align_choice) == drop(s.align_choice) and set(s.align_choice.aurocs) == {"none", "euclidean"}
  assert s.align_choice.n_fit + s.align_choice.n_held == 10      # every training image, not process 0's 6
  assert m.config == s.config and m.config.align == s.align_choice.chosen
  assert (m.reference is None) == (s.reference is None)


@pytest.mark.parametrize("flags, message", [
    (["--process-id", "1"], "--process-id without --num-processes"),
    (["--coordinator", "localhost:1234"], "--coordinator without --num-processes"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1234"],
     r"process id 2 is not in \[0, 2\)"),
    (["--num-processes", "2", "--process-id", "0"], "needs --coordinator HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "localhost:1234"], "needs this process's --process-id"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "localhost"], "HOST:PORT"),
    (["--num-processes", "0"], "--num-processes should be >= 1"),
    (["--local-devices", "2"], "--local-devices is for multi-process runs"),
])
def test_bad_distributed_options_are_one_line_errors(tmp_path, capsys, flags, message):
  # Refused before the runtime starts (this test process never joins a coordinator).
  assert cli.main(["fit", str(tmp_path), "--out", str(tmp_path / "ck"), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("glad: error: ") and re.search(message, err[0]), err


def test_resolve_options_from_flags_and_environment(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert distributed.resolve_options() is None                   # a plain one-process fit
  assert distributed.resolve_options(num_processes=1) == distributed.Options(None, 1, 0, None)
  assert distributed.resolve_options("h:1", 2, 1, 2) == distributed.Options("h:1", 2, 1, 2)
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "h:2")
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "3")
  with pytest.raises(distributed.DistributedError,
                     match=r"JAX_NUM_PROCESSES 3 needs this process's --process-id \(or JAX_PROCESS_ID\)"):
    distributed.resolve_options()
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
  assert distributed.resolve_options() == distributed.Options("h:2", 3, 2, None)
  # A flag wins over its variable.
  assert distributed.resolve_options(process_id=0) == distributed.Options("h:2", 3, 0, None)
  with pytest.raises(distributed.DistributedError, match=r"process id 3 is not in \[0, 3\)"):
    distributed.resolve_options(process_id=3)


def test_one_process_helpers_of_the_distributed_fit():
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = distributed.global_mesh()
  x = np.arange(4 * 2 * 3 * 2, dtype=np.float32).reshape(4, 2, 3, 2)
  g, prefix_mask = distributed.to_global(x, mesh)
  flat = x.reshape(-1, 2)
  index = np.array([1, 7, 17])
  np.testing.assert_array_equal(np.asarray(distributed.sample_rows(g, prefix_mask, mesh)), flat)
  np.testing.assert_array_equal(np.asarray(distributed.sample_rows(g, prefix_mask, mesh, index)),
                                flat[index])
  # A hole (an image a process skipped): the vectors of the real images, in order.
  holes = np.zeros(g.shape[0], bool)
  holes[[0, 2, 3]] = True
  mask = jax.device_put(holes, NamedSharding(mesh, P(mesh.axis_names[0])))
  np.testing.assert_array_equal(distributed.host_array(mask), holes)
  real = x[[0, 2, 3]].reshape(-1, 2)
  np.testing.assert_array_equal(np.asarray(distributed.sample_rows(g, mask, mesh)), real)
  np.testing.assert_array_equal(np.asarray(distributed.sample_rows(g, mask, mesh, index)),
                                real[index])
  with pytest.raises(ValueError, match="out of range"):
    distributed.sample_rows(g, mask, mesh, np.array([real.shape[0]]))
  np.testing.assert_array_equal(distributed.gather_rows(x), x)
  np.testing.assert_array_equal(distributed.broadcast_from_coordinator(x[0]), x[0])
  assert distributed.agreed_shape((64, 48, 3)) == (64, 48, 3)
  assert distributed.agreed_shape(None) is None
  assert distributed.agreed_shape((64, 48, 3), has_data=False) is None
  distributed.check_all(None, "testing")
  with pytest.raises(KeyError, match="boom"):
    distributed.check_all(KeyError("boom"), "testing")
