"""End-to-end speed and memory of GLAD, PaDiM and PatchCore on one MVTec-layout category.

One run, one backbone, the same training features for the three methods. What it prints:

1. setup: device, backbone (dtype, weights), image size, number of train/test images, K, max_samples;
2. backbone only (the floor): ms per image of the jitted forward pass (uint8 images -> layers 1-3) at batch 1
   and batch 16, and the extraction of the training features (seconds, peak host memory);
3. GLAD fit profile, per layer: feature vectors (all / used by the global fit), d, grid, K-MLE iterations,
   K at the end, seconds of the global fit (K-MLE) and of the local weight fit, mean non-zero local weights per
   position; then the inference profile: ms per image of each layer's sparse log-likelihood and of the whole
   scoring (all layers, upsampling, quantile) on precomputed features, at batch 16;
4. the side-by-side table, one row per method:
     fit s        training seconds from uint8 images (feature extraction + the method's fit);
     model s      the method's fit alone (features given);
     b1 / b16     inference ms per image at batch 1 / 16: ONE jitted function from uint8 images to image
                  scores and anomaly maps (backbone + method), best of `--repeats` after a warm-up call;
     xbb1 / xbb16 those times divided by the backbone-only times measured in the same rounds (interleaved
                  calls, so that a change of machine load hits both alike; 1.00 = the pipeline costs no more
                  than the network forward pass);
     fit MB       peak host RSS during the method's fit (features given) above the RSS before it;
     inf MB       peak host RSS while scoring the test set (batch 16) above the RSS before it;
     dev MB       peak device memory during fit and inference (n/a on CPU, where it is in host RSS);
     model MB     bytes of the fitted model's arrays;
     img AUROC / px AUROC  on the (possibly subsampled) test split;
5. with `--max-samples-sweep 50000,200000,...`: GLAD refitted with each cap on the global fit's samples (the
   local weights always use every sample): seconds of the global fits, of the local fits and in all, K at the end
   per layer, image and pixel AUROC.

Timings are the best of several calls (the machine may be shared); memory is the process's resident set
size (RSS) sampled every 2 ms plus the kernel's exact lifetime peak (see glad_jax.profiling).

Usage:
  python scripts/bench_end_to_end.py --quick                   # ~1 min on 2 CPU cores
  python scripts/bench_end_to_end.py                           # tire, EfficientNet-Lite0, K=1000 (paper)
  python scripts/bench_end_to_end.py --max-samples-sweep 50000,200000,0   # 0 = no cap
  python scripts/bench_end_to_end.py --backbone wide_resnet50_2_aa --weights random --backbone-dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import metrics, profiling, scoring
from glad_jax.baselines import get_baseline, model_size_bytes
from glad_jax.baselines.padim import PadimConfig
from glad_jax.baselines.patchcore import PatchcoreConfig
from glad_jax.config import GLADConfig
from glad_jax.data import mvtec
from glad_jax.model import GLAD

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"
MB = profiling.MB


@dataclasses.dataclass
class Row:
  """One method's line of the side-by-side table."""

  method: str
  fit_s: float
  model_s: float
  b1_ms: float
  b16_ms: float
  bb1_ms: float  # backbone alone, timed in the same rounds as b1_ms / b16_ms
  bb16_ms: float
  fit_bytes: int
  infer_bytes: int
  device_bytes: int | None
  model_bytes: int
  image_auroc: float
  pixel_auroc: float | None


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(DEFAULT_DATA), help="MVTec-layout category (default: the shared tire)")
  p.add_argument("--backbone", default=GLADConfig.backbone)
  p.add_argument("--weights", default=None, help="checkpoint path, or 'random' (seeded) for timing only")
  p.add_argument("--backbone-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--k", type=int, default=1000, help="initial K of the global mixtures (paper: 1000)")
  p.add_argument("--max-iter", type=int, default=GLADConfig.max_iter, help="K-MLE iteration cap (paper: 100)")
  p.add_argument("--max-samples", type=int, default=None, help="cap on the global fit's samples per layer")
  p.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
  p.add_argument("--max-test", type=int, default=None, help="use at most this many test images (both labels kept)")
  p.add_argument("--max-samples-sweep", default=None,
                 help="comma-separated max_samples values to refit GLAD with (0 = no cap)")
  p.add_argument("--methods", default="glad,padim,patchcore", help="comma-separated subset of glad,padim,patchcore")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per inference measurement")
  p.add_argument("--quick", action="store_true",
                 help="small run (~1 min on 2 CPU cores): 20 train / 16 test images, K=32, 5 iterations")
  args = p.parse_args(argv)
  if args.quick:
    args.max_train = args.max_train or 20
    args.max_test = args.max_test or 16
    args.k = min(args.k, 32)
    args.max_iter = min(args.max_iter, 5)
    args.repeats = min(args.repeats, 3)
  return args


