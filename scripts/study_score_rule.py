"""Which smoothing of GLAD's anomaly map and which image score would synthetic defects choose?

  python scripts/study_score_rule.py [EXTRA_CATEGORY ...] [--dev all|none|NAME,...] [--sigmas 0,2,4,8]
      [--scores q0.005,max] [--max-train 300] [--quick] [--out DIR]

GLAD's image score is minus the q = 0.5% quantile of the fused log-likelihood map (Section 3.3), on the raw map;
PaDiM and PatchCore smooth their maps with a Gaussian (sigma = 4 px at 256 px) and take the maximum. This study
fits GLAD with its defaults once per category (the splits and subsets of scripts/benchmark.py), scores the
held-out good images, seeded synthetic defects pasted into them (`glad_jax.synthetic`: cut-paste, scratch, blob,
one copy per image and kind, as `glad validate`) and the test split once, then re-reads the same maps under every
rule: Gaussian smoothing of sigma pixels (0: none), then the image score ('q<Q>': the (1 - Q)-quantile of the
anomaly map, 'max': its maximum). Per category and rule it reports

  val_auroc, val_pixel_auroc   synthetic-defect image / pixel AUROC on the held-out good images: the label-free
                               criterion
  image_auroc, pixel_auroc     of the test split, to explain what a choice does (never used to choose)

and 'chosen': the one rule with the highest mean val_auroc over the categories (the same rule for every
category). --quick: tiny subsets, K = 16, 128 px (a smoke test). With --out DIR the table goes to
DIR/study_score_rule.md and the numbers to DIR/study_score_rule.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (the benchmark's splits, subsets and category names)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  benchmark.add_study_arguments(p)
  p.add_argument("--sigmas", default="0,2,4,8", help="Gaussian smoothing sigmas in pixels (0: none)")
  p.add_argument("--scores", default="q0.005,max", help="image scores: q<Q> (the (1-Q)-quantile) or max")
  return p


def parse_rules(sigmas: str, scores: str) -> list[tuple[float, str]]:
  try:
    sig = [float(v) for v in benchmark._names(sigmas)]
  except ValueError:
    sig = []
  if not sig or any(not s >= 0 for s in sig):
    raise ValueError(f"--sigmas must be numbers >= 0, e.g. 0,2,4; got {sigmas!r}")
  names = benchmark._names(scores)
  for name in names:
    if name != "max" and not (name.startswith("q") and _quantile(name) is not None):
      raise ValueError(f"--scores: unknown score {name!r} (q<Q> with 0 < Q < 1, or max)")
  if not names:
    raise ValueError("--scores is empty")
  return [(s, n) for s in sig for n in names]


def _quantile(name: str) -> float | None:
  try:
    q = float(name[1:])
  except ValueError:
    return None
  return q if 0.0 < q < 1.0 else None


def image_scores(maps: np.ndarray, score: str) -> np.ndarray:
  """Image scores of anomaly maps (N, S, S): their maximum, or their (1 - Q)-quantile for 'q<Q>' (the paper's
  "minus the Q-quantile of the log-likelihood", the maps being minus the log-likelihood)."""
  flat = maps.reshape(len(maps), -1)
  if score == "max":
    return flat.max(axis=1)
  return np.quantile(flat, 1.0 - _quantile(score), axis=1)


def smoothed(maps: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian smoothing (`glad_jax.baselines.gaussian_blur`, scipy's reflect mode) of maps (N, S, S)."""
  if sigma <= 0:
    return maps
  import jax.numpy as jnp

  from glad_jax.baselines import gaussian_blur

  return np.concatenate([np.asarray(gaussian_blur(jnp.asarray(maps[i:i + 64]), sigma))
                         for i in range(0, len(maps), 64)])


