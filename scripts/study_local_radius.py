"""Which local radius r would held-out good images choose, and what would it do to the test ranking?

  python scripts/study_local_radius.py [EXTRA_CATEGORY ...] [--dev all|none|NAME,...] [--radii 1,2,3]
      [--max-train 300] [--quick] [--out DIR]

The local weights pi_k(x) (Eq. 10-12) of GLAD are fitted on the samples of the disk |y - x| <= r. A larger r
pools more samples per position (steadier weights, tolerant of misregistration) and blurs position-specific
structure. This study asks whether a label-free rule picks r well: for every category (the splits and subsets of
scripts/benchmark.py: held-out good images, training capped at --max-train, the whole test split) it fits GLAD with
its defaults once at the first radius of --radii, refits only the local weights at every other radius on the
same global mixtures, and reports per radius

  held_nll            the mean of the held-out good images' anomaly maps (minus the per-position log-likelihood
                      summed over layers, Section 3.3): the label-free criterion; the smallest is 'chosen'
  held_nll_<layer>    the same, one layer at a time
  image_auroc, pixel_auroc, aupro   of the test split, to explain what the choice does (never used to choose)

This is the whole-grid study the default's rule (`radius="auto"`, `glad_jax.methods.glad.choose_radius`: training
images only, bands of rows, a paired test) came from. --quick: tiny subsets, K = 16, 128 px (a smoke test). With --out DIR the table goes to DIR/study_local_radius.md
and the numbers to DIR/study_local_radius.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (the benchmark's splits, subsets and category names)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  benchmark.add_study_arguments(p)
  p.add_argument("--radii", default="1,2,3", help="radii to compare (grid units), the default fit's first")
  return p


def parse_radii(text: str) -> list[float]:
  try:
    radii = [float(v) for v in benchmark._names(text)]
  except ValueError:
    radii = []
  if not radii or any(not r >= 0 for r in radii) or len(set(radii)) != len(radii):
    raise ValueError(f"--radii must be distinct numbers >= 0, e.g. 1,2,3; got {text!r}")
  return radii


def with_radius(state, features: dict, radius: float):
  """`state` with its local weights refitted at `radius` on the same global mixtures (Eq. 10-12)."""
  from glad_jax import local as local_lib
  from glad_jax import scoring

  c = state.config
  layers = {}
  for name in c.layers:
    mixture = state.mixture(name)
    weights = local_lib.fit_local_weights(features[name], mixture, radius=radius, max_iter=c.local_max_iter,
                                          tol=c.tol)
    layers[name] = scoring.make_layer_model(mixture, tuple(features[name].shape[1:3]), weights, radius=radius)
  # The update statistics belong to the radius of the fit: this state is for scoring only.
  return state.replace(layers=layers, config=c.replace(radius=radius), update_stats=None)


def score_all(score, state, features: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  n = len(next(iter(features.values())))
  maps, scores = [], []
  for i in range(0, n, batch_size):
    m, s = score(state, {k: v[i:i + batch_size] for k, v in features.items()})
    maps.append(np.asarray(m))
    scores.append(np.asarray(s))
  return np.concatenate(maps), np.concatenate(scores)


def study_category(data, config, extractor, radii: Sequence[float], *, seed: int, batch_size: int
                   ) -> list[dict[str, Any]]:
  """One row per radius for one category (`benchmark.CategoryData`)."""
  import jax

  from glad_jax.evaluation import load_records, metrics_of
  from glad_jax.methods import glad

  size = config.image_size
  train, held, test = (load_records(r, size) for r in (data.train, data.held, data.test))
  f_train, f_held, f_test = (extractor(b.images, batch_size=batch_size) for b in (train, held, test))
  score = jax.jit(glad.score)
  t0 = time.perf_counter()
  fitted = glad.fit(f_train, config.replace(radius=radii[0]), jax.random.PRNGKey(seed))
  rows = []
  for r in radii:
    state = fitted if r == radii[0] else with_radius(fitted, f_train, r)
    held_maps, _ = score_all(score, state, f_held, batch_size)
    row = {"category": data.name, "radius": r, "held_nll": float(held_maps.mean())}
    for name in config.layers:
      one = state.replace(layers={name: state.layers[name]})
      row[f"held_nll_{name}"] = float(score_all(score, one, f_held, batch_size)[0].mean())
    maps, scores = score_all(score, state, f_test, batch_size)
    m = metrics_of(test, scores, maps)
    row.update(image_auroc=m["image_auroc"], pixel_auroc=m.get("pixel_auroc"), aupro=m.get("aupro"),
               seconds=time.perf_counter() - t0)
    rows.append(row)
  best = min(rows, key=lambda row: row["held_nll"])
  for row in rows:
    row["chosen"] = row is best
  return rows


def run(args) -> tuple[str, dict[str, Any]]:
  from glad_jax.report import markdown_table

  radii = parse_radii(args.radii)
  config, splits, extractor = benchmark.study_setup(args, "study_local_radius")
  rows = []
  for data in splits:
    rows += study_category(data, config, extractor, radii, seed=args.seed, batch_size=args.batch_size)
  chosen = [r for r in rows if r["chosen"]]
  first = [r for r in rows if r["radius"] == radii[0]]
  summary = {"mean_image_auroc_default": float(np.mean([r["image_auroc"] for r in first])),
             "mean_image_auroc_chosen": float(np.mean([r["image_auroc"] for r in chosen]))}
  report = "\n".join([
      "# Local radius chosen by held-out good images", "",
      f"GLAD defaults (K = {config.n_components}, {config.image_size} px), radii {radii}; 'chosen': the smallest "
      f"held_nll (held-out good images only). Mean test image AUROC: default r = {radii[0]:g} "
      f"{summary['mean_image_auroc_default']:.4f}, chosen r {summary['mean_image_auroc_chosen']:.4f}.", "",
      markdown_table(rows)]) + "\n"
  return report, {"radii": radii, "config": {"n_components": config.n_components,
                                              "image_size": config.image_size, "seed": args.seed},
                  "rows": rows, **summary}


def main(argv: Sequence[str] | None = None) -> int:
  return benchmark.study_main("study_local_radius", build_parser(), run, argv)


if __name__ == "__main__":
  sys.exit(main())
