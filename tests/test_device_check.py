"""scripts/device_check.sh, the prepared accelerator check, smoke-tested on the CPU.

Accelerator time is scarce and a broken script wastes all of it, so CI runs the script's CPU-only mode
(`--cpu-smoke`: tiny backbone, 64 px, K = 8) and checks that every stage passes and that the figures a GPU run
reports (fit seconds, images/s per batch, GPU/CPU agreement, peak device memory) arrive, finite, in its JSON and
log. No data set or weights are read: only the checkout reaches the device machine.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
TIMEOUT_S = 150
STAGES = ("env", "tests_core", "bench_float32", "bench_bfloat16", "tests_backbones")


def _run(out: pathlib.Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
  # The caller's JAX / XLA settings (forced device counts, platforms) must not leak into the stages.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.pop("OUT", None)
  return subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--python", sys.executable, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_reports_the_figures(tmp_path):
  proc = _run(tmp_path, "--cpu-smoke")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  result = json.loads((tmp_path / "device_check.json").read_text())
  log = (tmp_path / "device_check.log").read_text()
  assert result["mode"] == "smoke"
  assert [s["name"] for s in result["stages"]] == list(STAGES)
  for s in result["stages"]:
    assert s["status"] == "ok" and s["exit_status"] == 0, s
    assert _finite(s["seconds"]) and 0 < s["seconds"] <= s["limit_s"] + 1, s
    assert f"=== stage {s['name']}: ok" in log
  for name in ("tests_core", "tests_backbones"):
    t = result["tests"][name]
    assert t["passed"] >= 1 and t["failures"] == t["errors"] == 0 and not t["problems"], t
  for dtype in ("float32", "bfloat16"):
    b = result["bench"][dtype]
    assert b == json.loads((tmp_path / f"bench_{dtype}.json").read_text())
    assert b["complete"] and "error" not in b
    assert b["setup"]["backbone_dtype"] == dtype and b["setup"]["platform"] == "cpu"
    assert _finite(b["setup"]["estimated_fit_bytes_per_device"])
    glad = b["glad"]
    for key in ("fit_s", "model_fit_s", "features_s"):
      assert _finite(glad[key]) and glad[key] > 0, (key, glad[key])
    assert set(glad["images_per_s"]) == set(glad["ms_per_image"]) == {"1", "4"}
    assert all(_finite(v) and v > 0 for v in glad["images_per_s"].values())
    assert all(_finite(v) and v > 0 for v in b["backbone"]["images_per_s"].values())
    for layer in glad["layers"].values():
      assert layer["k_end"] >= 1 and _finite(layer["global_s"]) and _finite(layer["local_s"])
    # Peak device memory: the key is always there; the CPU backend has no memory statistics (None).
    assert "device_peak_bytes" in b["memory"]
    assert b["memory"]["device_peak_bytes"] is None or _finite(b["memory"]["device_peak_bytes"])
    assert _finite(b["memory"]["host_peak_rss_bytes"])
    agree = b["cpu_agreement"]
    assert agree["images"] == 4 and agree["same_backend"]
    assert len(agree["scores_device"]) == len(agree["scores_cpu"]) == 4
    for key in ("end_to_end", "from_features", "maps_end_to_end"):
      for stat in ("max_rel", "max_abs", "max_rel_to_range"):
        assert _finite(agree[key][stat]), (key, stat, agree[key])
    # The smoke run's "device" is the CPU itself: the same program on the same backend.
    assert agree["end_to_end"]["max_rel"] <= 1e-6 and agree["from_features"]["max_rel"] <= 1e-6
    assert f"bench {dtype} on cpu (cpu): fit " in log
  assert result["targets"] == {}   # the targets are for the GPU run only
  assert "device check passed" in log and "device check passed" in proc.stdout


def test_a_failing_stage_is_named_and_the_exit_status_is_nonzero(tmp_path):
  # An interpreter that always fails: the env stage fails, the later stages are skipped (reported, not run), the
  # summary cannot run either, and the script says so and exits 1. No JAX work: this is fast.
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), "--python", "false"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stdout
  log = (tmp_path / "device_check.log").read_text()
  assert "device check FAILED" in log and "env (exit status 1)" in log
  for stage in STAGES[1:]:
    assert f"{stage} (skipped: the env stage failed)" in log
  assert "summary (could not write" in log


def test_bad_options_are_refused(tmp_path):
  for args, message in ((["--nope"], "unknown option --nope"), (["--budget", "soon"], "whole seconds")):
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_the_gpu_run_stops_at_once_when_jax_sees_no_gpu(tmp_path):
  # On a machine whose JAX has no GPU (CPU-only CI, or a device machine whose CUDA plugin is missing), the GPU
  # run must not spend its budget running the WRN50-2 benches on the CPU: one clear line, then nothing else.
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path), "--python", sys.executable], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=90)
  assert proc.returncode == 1, proc.stdout
  log = (tmp_path / "device_check.log").read_text()
  assert "no GPU visible to JAX (default backend 'cpu')" in log
  result = json.loads((tmp_path / "device_check.json").read_text())
  assert [(s["name"], s["status"]) for s in result["stages"]] == [
      ("env", "failed"), *((name, "skipped") for name in STAGES[1:])]
  assert all(t["met"] is None for t in result["targets"].values())   # nothing measured, nothing claimed