def study_category(data, config, extractor, rules: Sequence[tuple[float, str]], *, seed: int, batch_size: int
                   ) -> list[dict[str, Any]]:
  """One row per rule for one category (`benchmark.CategoryData`)."""
  import jax

  from glad_jax import metrics, synthetic
  from glad_jax.evaluation import FunctionalModel, load_records, metrics_of
  from glad_jax.methods import get_method, glad

  size = config.image_size
  train, held, test = (load_records(r, size) for r in (data.train, data.held, data.test))
  state = glad.fit(extractor(train.images, batch_size=batch_size), config, jax.random.PRNGKey(seed))
  model = FunctionalModel(get_method("glad"), state, extractor)
  defects = synthetic.defect_set(held.images, synthetic.KINDS, seed=seed)
  def_images = np.concatenate([d[0] for d in defects.values()])
  def_masks = np.concatenate([d[1] for d in defects.values()]).astype(bool)
  clean_maps = np.asarray(model.score(held.images, batch_size=batch_size).anomaly_maps)
  def_maps = np.asarray(model.score(def_images, batch_size=batch_size).anomaly_maps)
  test_maps = np.asarray(model.score(test.images, batch_size=batch_size).anomaly_maps)
  val_labels = np.r_[np.zeros(len(clean_maps), int), np.ones(len(def_maps), int)]
  val_masks = np.concatenate([np.zeros(clean_maps.shape, bool), def_masks])
  rows = []
  for sigma in sorted({s for s, _ in rules}):
    val_maps = smoothed(np.concatenate([clean_maps, def_maps]), sigma)
    t_maps = smoothed(test_maps, sigma)
    val_pixel = metrics.pixel_auroc(val_masks, val_maps)
    pixel = None  # the test split's pixel metrics: one per sigma (the image score does not change the map)
    for s, score in rules:
      if s != sigma:
        continue
      t_scores = image_scores(t_maps, score)
      if pixel is None:
        pixel = {k: v for k, v in metrics_of(test, t_scores, t_maps).items() if k in ("pixel_auroc", "aupro")}
      rows.append({"category": data.name, "sigma": sigma, "score": score,
                   "val_auroc": metrics.image_auroc(val_labels, image_scores(val_maps, score)),
                   "val_pixel_auroc": val_pixel, "image_auroc": metrics.image_auroc(test.labels, t_scores),
                   **pixel})
  return rows


def run(args) -> tuple[str, dict[str, Any]]:
  from glad_jax.report import markdown_table

  rules = parse_rules(args.sigmas, args.scores)
  config, splits, extractor = benchmark.study_setup(args, "study_score_rule")
  rows = []
  for data in splits:
    rows += study_category(data, config, extractor, rules, seed=args.seed, batch_size=args.batch_size)
  means = {rule: float(np.mean([r["val_auroc"] for r in rows if (r["sigma"], r["score"]) == rule]))
           for rule in rules}
  chosen = max(rules, key=lambda rule: means[rule])  # the first of equal means: rules in --sigmas order
  for r in rows:
    r["chosen"] = (r["sigma"], r["score"]) == chosen
  mean_rows = [{"category": "mean", "sigma": s, "score": n, "val_auroc": means[(s, n)],
                "image_auroc": float(np.mean([r["image_auroc"] for r in rows if (r["sigma"], r["score"]) == (s, n)])),
                "chosen": (s, n) == chosen} for s, n in rules]
  summary = {"chosen_sigma": chosen[0], "chosen_score": chosen[1], "mean_val_auroc": means[chosen]}
  report = "\n".join([
      "# Map smoothing and image score chosen by synthetic defects", "",
      f"GLAD defaults (K = {config.n_components}, {config.image_size} px); rules {rules}; 'chosen': the highest "
      f"mean synthetic image AUROC over the categories (held-out good images and defects pasted into them; no "
      f"test label): sigma {chosen[0]:g}, score {chosen[1]}.", "",
      markdown_table(rows + mean_rows)]) + "\n"
  return report, {"rows": rows + mean_rows, "summary": summary, "settings": vars(args)}


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    parse_rules(args.sigmas, args.scores)
  except ValueError as e:
    print(f"study_score_rule: {e}", file=sys.stderr)
    return 2
  report, result = run(args)
  print(report, end="")
  if args.out:
    benchmark.write_outputs(pathlib.Path(args.out), "study_score_rule", report, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