# ------------------------------------------------------------------------------------------- data


def _spread(records: list, n: int | None) -> list:
  """At most n records, evenly spaced over the list (the test split is sorted by defect type, so both labels
  and every defect type stay represented)."""
  if n is None or n >= len(records):
    return list(records)
  idx = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
  return [records[i] for i in idx]


def load_data(args: argparse.Namespace, size: int) -> tuple[mvtec.ImageBatch, mvtec.ImageBatch]:
  category = mvtec.read_category(args.data)
  train = _spread(list(category.train), args.max_train)
  test = _spread(list(category.test), args.max_test)
  labels = {r.label for r in test}
  if labels != {0, 1}:
    raise SystemExit(f"the test subset needs good and anomalous images, got labels {sorted(labels)}: "
                     "raise --max-test")
  return mvtec.load_split(train, size), mvtec.load_split(test, size)


# ------------------------------------------------------------------------------------------ helpers


def batch_of(images: np.ndarray, n: int) -> jax.Array:
  """n images on device (repeating the given ones when there are fewer)."""
  idx = np.arange(n) % images.shape[0]
  return jax.device_put(images[idx])


def score_in_batches(fn: Callable, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """fn(uint8 batch) -> (scores, maps) over a whole split, the last batch padded (one compilation)."""
  scores, maps = [], []
  n = images.shape[0]
  for start in range(0, n, batch):
    chunk = images[start:start + batch]
    m = chunk.shape[0]
    if m < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - m, axis=0)])
    s, a = fn(jax.device_put(chunk))
    scores.append(np.asarray(s)[:m])
    maps.append(np.asarray(a)[:m])
  return np.concatenate(scores), np.concatenate(maps)


def inference_ms(fn: Callable, images: np.ndarray, repeats: int,
                 backbone: Callable | None = None) -> tuple[float, ...]:
  """Best ms per image of fn at batch 1 and batch 16 (compilation excluded); with `backbone`, also the
  backbone's, timed in alternation with fn (one call of each per round): (fn b1, fn b16[, bb b1, bb b16])."""
  fns = [fn] if backbone is None else [fn, backbone]
  best = {}
  for b in (1, 16):
    x = batch_of(images, b)
    times = [[] for _ in fns]
    for f in fns:  # warm-up: compilation
      jax.block_until_ready(f(x))
    for _ in range(repeats):
      for i, f in enumerate(fns):
        times[i].append(profiling.time_call(f, x, repeats=1, warmup=0).best)
    for i in range(len(fns)):
      best[i, b] = 1000.0 * min(times[i]) / b
  return tuple(best[i, b] for i in range(len(fns)) for b in (1, 16))


def auroc_pair(test: mvtec.ImageBatch, scores: np.ndarray, maps: np.ndarray) -> tuple[float, float | None]:
  img = metrics.image_auroc(test.labels.astype(bool), scores)
  keep = test.has_mask
  px = None
  if np.any(test.masks[keep]):
    px = metrics.pixel_auroc(test.masks[keep], maps[keep])
  return float(img), None if px is None else float(px)


def _device_peak(*reports: profiling.MemoryReport) -> int | None:
  peaks = [r.device_peak for r in reports if r.device_peak is not None]
  return max(peaks) if peaks else None


