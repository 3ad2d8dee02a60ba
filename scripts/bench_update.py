"""Online update vs refit (issue 18): image AUROC of a model fitted on half of a category's good images
and updated with the other half, against a model fitted on all of them; and the time of an update with
50 new images against a full refit.

    python scripts/bench_update.py                       # tire + magnetic_tile, reduced settings (printed)
    python scripts/bench_update.py --k 1000 --max-samples 50000 --mt-train 761 --mt-test 0

Reduced settings by default so that the whole script stays under ~10 minutes on a 2-core CPU: K = 100
initial Gaussians, at most 20,000 vectors per layer for the global fit, a seeded subset of magnetic_tile's
training and test images. The backbone features are computed once per image set and shared by every model.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from glad_jax import metrics  # noqa: E402
from glad_jax.config import GLADConfig  # noqa: E402
from glad_jax.data import mvtec  # noqa: E402
from glad_jax.model import GLAD  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _subset(records, n, rng):
  records = list(records)
  if not n or n >= len(records):
    return records
  idx = np.sort(rng.choice(len(records), n, replace=False))
  return [records[i] for i in idx]


def _take(features, idx):
  return {name: f[idx] for name, f in features.items()}


def _auroc(model, feats, labels):
  return float(metrics.image_auroc(labels, model.score_features(feats).image_scores))


BRIGHTNESS_SHIFT = 40  # grey levels added to every channel: a lighting change of the line


def _brighter(images):
  return np.clip(images.astype(np.int16) + BRIGHTNESS_SHIFT, 0, 255).astype(np.uint8)


def appearance_shift(full, category, test_batch, labels, train_images, new_idx, *, seed):
  """The line's lighting changes: good images get brighter. The model fitted on all training images,
  calibrated on the category's held-out good images (validation/good, else 20% of train/good), scores the
  brightened good test images before and after an update with `len(new_idx)` brightened training images;
  the anomalous test images (not brightened) must stay detected. Thresholds are kept by the update."""
  size = full.config.image_size
  records = list(category.validation) or list(category.train)[: max(1, len(category.train) // 5)]
  held_out = mvtec.load_split(records, (size, size)).images
  model = full.copy().calibrate(held_out, fpr=0.05)
  good = test_batch.images[~labels]
  bad = test_batch.images[labels]

  def stats(m):
    s_good = m.score(good).image_scores
    s_shift = m.score(_brighter(good)).image_scores
    s_bad = m.score(bad).image_scores
    t = m.image_threshold
    return {"median_good": float(np.median(s_good)), "median_shifted_good": float(np.median(s_shift)),
            "false_alarms_good": float(np.mean(s_good > t)), "false_alarms_shifted": float(np.mean(s_shift > t)),
            "detected_anomalous": float(np.mean(s_bad > t)),
            "auroc_good_vs_anomalous": float(metrics.image_auroc(
                np.r_[np.zeros(len(s_good)), np.ones(len(s_bad))], np.r_[s_good, s_bad]))}

  before = stats(model)
  t0 = time.perf_counter()
  model.update(_brighter(train_images[np.sort(new_idx)]))
  seconds = time.perf_counter() - t0
  return {"category": category.name, "brightness_shift": BRIGHTNESS_SHIFT, "n_update_images": int(len(new_idx)),
          "n_calibration_images": int(len(held_out)), "threshold": float(model.image_threshold),
          "update_s": round(seconds, 1), "before": before, "after": stats(model)}


def run_category(name, path, config, *, n_train, n_test, n_new, seed, timing):
  rng = np.random.default_rng(seed)
  category = mvtec.read_category(path, require_masks=False)
  train = _subset(category.train, n_train, rng)
  test = _subset(category.test, n_test, rng)
  size = config.image_size
  train_images = mvtec.load_split(train, (size, size)).images
  test_batch = mvtec.load_split(test, (size, size))
  labels = test_batch.labels.astype(bool)
  base = GLAD(config)
  t0 = time.perf_counter()
  feats = base.features(train_images)
  test_feats = base.features(test_batch.images)
  feat_s = time.perf_counter() - t0
  n = len(train)
  ext = base.extractor
  out = {"category": name, "n_train": n, "n_test": int(len(labels)), "n_anomalous": int(labels.sum()),
         "features_s": round(feat_s, 1)}

  t0 = time.perf_counter()
  full = GLAD(config, extractor=ext).fit_features(feats)
  out["fit_all_s"] = round(time.perf_counter() - t0, 1)
  out["auroc_all"] = _auroc(full, test_feats, labels)

  perm = rng.permutation(n)
  half_a, half_b = np.sort(perm[:n // 2]), np.sort(perm[n // 2:])
  t0 = time.perf_counter()
  half = GLAD(config, extractor=ext).fit_features(_take(feats, half_a))
  out["fit_half_s"] = round(time.perf_counter() - t0, 1)
  out["auroc_half"] = _auroc(half, test_feats, labels)
  t0 = time.perf_counter()
  half.update_features(_take(feats, half_b))
  out["update_half_s"] = round(time.perf_counter() - t0, 1)
  out["auroc_half_updated"] = _auroc(half, test_feats, labels)
  out["auroc_gap"] = out["auroc_all"] - out["auroc_half_updated"]
  out["k_all"] = {layer: int(lm.n_components) for layer, lm in full.state.layers.items()}
  out["k_updated"] = {layer: int(lm.n_components) for layer, lm in half.state.layers.items()}
  print(json.dumps(out), flush=True)

  if timing:
    # Update with n_new images vs a refit on all images (fit_all_s above, same settings).
    old, new = np.sort(perm[n_new:]), np.sort(perm[:n_new])
    t0 = time.perf_counter()
    base_model = GLAD(config, extractor=ext).fit_features(_take(feats, old))
    fit_old_s = time.perf_counter() - t0
    new_images = train_images[new]
    t0 = time.perf_counter()
    base_model.update(new_images)   # images in: includes the backbone on the 50 new images
    upd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_model.update_features(_take(feats, new))
    upd_feat_s = time.perf_counter() - t0
    timing_out = {"category": name, "n_old": int(len(old)), "n_new": int(n_new),
                  "fit_old_s": round(fit_old_s, 1), "update_images_s": round(upd_s, 1),
                  "update_features_s": round(upd_feat_s, 1), "refit_all_s": out["fit_all_s"],
                  "refit_all_with_features_s": round(out["fit_all_s"] + feat_s * n / (n + len(labels)), 1),
                  "speedup": round(out["fit_all_s"] / upd_feat_s, 1)}
    print(json.dumps(timing_out), flush=True)
    out["timing"] = timing_out
    out["shift"] = appearance_shift(full, category, test_batch, labels, train_images, perm[:n_new], seed=seed)
    print(json.dumps(out["shift"]), flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tire", default=str(SHARED / "mvtec3d_tire_rgb"))
  p.add_argument("--magnetic", default=str(SHARED / "magnetic_tile"))
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--max-samples", type=int, default=20000)
  p.add_argument("--mt-train", type=int, default=200, help="seeded subset of magnetic_tile's training images")
  p.add_argument("--mt-test", type=int, default=200, help="seeded subset of magnetic_tile's test images (0: all)")
  p.add_argument("--n-new", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/bench_update.json")
  args = p.parse_args(argv)
  config = GLADConfig(n_components=args.k, max_samples=args.max_samples, seed=args.seed)
  settings = {"backbone": config.backbone, "layers": list(config.layers), "k": args.k,
              "max_samples": args.max_samples, "radius": config.radius, "quantile": config.quantile,
              "mt_train": args.mt_train, "mt_test": args.mt_test, "n_new": args.n_new, "seed": args.seed,
              "update": "forgetting 1.0, 5 global K-MLE iterations, local max 10"}
  print("settings:", json.dumps(settings), flush=True)
  t0 = time.perf_counter()
  results = [run_category("mvtec3d_tire_rgb", args.tire, config, n_train=0, n_test=0, n_new=args.n_new,
                          seed=args.seed, timing=True),
             run_category("magnetic_tile", args.magnetic, config, n_train=args.mt_train, n_test=args.mt_test,
                          n_new=args.n_new, seed=args.seed, timing=False)]
  total = time.perf_counter() - t0
  print(f"total {total:.0f} s", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"settings": settings, "results": results, "total_s": total}, indent=2))
  print("| category | n_train | image AUROC all | half | half + update(other half) | gap |")
  print("|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['category']} | {r['n_train']} | {r['auroc_all']:.4f} | {r['auroc_half']:.4f} | "
          f"{r['auroc_half_updated']:.4f} | {r['auroc_gap']:+.4f} |")
  for r in results:
    if "timing" in r:
      t = r["timing"]
      print(f"\n{t['category']}: update with {t['n_new']} new images {t['update_features_s']} s from features "
            f"({t['update_images_s']} s from images) vs refit on all {t['refit_all_s']} s: {t['speedup']}x")
    if "shift" in r:
      sh = r["shift"]
      print(f"\n{sh['category']}: brightness +{sh['brightness_shift']}, update with {sh['n_update_images']} brightened "
            "training images (threshold kept)")
      print("| | median score good | median score brightened good | false alarms good | false alarms brightened "
            "| anomalies detected | AUROC good vs anomalous |\n|---|---|---|---|---|---|---|")
      for when in ("before", "after"):
        b = sh[when]
        print(f"| {when} update | {b['median_good']:.2f} | {b['median_shifted_good']:.2f} | {b['false_alarms_good']:.2f} "
              f"| {b['false_alarms_shifted']:.2f} | {b['detected_anomalous']:.2f} | {b['auroc_good_vs_anomalous']:.4f} |")


if __name__ == "__main__":
  main()
