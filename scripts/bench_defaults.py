"""What a user gets from the default `glad fit`: seconds, accuracy and what the global fit used, per category.

For each category and each setting this runs, as a user would, in fresh processes,

  glad fit DATA --out RUN/ckpt [SETTING'S FLAGS]     timed (wall clock of the whole command: reading the
                                                   images, features, global and local fits, thresholds,
                                                   writing the checkpoint; JIT compilation included)
  glad eval RUN/ckpt DATA --out RUN/eval           image AUROC, pixel AUROC and AUPRO of the test split

with stderr going to RUN/fit.log (off a terminal: the plain progress lines), and prints one Markdown table:
category, setting, fit seconds, vectors used by each layer's global fit (and why), K-MLE iterations per
layer, image AUROC, pixel AUROC, AUPRO, and whether the fit stayed within --budget seconds.

Settings (--settings, comma-separated):
  default   no option at all (GLADConfig(): max_samples 100,000, drawn stratified)
  N         --max-samples N (e.g. 50000)
  all       --max-samples all: every vector, the paper's fit (about half an hour for tire here)
  auto      --max-samples auto: the measured-speed budget (--fit-budget)

Usage:
  python scripts/bench_defaults.py                                   # default on tire, magnetic_tile, mpdd
  python scripts/bench_defaults.py --settings default,50000 --all-for mvtec3d_tire_rgb
  python scripts/bench_defaults.py --categories ../shared/data/casting --settings default
Run it on a quiet machine: it measures time. --out keeps the runs (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CATEGORIES = ("mvtec3d_tire_rgb", "magnetic_tile", "mpdd_metal_plate")


def setting_flags(setting: str) -> list[str]:
  if setting == "default":
    return []
  if setting in ("all", "auto") or setting.isdigit():
    return ["--max-samples", setting]
  raise SystemExit(f"bench_defaults: unknown setting {setting!r} (default, all, auto or an integer)")


def run_one(category: pathlib.Path, setting: str, out: pathlib.Path, extra: list[str]) -> dict:
  from glad_jax.model import GLAD

  out.mkdir(parents=True, exist_ok=True)
  glad = [sys.executable, "-m", "glad_jax"]
  t0 = time.perf_counter()
  with open(out / "fit.log", "w") as log:
    subprocess.run(glad + ["fit", str(category), "--out", str(out / "ckpt"), *setting_flags(setting), *extra],
                   check=True, stdout=log, stderr=log)
  fit_s = time.perf_counter() - t0
  with open(out / "eval.log", "w") as log:
    subprocess.run(glad + ["eval", str(out / "ckpt"), str(category), "--out", str(out / "eval")],
                   check=True, stdout=log, stderr=log)
  metrics = json.loads((out / "eval" / "metrics.json").read_text())
  model = GLAD.load(out / "ckpt")
  layers = {name: {"n_vectors": i.n_samples, "n_used": i.n_samples_global, "reason": i.global_reason,
                   "n_iter": i.n_iter, "converged": i.converged, "seconds_global": i.seconds_global,
                   "seconds_local": i.seconds_local, "radius": i.radius}
            for name, i in model.fit_info.items()}
  return {"category": category.name, "setting": setting, "fit_s": fit_s, "layers": layers,
          "image_auroc": metrics.get("image_auroc"), "pixel_auroc": metrics.get("pixel_auroc"),
          "aupro": metrics.get("aupro")}


def _fmt(v, spec=".4f") -> str:
  return "" if v is None else format(v, spec)


def table(rows: list[dict], budget: float) -> str:
  head = ("| category | setting | fit s | within budget | global fit on (per layer) | iterations | local radius "
          "| image AUROC | pixel AUROC | AUPRO |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    used = " / ".join(f"{l['n_used']:,}" + ("" if l["n_used"] < l["n_vectors"] else " (all)")
                      for l in r["layers"].values())
    iters = " / ".join(f"{l['n_iter']}" + ("" if l["converged"] else "*") for l in r["layers"].values())
    radii = " / ".join("-" if l.get("radius") is None else f"{l['radius']:g}" for l in r["layers"].values())
    lines.append(f"| {r['category']} | {r['setting']} | {r['fit_s']:.1f} | {'yes' if r['fit_s'] <= budget else 'NO'} "
                 f"| {used} | {iters} | {radii} | {_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} "
                 f"| {_fmt(r['aupro'])} |")
  return "\n".join(lines) + "\n(* = stopped at max_iter without reaching tol)"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--categories", nargs="+", default=[str(DATA / c) for c in CATEGORIES],
                 help="MVTec-layout category folders (default: tire, magnetic_tile, mpdd_metal_plate)")
  p.add_argument("--settings", default="default", help="comma-separated: default, all, auto, N")
  p.add_argument("--all-for", default="", help="comma-separated category names that also get the 'all' setting")
  p.add_argument("--budget", type=float, default=300.0, help="seconds a default fit should stay within")
  p.add_argument("--out", type=pathlib.Path, help="folder for the runs and bench_defaults.json")
  p.add_argument("--fit-args", default="", help="extra flags for every glad fit (one string)")
  args = p.parse_args(argv)

  out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="bench_defaults_"))
  settings = [s.strip() for s in args.settings.split(",") if s.strip()]
  with_all = {c.strip() for c in args.all_for.split(",") if c.strip()}
  rows = []
  for cat in map(pathlib.Path, args.categories):
    if not cat.is_dir():
      raise SystemExit(f"bench_defaults: {cat} is not a folder")
    for setting in settings + (["all"] if cat.name in with_all and "all" not in settings else []):
      print(f"bench_defaults: {cat.name}, {setting} ...", file=sys.stderr, flush=True)
      rows.append(run_one(cat, setting, out / cat.name / setting, args.fit_args.split()))
      print(f"  fit {rows[-1]['fit_s']:.1f} s, image AUROC {_fmt(rows[-1]['image_auroc'])}", file=sys.stderr,
            flush=True)
      (out / "bench_defaults.json").write_text(json.dumps(rows, indent=1))
  print(table(rows, args.budget))
  print(f"runs and logs: {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
