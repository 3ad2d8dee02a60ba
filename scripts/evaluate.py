"""Fit GLAD on one or more categories, score their test splits, and write a per-category metrics table.

    python scripts/evaluate.py ../shared/data/mvtec3d_tire_rgb elpv --out reports/evaluate

DATA arguments are MVTec-layout category folders (MVTec AD or MVTec 3D-AD RGB layout), a folder holding several
categories, or `elpv` / `elpv:mono` / `elpv:poly` for the packaged elpv solar cells (split documented in
glad_jax/data/elpv.py). Prints, and writes to OUT/results.md and OUT/results.json, one row per category with image
AUROC, pixel AUROC and AUPRO (when the category has masks), fit seconds and inference milliseconds per image, the
number of Gaussians kept per layer and the model size, then the mean over categories.

Choosing K: `--k-candidates 100,300,1000` fits one model per K and keeps the one whose held-out good images
(validation/good, or else a seeded 10% of train/good taken out before fitting) have the highest mean log-likelihood.
Test images and labels are never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from glad_jax import evaluation, report
from glad_jax.config import GLADConfig
from glad_jax.data import elpv, mvtec
from glad_jax.model import GLAD


def categories_from(arg: str, seed: int, elpv_subset: dict) -> list[mvtec.Category]:
  if arg.startswith("elpv"):
    cell_type = arg.split(":", 1)[1] if ":" in arg else "mono"
    return [elpv.elpv_category(cell_type, seed=seed, **elpv_subset)]
  path = pathlib.Path(arg)
  if path.is_dir() and not (path / "train").is_dir():
    names = mvtec.list_categories(path)
    return [mvtec.read_category(path / n) for n in names]
  return [mvtec.read_category(path)]


def held_out_split(category: mvtec.Category, seed: int, fraction: float = 0.1):
  """(train records, held-out good records): validation/good when present, else a seeded part of train."""
  if category.validation:
    return list(category.train), list(category.validation)
  rng = np.random.default_rng(seed)
  n_hold = max(1, int(round(fraction * len(category.train))))
  held = set(rng.choice(len(category.train), n_hold, replace=False).tolist())
  return ([r for i, r in enumerate(category.train) if i not in held],
          [r for i, r in enumerate(category.train) if i in held])


def fit_with_k_selection(config: GLADConfig, train_images, held_images, candidates, log) -> tuple[GLAD, dict]:
  """Fits one model per candidate K; keeps the best mean held-out log-likelihood (no test data involved)."""
  if not candidates:
    return GLAD(config).fit(train_images), {}
  scores = {}
  best, best_ll = None, -np.inf
  for k in candidates:
    model = GLAD(config.replace(n_components=k)).fit(train_images)
    # The anomaly map is minus the fused log-likelihood (inside the mask): its mean, negated, is the mean
    # held-out log-likelihood per pixel.
    ll = -float(np.mean(model.score(held_images).anomaly_maps))
    scores[k] = ll
    log(f"  K={k}: held-out mean log-likelihood {ll:.3f}")
    if ll > best_ll:
      best, best_ll = model, ll
  return best, scores


def evaluate_category(category: mvtec.Category, config: GLADConfig, args, log) -> dict:
  train, held = held_out_split(category, config.seed)
  if args.max_train and len(train) > args.max_train:
    train = train[:args.max_train]
  log(f"{category.name}: {len(train)} training images, {len(held)} held-out good, {len(category.test)} test")
  train_batch = evaluation.load_records(train, config.image_size)
  held_batch = evaluation.load_records(held, config.image_size)
  t0 = time.perf_counter()
  model, k_scores = fit_with_k_selection(config, train_batch.images, held_batch.images, args.k_candidates, log)
  fit_seconds = time.perf_counter() - t0
  model.calibrate(held_batch.images, fpr=args.fpr)
  test_batch = evaluation.load_records(category.test, config.image_size)
  result, pred = evaluation.evaluate(model, test_batch, batch_size=args.batch_size)
  row = {"category": category.name, "n_train": len(train), **result, "fit_seconds": fit_seconds,
         "K_initial": model.config.n_components,
         "K_kept": "/".join(str(layer.model.n_components) for layer in model.layers.values()),
         "model_MB": model.model_size_bytes() / 2**20}
  if k_scores:
    row["K_heldout_loglik"] = {str(k): round(v, 4) for k, v in k_scores.items()}
  if args.out:
    report.write_report(pathlib.Path(args.out) / category.name, category.name, model, test_batch, row, pred)
  return row


def main(argv=None) -> int:
  d = GLADConfig()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("data", nargs="+", help="category folders, data-set folders, or elpv[:mono|:poly]")
  p.add_argument("--out", default="reports/evaluate")
  p.add_argument("--backbone", default=d.backbone)
  p.add_argument("--weights", default=None)
  p.add_argument("--k", type=int, default=d.n_components)
  p.add_argument("--k-candidates", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                 help="comma-separated K values chosen among on held-out good images")
  p.add_argument("--max-samples", type=int, default=None)
  p.add_argument("--max-iter", type=int, default=d.max_iter)
  p.add_argument("--align", default=d.align)
  p.add_argument("--mask", default=d.mask)
  p.add_argument("--global-only", action="store_true")
  p.add_argument("--algorithm", default=d.algorithm, choices=("kmle", "em"))
  p.add_argument("--no-oas", action="store_true")
  p.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
  p.add_argument("--elpv-max-train", type=int, default=None)
  p.add_argument("--elpv-max-test", type=int, default=None, help="per class (good / defective)")
  p.add_argument("--fpr", type=float, default=0.01)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  config = GLADConfig(backbone=args.backbone, weights=args.weights, n_components=args.k,
                      max_samples=args.max_samples, max_iter=args.max_iter, align=args.align, mask=args.mask,
                      local=not args.global_only, algorithm=args.algorithm, use_oas=not args.no_oas,
                      seed=args.seed)
  elpv_subset = dict(max_train=args.elpv_max_train, max_test_good=args.elpv_max_test,
                     max_test_anomalous=args.elpv_max_test)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  rows = []
  for arg in args.data:
    for category in categories_from(arg, args.seed, elpv_subset):
      rows.append(evaluate_category(category, config, args, log))
      log(report.markdown_table([{k: v for k, v in rows[-1].items() if k != "K_heldout_loglik"}]))
  keys = ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "inference_ms_per_image")
  mean = {"category": "mean"}
  for key in keys:
    vals = [r[key] for r in rows if key in r]
    if vals:
      mean[key] = float(np.mean(vals))
  table_rows = [{k: v for k, v in r.items() if k != "K_heldout_loglik"} for r in rows] + [mean]
  header = (f"GLAD, backbone {config.backbone}, K={config.n_components}"
            + (f" (chosen among {args.k_candidates} on held-out good images)" if args.k_candidates else "")
            + f", layers {','.join(config.layers)}, align {config.align}, mask {config.mask}"
            + (f", max_samples {config.max_samples}" if config.max_samples else ""))
  table = f"{header}\n\n{report.markdown_table(table_rows)}\n"
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_text(out / "results.md", table)
    report.write_text(out / "results.json", json.dumps({"config": vars(args) | {"k_candidates": args.k_candidates},
                                                        "rows": rows, "mean": mean}, indent=2, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
