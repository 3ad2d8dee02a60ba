"""The progress reporter: plain rate-limited lines off a terminal, tqdm bars on one, nothing when quiet."""

import io
import os
import re
import subprocess
import sys

import pytest

from glad_jax import progress
from glad_jax.progress import ProgressReporter

TINY = ["--backbone", "resnet_tiny", "--image-size", "64", "--k", "4", "--max-iter", "10"]


class FakeClock:
  def __init__(self, t: float = 100.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


class FakeTerminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def plain(clock=None, **kw):
  stream = io.StringIO()
  return ProgressReporter(stream=stream, clock=clock or FakeClock(), tty=False, **kw), stream


def lines(stream) -> list[str]:
  return stream.getvalue().splitlines()


def test_rate_limit_keeps_first_last_and_one_per_interval():
  clock = FakeClock()
  rep, out = plain(clock)
  for done in range(1, 32):  # one batch a second
    rep("features", {"done": done, "total": 31})
    clock.t += 1
  assert [re.search(r"features (\d+)/31", s).group(1) for s in lines(out)] == ["1", "11", "21", "31"]
  assert lines(out)[0] == "glad [00:00] features 1/31 images"
  # 10 s for 10 images in the window: 1 s per image, 20 left.
  assert lines(out)[1] == "glad [00:10] features 11/31 images (about 20.0 s left)"
  assert lines(out)[-1] == "glad [00:30] features 31/31 images"
  rep.close()
  assert len(lines(out)) == 4  # the last event already printed: close adds nothing


def test_global_fit_lines_and_the_held_back_last_iteration():
  clock = FakeClock()
  rep, out = plain(clock)
  for it in range(1, 8):  # 3 s per iteration, converges at 7 of at most 100
    rep("global", {"layer": "layer2", "iteration": it, "max_iter": 100, "log_likelihood": -12.345678 + it,
                   "components": 50 - it})
    clock.t += 3
  assert [re.search(r"iteration (\d+)/", s).group(1) for s in lines(out)] == ["1", "5"]
  assert lines(out)[0] == ("glad [00:00] global fit layer2: iteration 1/100, mean log-likelihood -11.3457, "
                           "49 live components")
  rep("global_done", {"layer": "layer2", "n_components": 43, "n_iter": 7, "converged": True, "seconds": 21.04})
  # Iteration 7 was held back (6 s after the line of iteration 5); the next event prints it, stamped when it came.
  assert lines(out)[2:] == [
      "glad [00:18] global fit layer2: iteration 7/100, mean log-likelihood -5.3457, 43 live components, "
      "3.00 s/iteration, at most 4 min 39 s left (if it runs to max_iter; the fit usually converges earlier)",
      "glad [00:21] global fit layer2 done: K=43 kept, 7 iterations, converged, 21.0 s"]


def test_seconds_per_iteration_come_from_recent_iterations():
  clock = FakeClock()
  rep, out = plain(clock, interval=0.0)
  rep("global", {"layer": "l", "iteration": 1, "max_iter": 40, "log_likelihood": 0.0, "components": 3})
  clock.t += 100  # the second iteration pays for compilation
  for it in range(2, 2 + progress.RATE_WINDOW + 1):
    rep("global", {"layer": "l", "iteration": it, "max_iter": 40, "log_likelihood": 0.0, "components": 3})
    clock.t += 2
  assert "100.00 s/iteration" in lines(out)[1]
  assert ", 2.00 s/iteration, at most 56.0 s left" in lines(out)[-1]  # 40 - 12 = 28 iterations left


def test_fast_iterations_in_milliseconds():
  clock = FakeClock()
  rep, out = plain(clock)
  for it in (1, 2):
    rep("global", {"layer": "l", "iteration": it, "max_iter": 2, "log_likelihood": 0.0, "components": 3})
    clock.t += 0.0042
  assert lines(out)[-1].endswith(", 4.2 ms/iteration")


def test_capped_fit_prints_its_last_iteration_at_once():
  clock = FakeClock()
  rep, out = plain(clock)
  for it in (1, 2, 3):
    rep("global", {"layer": "l", "iteration": it, "max_iter": 3, "log_likelihood": -1.0, "components": 2})
    clock.t += 1
  assert lines(out)[-1] == ("glad [00:02] global fit l: iteration 3/3, mean log-likelihood -1.0000, "
                            "2 live components, 1.00 s/iteration")
  rep("global_done", {"layer": "l", "n_components": 2, "n_iter": 3, "converged": False, "seconds": 4000.0})
  assert lines(out)[-1] == ("glad [00:03] global fit l done: K=2 kept, 3 iterations, "
                            "capped at max_iter (not converged), 1 h 06 min")
  assert len(lines(out)) == 3


def test_plan_images_local_score_lines():
  clock = FakeClock()
  rep, out = plain(clock)
  rep("images", {"done": 3, "total": 3})
  rep("plan", {"layer": "layer1", "n_vectors": 1228800, "n_used": 100000, "reason": "max_samples cap",
               "est_seconds": 200.0, "est_mb": 1536.4})
  rep("plan", {"layer": "layer3", "n_vectors": 4096, "n_used": 4096, "reason": ""})
  clock.t += 75
  rep("local", {"layer": "layer1", "done": 1, "total": 12})
  clock.t += 5
  rep("local", {"layer": "layer1", "done": 2, "total": 12})  # within the interval: held back
  rep("score", {"done": 16, "total": 50})
  assert lines(out) == [
      "glad [00:00] reading images 3/3",
      "glad [00:00] plan layer1: 1,228,800 vectors, 100,000 used (max_samples cap); estimated about 3 min 20 s, "
      "about 1,536 MB",
      "glad [00:00] plan layer3: 4,096 vectors, 4,096 used",
      "glad [01:15] local weights layer1: 1/12 chunks",
      "glad [01:20] local weights layer1: 2/12 chunks (about 50.0 s left)",
      "glad [01:20] scoring 16/50 images"]


def test_a_stage_started_again_prints_its_first_event_again():
  rep, out = plain()
  for done in (1, 2, 3):
    rep("images", {"done": done, "total": 3})
  for done in (1, 2):  # the calibration images: same stage name, a new count
    rep("images", {"done": done, "total": 2})
  for done in (1, 2):  # the test images, as many as the training images
    rep("images", {"done": done, "total": 3})
  rep("protocol", {"step": "fit"})  # not a counter: ignored
  assert [s.split("] ")[1] for s in lines(out)] == [
      "reading images 1/3", "reading images 3/3", "reading images 1/2", "reading images 2/2",
      "reading images 1/3"]
  rep.close()
  assert "] reading images 2/3 " in lines(out)[-1]  # held back, then printed when the stage ends


def test_format_duration():
  assert [progress.format_duration(s) for s in (0.04, 59.94, 60, 200.4, 3599, 3600, 7321)] == [
      "0.0 s", "59.9 s", "1 min 00 s", "3 min 20 s", "59 min 59 s", "1 h 00 min", "2 h 02 min"]


def feed_a_short_fit(rep):
  rep("images", {"done": 5, "total": 5})
  rep("plan", {"layer": "layer1", "n_vectors": 10, "n_used": 10, "reason": "all"})
  for it in (1, 2):
    rep("global", {"layer": "layer1", "iteration": it, "max_iter": 5, "log_likelihood": -1.0, "components": 2})
  rep("global_done", {"layer": "layer1", "n_components": 2, "n_iter": 2, "converged": True, "seconds": 1.0})
  rep("local", {"layer": "layer1", "done": 1, "total": 2})
  rep.close()


def test_terminal_gets_bars_and_anything_else_plain_lines():
  term = FakeTerminal()
  rep = ProgressReporter(stream=term, clock=FakeClock())
  assert rep.tty
  feed_a_short_fit(rep)
  text = term.getvalue()
  assert "global fit layer1" in text and "\r" in text  # tqdm redraws its bar in place
  assert "iteration 1/5" not in text and "reading images 5/5" not in text  # no plain counter lines
  # One-off events are lines in both forms.
  assert "plan layer1: 10 vectors, 10 used (all)" in text and "layer1 done: K=2 kept" in text

  log = io.StringIO()
  rep = ProgressReporter(stream=log, clock=FakeClock())
  assert not rep.tty
  feed_a_short_fit(rep)
  assert "\r" not in log.getvalue()
  assert [s.split("] ")[1].split(":")[0] for s in lines(log)] == [
      "reading images 5/5", "plan layer1", "global fit layer1", "global fit layer1", "global fit layer1 done",
      "local weights layer1"]


@pytest.mark.parametrize("tty", [True, False])
def test_quiet_prints_nothing(tty):
  stream = FakeTerminal() if tty else io.StringIO()
  feed_a_short_fit(ProgressReporter(False, stream=stream, clock=FakeClock()))
  assert stream.getvalue() == ""


def test_commands_use_the_reporter():
  from glad_jax import commands

  assert commands.ProgressBars is ProgressReporter


def test_fit_off_a_terminal_reports_progress_in_the_log(category, tmp_path):
  """Acceptance: `glad fit` with stderr in a file writes its progress as plain lines."""
  log_path = tmp_path / "fit.log"
  with open(log_path, "w") as log:
    proc = subprocess.run([sys.executable, "-m", "glad_jax", "fit", str(category), "--out", str(tmp_path / "ck")]
                          + TINY, stdout=subprocess.PIPE, stderr=log, text=True,
                          env=dict(os.environ, GLAD_DEBUG="1"), timeout=300)
  err = log_path.read_text()
  assert proc.returncode == 0, err[-3000:]
  assert "saved" in proc.stdout
  assert "\r" not in err  # no tqdm redraws in a log
  assert re.search(r"^glad \[\d\d:\d\d\] reading images 1?\d/\d+", err, re.M)
  assert re.search(r"^glad \[\d\d:\d\d\] features \d+/\d+ images", err, re.M)
  for layer, grid in (("layer1", 16), ("layer2", 8), ("layer3", 4)):  # the default layers of a 64 px image
    n = 9 * grid * grid  # 9 training images (1 of the 10 held out), every vector used
    assert re.search(rf"^glad \[[\d:]+\] plan {layer}: {n:,} vectors, {n:,} used \(all\)", err, re.M), err
    its = [int(m) for m in re.findall(rf"^glad \[[\d:]+\] global fit {layer}: iteration (\d+)/10, "
                                      r"mean log-likelihood -?\d+\.\d{4}, \d+ live components", err, re.M)]
    done = re.search(rf"^glad \[[\d:]+\] global fit {layer} done: K=(\d+) kept, (\d+) iterations, "
                     r"(converged|capped at max_iter \(not converged\)), \d+\.\d s$", err, re.M)
    summary = re.search(rf"^  {layer}: d=\d+, .* K 4 -> (\d+) in (\d+) iterations", err, re.M)
    assert its and done and summary, err
    # The first iteration and the last one (which the summaries name) always print.
    assert its[0] == 1 and its[-1] == int(done.group(2)) == int(summary.group(2))
    assert done.group(1) == summary.group(1)
    assert re.search(rf"^glad \[[\d:]+\] local weights {layer}: \d+/\d+ chunks", err, re.M)


def test_quiet_fit_prints_no_progress(category, tmp_path, capsys):
  from glad_jax import cli

  # One layer and no local weights: the wiring of --quiet is what is tested, not the fit.
  argv = ["--quiet", "fit", str(category), "--out", str(tmp_path / "ck"), "--layers", "layer1", "--global-only"]
  assert cli.main(argv + TINY) == 0
  err = capsys.readouterr().err
  assert "glad: fitting on" in err and "  layer1: d=" in err  # what --quiet keeps
  assert "glad [" not in err and "iteration 1/" not in err


def test_radius_choice_line():
  rep, out = plain(FakeClock())
  rep("radius", {"layer": "layer1", "radius": 2.0, "radii": [1.0, 2.0, 3.0],
                 "held_out_log_likelihood": [-5.1234, -5.01, -5.02], "n_held_out": 20, "positions": 128})
  rep("radius", {"layer": "layer2", "radius": 1.0, "radii": [1.0], "held_out_log_likelihood": [],
                 "n_held_out": 0, "positions": 0})
  assert lines(out) == [
      "glad [00:00] local radius layer1: r = 2 (held-out log-likelihood of 20 training images at 128 positions: "
      "r = 1: -5.1234, r = 2: -5.0100, r = 3: -5.0200)",
      "glad [00:00] local radius layer2: r = 1"]


def test_align_choice_line():
  rep, out = plain(FakeClock())
  rep("align_choice", {"candidate": "none", "auroc": 0.80826})
  rep("align_choice", {"candidate": "euclidean", "auroc": 0.841797})
  assert lines(out) == [
      "glad [00:00] alignment probe (align=auto) none: synthetic-defect image AUROC 0.8083",
      "glad [00:00] alignment probe (align=auto) euclidean: synthetic-defect image AUROC 0.8418"]
