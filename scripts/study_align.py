"""Would aligning the images on a reference help, and which label-free signal says so?

  python scripts/study_align.py [EXTRA_CATEGORY ...] [--dev all|none|NAME,...] [--model euclidean]
      [--max-train 300] [--quick] [--out DIR]

GLAD can align object images on the first training image before the backbone (paper 4.1, inverse compositional;
`GLADConfig.align`, off by default). Issue 16 asks for alignment switched on automatically, from training images
only. This study fits GLAD with its defaults twice per category (the splits and subsets of scripts/benchmark.py),
without alignment and with --model, and reports for each fit

  misregistration     the training images' mean 1 - NCC (normalised cross-correlation of grey levels) against
                      the reference, before (align none) or after alignment: how much alignment registers them
  val_auroc, val_pixel_auroc   synthetic-defect image / pixel AUROC on the held-out good images (cut-paste,
                      scratch, blob, one copy per image and kind: `glad_jax.validation.validate`, as `glad validate`)
  image_auroc, pixel_auroc, aupro   of the test split, to explain what a choice does (never used to choose)

and misregistration_ratio (after / before), the signal issue 16 names, and 'by_val': a label-free rule, the same
for every category, that aligns where the synthetic image AUROC is higher with alignment. The summary gives the mean
test image AUROC of never aligning, always aligning and of the rule's picks. --quick: tiny subsets, K = 16, 128 px
(a smoke test). With --out DIR the table goes to DIR/study_align.md and the numbers to DIR/study_align.json.
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
  p.add_argument("--model", default="euclidean", help="motion model of the aligned fit (GLADConfig.align)")
  return p


def misregistration(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """1 - NCC of each image's grey levels (N, H, W, C) with the reference's (H, W, C): 0 when an image equals the
  reference up to brightness and contrast, 1 for uncorrelated images."""
  def standardised(x):
    g = np.asarray(x, np.float64).mean(axis=-1).reshape(len(x), -1)
    g = g - g.mean(axis=1, keepdims=True)
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

  return 1.0 - (standardised(images) @ standardised(reference[None])[0])


def study_category(data, config, extractor, *, model: str, seed: int, batch_size: int) -> list[dict[str, Any]]:
  """Two rows (align 'none' and `model`) for one category (`benchmark.CategoryData`)."""
  from glad_jax import validation
  from glad_jax.evaluation import load_records, metrics_of
  from glad_jax.model import GLAD, align_images

  size = config.image_size
  train, held, test = (load_records(r, size) for r in (data.train, data.held, data.test))
  reference, others = train.images[0], train.images[1:]
  rows = []
  for align in ("none", model):
    moved = others if align == "none" else align_images(others, reference, align, batch_size=batch_size)[0]
    t0 = time.perf_counter()
    glad = GLAD(config.replace(align=align), extractor=extractor).fit(train.images, batch_size=batch_size)
    fit_s = time.perf_counter() - t0
    synthetic = validation.validate(glad, held.images, seed=seed, batch_size=batch_size)["overall"]
    tested = glad.score(test.images, batch_size=batch_size)
    rows.append({
        "category": data.name, "align": align, "misregistration": float(np.mean(misregistration(moved, reference))),
        "fit_s": fit_s, "radius": "/".join(f"{info.radius:g}" for info in glad.fit_info.values()),
        "val_auroc": synthetic["image_auroc"], "val_pixel_auroc": synthetic["pixel_auroc"],
        **{k: v for k, v in metrics_of(test, tested.image_scores, tested.anomaly_maps).items()
           if k in ("image_auroc", "pixel_auroc", "aupro")}})
  none, aligned = rows
  ratio = aligned["misregistration"] / max(none["misregistration"], 1e-12)
  for r in rows:
    r["misregistration_ratio"] = ratio
    on = r is aligned
    r["by_val"] = on == (aligned["val_auroc"] > none["val_auroc"])
  return rows


def summary(rows: Sequence[dict[str, Any]], model: str) -> dict[str, float]:
  """Mean test image AUROC over the categories of never / always aligning and of the by_val rule's picks."""
  def mean_of(pick):
    return float(np.mean([r["image_auroc"] for r in rows if pick(r)]))

  return {"none": mean_of(lambda r: r["align"] == "none"), model: mean_of(lambda r: r["align"] == model),
          "by_val": mean_of(lambda r: r["by_val"])}


def run(args) -> tuple[str, dict[str, Any]]:
  from glad_jax.align import MODELS
  from glad_jax.report import markdown_table

  if args.model not in MODELS:
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {args.model!r}")
  config, splits, extractor = benchmark.study_setup(args, "study_align")
  rows = []
  for data in splits:
    rows += study_category(data, config, extractor, model=args.model, seed=args.seed, batch_size=args.batch_size)
  means = summary(rows, args.model)
  report = "\n".join([
      "# Alignment on/off: synthetic defects and misregistration", "",
      f"GLAD defaults (K = {config.n_components}, {config.image_size} px), fitted without alignment and with "
      f"align={args.model!r} (reference: the first training image); misregistration: mean 1 - NCC of the "
      f"training images with the reference; by_val: aligned where the synthetic image AUROC is higher. Mean test "
      f"image AUROC: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + ".", "",
      markdown_table(rows)]) + "\n"
  return report, {"rows": rows, "summary": means, "settings": vars(args)}


def main(argv: Sequence[str] | None = None) -> int:
  return benchmark.study_main("study_align", build_parser(), run, argv)


if __name__ == "__main__":
  sys.exit(main())