def _load() -> str:
  try:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def _fmt(x: float | None, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------ methods


def run_glad(config: GLADConfig, extractor, train_feats, features_s: float, test: mvtec.ImageBatch,
             args: argparse.Namespace, backbone: Callable) -> tuple[Row, GLAD]:
  model = GLAD(config, extractor=extractor)
  with profiling.PeakMemory() as fit_mem:
    model.fit_features(train_feats)
  fn = model.score_fn()
  b1, b16, bb1, bb16 = inference_ms(fn, test.images, args.repeats, backbone)
  with profiling.PeakMemory() as inf_mem:
    scores, maps = score_in_batches(fn, test.images)
  img, px = auroc_pair(test, scores, maps)
  row = Row("GLAD", features_s + fit_mem.report.seconds, fit_mem.report.seconds, b1, b16, bb1, bb16,
            fit_mem.report.host_increase, inf_mem.report.host_increase,
            _device_peak(fit_mem.report, inf_mem.report), model.model_size_bytes(), img, px)
  return row, model


def run_baseline(name: str, extractor, train_feats, features_s: float, test: mvtec.ImageBatch,
                 args: argparse.Namespace, backbone: Callable) -> Row:
  method = get_baseline(name)
  if name == "padim":
    config = PadimConfig.for_backbone(args.backbone)
  else:
    config = PatchcoreConfig()
  feats = {k: train_feats[k] for k in config.layers}
  with profiling.PeakMemory() as fit_mem:
    state = jax.block_until_ready(method.fit(feats, config, jax.random.key(0)))
  size = extractor.image_size

  @jax.jit
  def fused(params, state, images):  # the same fused shape as GLAD.score_fn: uint8 -> scores, maps
    return method.score(state, extractor.apply(params, images), out_size=size)

  fn = lambda images: fused(extractor.params, state, images)  # noqa: E731
  b1, b16, bb1, bb16 = inference_ms(fn, test.images, args.repeats, backbone)
  with profiling.PeakMemory() as inf_mem:
    scores, maps = score_in_batches(fn, test.images)
  img, px = auroc_pair(test, scores, maps)
  label = {"padim": "PaDiM", "patchcore": "PatchCore"}[name]
  return Row(label, features_s + fit_mem.report.seconds, fit_mem.report.seconds, b1, b16, bb1, bb16,
             fit_mem.report.host_increase, inf_mem.report.host_increase,
             _device_peak(fit_mem.report, inf_mem.report), model_size_bytes(state), img, px)


def scoring_profile(model: GLAD, test_feats: dict, repeats: int) -> dict[str, float]:
  """ms per image (batch 16) of each layer's sparse log-likelihood and of the whole scoring, features given."""
  layer_models = model.layer_models()
  idx = np.arange(16) % next(iter(test_feats.values())).shape[0]
  feats = {k: jax.device_put(np.asarray(v)[idx]) for k, v in test_feats.items() if k in layer_models}
  out = {}
  for name, lm in layer_models.items():
    t = profiling.time_call(jax.jit(scoring.layer_log_likelihood), lm, feats[name], repeats=repeats)
    out[name] = 1000.0 * t.best / 16
  size = (model.config.image_size,) * 2
  mask = None if model.mask is None else jnp.asarray(model.mask)
  q = float(model.config.quantile)
  t = profiling.time_call(lambda f: scoring.score_unchecked(layer_models, f, mask, q, size), feats,
                          repeats=repeats)
  out["all layers + fusion + quantile"] = 1000.0 * t.best / 16
  return out


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.stdout.reconfigure(line_buffering=True)  # long runs: show each line as it comes
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bad = sorted(set(methods) - {"glad", "padim", "patchcore"})
  if bad:
    raise SystemExit(f"unknown method(s) {bad}; choose among glad, padim, patchcore")
  config = GLADConfig(backbone=args.backbone, weights=args.weights, n_components=args.k, max_iter=args.max_iter,
                      max_samples=args.max_samples, backbone_dtype=args.backbone_dtype)
  t_load = time.perf_counter()
  train, test = load_data(args, config.image_size)
  t_load = time.perf_counter() - t_load
  extractor = GLAD(config).extractor
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); jax {jax.__version__}")
  print(f"data: {args.data}: {len(train)} train / {len(test)} test images "
        f"({int(test.labels.sum())} anomalous), decoded to {config.image_size}x{config.image_size} in {t_load:.1f} s")
  print(f"backbone: {config.backbone} ({config.backbone_dtype}, weights {config.weights or 'packaged'}), "
        f"layers {dict(extractor.feature_shapes())}")
  print(f"load average at start: {_load()} (the machine may be shared: timings are best-of-{args.repeats})")
  print(f"GLAD: K={config.n_components}, max_iter={config.max_iter}, max_samples={config.max_samples}, "
        f"radius={config.radius}, quantile={config.quantile}")

  # Backbone only: the floor of any pipeline built on it.
  bb = lambda images: extractor.apply(extractor.params, images)  # noqa: E731
  bb1, bb16 = inference_ms(bb, test.images, args.repeats)
  with profiling.PeakMemory() as feat_mem:
    train_feats = extractor(train.images, batch_size=16)
  features_s = feat_mem.report.seconds
  print(f"\nbackbone only: {bb1:.1f} ms/image at batch 1, {bb16:.1f} ms/image at batch 16")
  print(f"training features: {features_s:.1f} s for {len(train)} images, peak host RSS "
        f"+{feat_mem.report.host_increase / MB:.0f} MB (total {feat_mem.report.host_peak / MB:.0f} MB), "
        f"{sum(v.nbytes for v in train_feats.values()) / MB:.0f} MB of features")

  rows = []
  if "glad" in methods:
    row, model = run_glad(config, extractor, train_feats, features_s, test, args, bb)
    rows.append(row)
    print("\nGLAD fit profile:")
    print(f"  {'layer':8s} {'samples':>9s} {'global':>9s} {'d':>4s} {'grid':>7s} {'iter':>5s} {'K end':>6s} "
          f"{'global s':>9s} {'local s':>8s} {'nnz/pos':>8s}")
    for name, info in model.fit_info.items():
      print(f"  {name:8s} {info.n_samples:9d} {info.n_samples_global:9d} {info.dim:4d} "
            f"{info.grid_shape[0]:3d}x{info.grid_shape[1]:<3d} {info.n_iter:5d} {info.n_components:6d} "
            f"{info.seconds_global:9.1f} {info.seconds_local:8.1f} {_fmt(info.mean_nnz, '8.1f')}")
    accounted = sum(i.seconds_global + i.seconds_local for i in model.fit_info.values())
    print(f"  features {features_s:.1f} s + global/local {accounted:.1f} s + rest (mask, conversions) "
          f"{row.model_s - accounted:.1f} s")
    test_feats = extractor(test.images[:16], batch_size=16)
    print("GLAD scoring profile (features given, batch 16, ms/image):")
    for name, ms in scoring_profile(model, test_feats, args.repeats).items():
      print(f"  {name:32s} {ms:8.2f}")
    del model
  for name in ("padim", "patchcore"):
    if name in methods:
      rows.append(run_baseline(name, extractor, train_feats, features_s, test, args, bb))

  print(f"\n{'method':10s} {'fit s':>7s} {'model s':>8s} {'b1 ms':>7s} {'b16 ms':>7s} {'xbb1':>5s} {'xbb16':>6s} "
        f"{'fit MB':>7s} {'inf MB':>7s} {'dev MB':>7s} {'model MB':>9s} {'img AUROC':>10s} {'px AUROC':>9s}")
  print(f"{'backbone':10s} {features_s:7.1f} {'':>8s} {bb1:7.1f} {bb16:7.1f} {1.0:5.2f} {1.0:6.2f}")
  for r in rows:
    dev_mb = None if r.device_bytes is None else r.device_bytes / MB
    print(f"{r.method:10s} {r.fit_s:7.1f} {r.model_s:8.1f} {r.b1_ms:7.1f} {r.b16_ms:7.1f} {r.b1_ms / r.bb1_ms:5.2f} "
          f"{r.b16_ms / r.bb16_ms:6.2f} {r.fit_bytes / MB:7.0f} {r.infer_bytes / MB:7.0f} {_fmt(dev_mb, '7.0f'):>7s} "
          f"{r.model_bytes / MB:9.2f} {r.image_auroc:10.4f} {_fmt(r.pixel_auroc, '9.4f'):>9s}")
  print(f"peak host RSS of the whole run: {profiling.host_peak_rss_bytes() / MB:.0f} MB; load average now {_load()}")

  if args.max_samples_sweep:
    values = [int(v) for v in args.max_samples_sweep.split(",") if v.strip()]
    test_all = extractor(test.images, batch_size=16)
    print("\nmax_samples sweep (GLAD; local weights always use every sample):")
    print(f"  {'max_samples':>11s} {'global s':>9s} {'local s':>8s} {'fit s':>7s} {'K end':>15s} {'img AUROC':>10s} "
          f"{'px AUROC':>9s}")
    for v in values:
      cfg = config.replace(max_samples=v or None)
      model = GLAD(cfg, extractor=extractor)
      t0 = time.perf_counter()
      model.fit_features(train_feats)
      fit_s = time.perf_counter() - t0
      pred = model.score_features(test_all)
      img, px = auroc_pair(test, pred.image_scores, pred.anomaly_maps)
      global_s = sum(i.seconds_global for i in model.fit_info.values())
      local_s = sum(i.seconds_local for i in model.fit_info.values())
      k_end = "/".join(str(i.n_components) for i in model.fit_info.values())
      print(f"  {v or 'all':>11} {global_s:9.1f} {local_s:8.1f} {fit_s:7.1f} {k_end:>15s} {img:10.4f} "
            f"{_fmt(px, '9.4f'):>9s}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
