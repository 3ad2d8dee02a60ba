"""Progress of long jobs, as tqdm bars on a terminal and as plain, rate-limited lines anywhere else.

A `ProgressReporter` is the `progress(stage, info)` callback that `GLAD.fit`, `GLAD.score` and the data loaders
call. Events (stage, info):

    "images" / "features" / "score": {done, total}
    "local":       {layer, done, total}
    "plan":        {layer, n_vectors, n_used, reason, optional est_seconds, est_mb}
    "global":      {layer, iteration, max_iter, log_likelihood, components}
    "global_done": {layer, n_components, n_iter, converged, seconds}
    "radius":      {layer, radius, radii, held_out_log_likelihood, n_held_out, positions}

On a terminal the counters are tqdm bars (as `glad` always showed them). Off a terminal (a log file, CI, nohup,
a notebook) tqdm draws nothing, so a fit of forty minutes would be silent: there the reporter writes one line per
event, at most one every `interval` seconds per stage; the first and the last event of a stage always print
(the last one when it comes, or when the next stage starts, since a fit that converges early has no event saying
"last"). "plan", "global_done", "radius" and "align_choice" events print one line each in both forms. Disabled
(`glad --quiet`) it prints nothing.

The clock and the stream are constructor arguments, so that tests are deterministic.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any, Callable, Mapping, TextIO

# Seconds per iteration and the time left come from the last few events of a stage: the first iteration of a
# fit includes compilation and is not representative of the rest.
RATE_WINDOW = 10
DEFAULT_INTERVAL = 10.0


def format_duration(seconds: float) -> str:
  """'8.2 s', '3 min 20 s', '1 h 05 min': short and unambiguous in a log."""
  if seconds < 60:
    return f"{seconds:.1f} s"
  s = int(round(seconds))
  if s < 3600:
    return f"{s // 60} min {s % 60:02d} s"
  return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _clock_stamp(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _is_tty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class _Stage:
  """The running stage (stage name, layer): when it last printed, its unprinted last event, recent counters."""

  def __init__(self, key: tuple, total: int | None):
    self.key = key
    self.total = total
    self.last_print: float | None = None
    self.pending: tuple[float, str] | None = None  # (time of the event, its line)
    self.count = -1
    self.recent: collections.deque = collections.deque(maxlen=RATE_WINDOW + 1)  # (time, counter)

  def seconds_per_step(self) -> float | None:
    if len(self.recent) < 2:
      return None
    (t0, c0), (t1, c1) = self.recent[0], self.recent[-1]
    return (t1 - t0) / (c1 - c0) if c1 > c0 else None


class ProgressReporter:
  """The `progress(stage, info)` callback of `glad`: tqdm bars on a terminal, plain lines elsewhere.

  Args:
    enabled: False prints nothing (`glad --quiet`).
    stream: where to write (default: sys.stderr at construction time).
    clock: seconds as a float (default time.monotonic); tests pass a fake one.
    tty: True for bars, False for plain lines; None asks `stream.isatty()`.
    interval: at least this many seconds between two plain lines of one stage.
    prefix: the program name the plain lines start with.
  """

  def __init__(self, enabled: bool = True, *, stream: TextIO | None = None,
               clock: Callable[[], float] | None = None, tty: bool | None = None,
               interval: float = DEFAULT_INTERVAL, prefix: str = "glad"):
    self.enabled = enabled
    self.stream = sys.stderr if stream is None else stream
    self.clock = time.monotonic if clock is None else clock
    self.tty = _is_tty(self.stream) if tty is None else bool(tty)
    self.interval = float(interval)
    self.prefix = prefix
    self._t0 = self.clock()
    self._stage: _Stage | None = None
    self._bar = None

  # ----------------------------------------------------------------------------------------- callback

  def __call__(self, stage: str, info: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if stage in ("plan", "global_done", "radius", "align_choice"):
      # One line each, after whatever the previous stage left unprinted.
      self.close()
      line = {"plan": self._plan_line, "global_done": self._done_line, "radius": self._radius_line,
              "align_choice": self._align_choice_line}[stage](info)
      self._write(line)
      return
    if stage == "global":
      key, count, total = (stage, info["layer"]), int(info["iteration"]), int(info["max_iter"])
    elif "done" in info and "total" in info:
      key, count, total = (stage, info.get("layer")), int(info["done"]), int(info["total"])
    else:
      return  # an event this reporter does not know: showing progress must never stop the job
    now = self.clock()
    st = self._stage
    # A new stage, or the same one started over (the calibration images after the training images).
    if st is None or st.key != key or st.total != total or count < st.count:
      self.close()
      st = self._stage = _Stage(key, total)
    st.count = count
    st.recent.append((now, count))
    if self.tty:
      self._update_bar(stage, info, count, total)
      return
    line = self._event_line(stage, info, st)
    if st.last_print is None or count >= total or now - st.last_print >= self.interval:
      self._write(line, now)
      st.last_print, st.pending = now, None
    else:
      st.pending = (now, line)

  def close(self) -> None:
    """Ends the running stage: prints its last event if it was held back, closes its bar."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._stage is not None and self._stage.pending is not None:
      self._write(self._stage.pending[1], self._stage.pending[0])
    self._stage = None

  # --------------------------------------------------------------------------------------------- lines

  def _write(self, line: str, at: float | None = None) -> None:
    """One line stamped with the time since the reporter started (`at`: when the event happened)."""
    stamp = _clock_stamp((self.clock() if at is None else at) - self._t0)
    print(f"{self.prefix} [{stamp}] {line}", file=self.stream, flush=True)

  @staticmethod
  def _event_line(stage: str, info: Mapping[str, Any], st: _Stage) -> str:
    rate = st.seconds_per_step()
    if stage == "global":
      it, max_iter = int(info["iteration"]), int(info["max_iter"])
      line = (f"global fit {info['layer']}: iteration {it}/{max_iter}, "
              f"mean log-likelihood {float(info['log_likelihood']):.4f}, {int(info['components'])} live components")
      if rate is not None:
        # Tiny fits take milliseconds an iteration: "0.00 s" would say nothing.
        line += f", {rate:.2f} s/iteration" if rate >= 0.1 else f", {1000 * rate:.1f} ms/iteration"
        if it < max_iter:
          line += (f", at most {format_duration(rate * (max_iter - it))} left "
                   "(if it runs to max_iter; the fit usually converges earlier)")
    else:
      done, total = int(info["done"]), int(info["total"])
      what = {"images": "reading images", "features": "features", "score": "scoring",
              "local": f"local weights {info.get('layer', '')}:"}.get(stage, stage)
      unit = {"local": " chunks", "features": " images", "score": " images"}.get(stage, "")
      line = f"{what} {done}/{total}{unit}"
      if rate is not None and done < total:
        line += f" (about {format_duration(rate * (total - done))} left)"
    return line

  @staticmethod
  def _plan_line(info: Mapping[str, Any]) -> str:
    line = f"plan {info['layer']}: {int(info['n_vectors']):,} vectors, {int(info['n_used']):,} used"
    if info.get("reason"):
      line += f" ({info['reason']})"
    est = []
    if info.get("est_seconds") is not None:
      est.append(f"about {format_duration(float(info['est_seconds']))}")
    if info.get("est_mb") is not None:
      est.append(f"about {float(info['est_mb']):,.0f} MB")
    return line + ("; estimated " + ", ".join(est) if est else "")

  @staticmethod
  def _done_line(info: Mapping[str, Any]) -> str:
    how = "converged" if info["converged"] else "capped at max_iter (not converged)"
    return (f"global fit {info['layer']} done: K={int(info['n_components'])} kept, {int(info['n_iter'])} "
            f"iterations, {how}, {format_duration(float(info['seconds']))}")

  @staticmethod
  def _align_choice_line(info: Mapping[str, Any]) -> str:
    return (f"alignment probe (align=auto) {info['candidate']}: synthetic-defect image AUROC "
            f"{float(info['auroc']):.4f}")

  @staticmethod
  def _radius_line(info: Mapping[str, Any]) -> str:
    line = f"local radius {info['layer']}: r = {float(info['radius']):g}"
    lls = info.get("held_out_log_likelihood") or []
    if lls:
      each = ", ".join(f"r = {float(r):g}: {float(v):.4f}" for r, v in zip(info["radii"], lls))
      line += (f" (held-out log-likelihood of {int(info['n_held_out'])} training images at "
               f"{int(info['positions'])} positions: {each})")
    return line

  # ---------------------------------------------------------------------------------------------- bars

  def _update_bar(self, stage: str, info: Mapping[str, Any], done: int, total: int) -> None:
    if self._bar is None:
      from tqdm.auto import tqdm

      desc = {"global": f"global fit {info.get('layer', '')}", "features": "features", "score": "scoring",
              "local": f"local weights {info.get('layer', '')}", "images": "reading images"}.get(stage, stage)
      self._bar = tqdm(total=total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True)
    self._bar.n = done
    if stage == "global":
      self._bar.set_postfix({"loglik": f"{float(info['log_likelihood']):.4f}", "K": int(info["components"])},
                            refresh=False)
    self._bar.refresh()
