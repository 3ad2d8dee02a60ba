"""glad_jax.profiling (memory and time measurements) and the fast-path options of the model.

References: the kernel's own counters (/proc/self/status VmRSS/VmHWM), psutil where installed, time.sleep for
the clocks; the float32 backbone for the bfloat16 one; the NumPy feature path of `fit_features` for the
device-resident features of `fit`.
"""

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glad_jax import profiling
from glad_jax.config import GLADConfig
from glad_jax.model import GLAD

from conftest import texture

MB = 1 << 20
LINUX = sys.platform.startswith("linux")


def _proc_status_kb(field: str) -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.skipif(not LINUX, reason="/proc/self/status is Linux only")
def test_host_rss_and_lifetime_peak_match_the_kernel_counters():
  rss = profiling.host_rss_bytes()
  assert abs(rss - _proc_status_kb("VmRSS") * 1024) < 16 * MB
  # VmHWM and ru_maxrss are two views of the same high-water mark.
  assert abs(profiling.host_peak_rss_bytes() - _proc_status_kb("VmHWM") * 1024) < 16 * MB
  assert profiling.host_peak_rss_bytes() >= rss - 16 * MB


def test_host_rss_matches_psutil():
  psutil = pytest.importorskip("psutil")
  assert abs(profiling.host_rss_bytes() - psutil.Process().memory_info().rss) < 16 * MB


@pytest.mark.parametrize("size_mb", [96, 192])
def test_peak_memory_sees_a_known_allocation(size_mb):
  size = size_mb * MB
  with profiling.PeakMemory(interval=0.001) as mem:
    block = np.ones(size // 8)  # float64, every page touched
    time.sleep(0.05)
    del block
  r = mem.report
  assert 0.9 * size <= r.host_increase <= 1.2 * size + 24 * MB, r
  assert r.host_start <= r.host_peak and r.host_end <= r.host_peak
  assert r.seconds >= 0.05
  # CPU: no device counters (device arrays live in the RSS); elsewhere the backend's stats are read.
  assert (r.device_peak is None) == (profiling.device_memory_stats() is None)


def test_peak_memory_of_nothing_is_small():
  with profiling.PeakMemory() as mem:
    pass
  assert mem.report.host_increase < 8 * MB


def test_device_stats_are_consistent():
  stats = profiling.device_memory_stats()
  in_use = profiling.device_bytes_in_use()
  if stats is None:
    assert in_use is None and profiling.device_peak_bytes() is None
  else:
    x = jax.device_put(np.ones(4 * MB // 4, np.float32)).block_until_ready()
    assert profiling.device_bytes_in_use() >= 4 * MB
    assert profiling.device_peak_bytes() >= profiling.device_bytes_in_use()
    del x


def test_bad_interval_is_rejected():
  with pytest.raises(ValueError, match="interval must be > 0"):
    profiling.PeakMemory(interval=0)


def test_format_bytes():
  assert profiling.format_bytes(3 * MB // 2) == "1.5 MB"
  assert profiling.format_bytes(None) == "n/a"


# --------------------------------------------------------------------------------------------- time


def test_time_call_measures_a_sleep_and_runs_warmup_calls():
  calls = []

  def fn(seconds):
    calls.append(seconds)
    time.sleep(seconds)

  t = profiling.time_call(fn, 0.04, repeats=3, warmup=2)
  assert len(calls) == 5 and len(t.times) == 3
  assert all(0.04 <= x < 0.04 + 0.2 for x in t.times), t.times
  assert t.best <= t.median <= max(t.times) and t.best <= t.mean


def test_time_call_waits_for_jax_results():
  f = jax.jit(lambda x: jnp.linalg.matrix_power(x @ x.T, 8).sum())
  x = jnp.ones((256, 256), jnp.float32) / 256
  t = profiling.time_call(f, x, repeats=2)
  assert t.best > 0


def test_time_call_rejects_bad_counts():
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    profiling.time_call(lambda: None, repeats=0)
  with pytest.raises(ValueError, match="warmup must be >= 0"):
    profiling.time_call(lambda: None, warmup=-1)


def test_stopwatch_and_stage_timer():
  with profiling.Stopwatch() as sw:
    time.sleep(0.03)
  assert 0.03 <= sw.seconds < 0.03 + 0.2
  seen = []
  timer = profiling.StageTimer(chain=lambda stage, info: seen.append(stage))
  timer.start()
  time.sleep(0.03)
  timer("features", {"done": 1, "total": 1})
  time.sleep(0.06)
  timer("global", {"layer": "layer1", "iteration": 1})
  time.sleep(0.02)
  timer("global", {"layer": "layer1", "iteration": 2})
  assert seen == ["features", "global", "global"]
  assert set(timer.seconds) == {"features", "global/layer1"}
  assert 0.03 <= timer.seconds["features"] < 0.03 + 0.15
  assert 0.08 <= timer.seconds["global/layer1"] < 0.08 + 0.2


# ------------------------------------------------------------------------------ model fast-path options


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(3)
  return np.stack([texture(rng) for _ in range(6)])


def test_bfloat16_backbone_gives_features_close_to_float32(images):
  base = GLADConfig(backbone="resnet_tiny", image_size=64, n_components=4, max_iter=5)
  f32 = GLAD(base).features(images)
  ext16 = GLAD(base.replace(backbone_dtype="bfloat16")).extractor
  assert ext16.dtype == jnp.bfloat16
  f16 = GLAD(base.replace(backbone_dtype="bfloat16"), extractor=ext16).features(images)
  for name, ref in f32.items():
    assert f16[name].dtype == np.float32 and f16[name].shape == ref.shape
    rel = np.linalg.norm(f16[name] - ref) / np.linalg.norm(ref)
    # bfloat16 keeps 8 significant bits (~0.4%); a few layers of rounding stay within a few percent, and the
    # two are not the same computation (rel > 0).
    assert 0 < rel < 0.05, (name, rel)


def test_bad_backbone_dtype_is_rejected():
  with pytest.raises(ValueError, match="backbone_dtype must be 'float32' or 'bfloat16', got 'float16'"):
    GLAD(GLADConfig(backbone="resnet_tiny", backbone_dtype="float16"))


def test_fit_on_device_features_equals_fit_on_numpy_features(images):
  """`fit` keeps the features on the device; `fit_features` of NumPy features must give the same model."""
  config = GLADConfig(backbone="resnet_tiny", layers=("layer2",), image_size=64, n_components=4, max_iter=5,
                      local_max_iter=5)  # one layer: fewer compilations, same code path
  a = GLAD(config).fit(images)
  feats = a.features(images)
  assert all(isinstance(v, np.ndarray) for v in feats.values())
  b = GLAD(config, extractor=a.extractor).fit_features(feats)
  for name in config.layers:
    la, lb = a.layers[name], b.layers[name]
    np.testing.assert_allclose(la.mixture.weights, lb.mixture.weights, rtol=1e-6)
    np.testing.assert_allclose(la.mixture.means, lb.mixture.means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(la.mixture.cov_chol, lb.mixture.cov_chol, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(la.local.tile_position, lb.local.tile_position)
