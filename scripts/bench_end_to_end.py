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
   per layer, image and pixel AUROC;
6. with `--cpu-agreement N`: the fitted GLAD model scores the same N test images on the default device (the
   accelerator) and on the CPU backend of the same process (`jax.devices('cpu')`): the max relative difference
   of the image scores end to end (backbone included, so the backbone's default precision on the accelerator,
   TF32 or bfloat16, shows) and from the same features (the mixture scoring alone, which asks for HIGHEST).

`--batches 1,16,64` times inference at other batch sizes (default 1,16) and also prints images/s; `--synthetic`
uses seeded striped textures with dark square defects instead of `--data` (timing without any dataset: a device
machine that only gets the checkout); `--json PATH` writes the figures (setup, fit seconds, images/s per batch,
peak device memory, agreement) as JSON, rewritten after each stage so that a run stopped by a timeout keeps what
it measured.

Timings are the best of several calls (the machine may be shared); memory is the process's resident set
size (RSS) sampled every 2 ms plus the kernel's exact lifetime peak (see glad_jax.profiling).

Usage:
  python scripts/bench_end_to_end.py --quick                   # ~1 min on 2 CPU cores
  python scripts/bench_end_to_end.py                           # tire, EfficientNet-Lite0, K=1000 (paper)
  python scripts/bench_end_to_end.py --max-samples-sweep 50000,200000,0   # 0 = no cap
  python scripts/bench_end_to_end.py --backbone wide_resnet50_2_aa --weights random --backbone-dtype bfloat16
  # the accelerator check (scripts/device_check.sh): no dataset, GLAD only, GPU vs CPU scores
  python scripts/bench_end_to_end.py --synthetic --max-train 200 --max-test 32 --methods glad \
      --backbone wide_resnet50_2_aa --weights random --batches 1,16,64 --cpu-agreement 16 --json bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from glad_jax import distributed, metrics, methods as glad_methods, profiling, scoring
from glad_jax.baselines import get_baseline, model_size_bytes
from glad_jax.baselines.padim import PadimConfig
from glad_jax.baselines.patchcore import PatchcoreConfig
from glad_jax.config import GLADConfig
from glad_jax.data import mvtec
from glad_jax.model import GLAD

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire_rgb"
MB = profiling.MB
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 200, 32


@dataclasses.dataclass
class Row:
  """One method's line of the side-by-side table."""

  method: str
  fit_s: float
  model_s: float
  ms: dict[int, float]     # inference ms per image at each batch size
  bb_ms: dict[int, float]  # backbone alone, timed in the same rounds as `ms`
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
  p.add_argument("--batches", default="1,16", help="comma-separated inference batch sizes to time")
  p.add_argument("--image-size", type=int, default=GLADConfig.image_size, help="images are resized to this")
  p.add_argument("--layers", default=",".join(GLADConfig.layers),
                 help="comma-separated backbone layers GLAD models (one mixture each)")
  p.add_argument("--synthetic", action="store_true",
                 help="seeded synthetic textures instead of --data (--max-train / --max-test images, "
                      f"default {SYNTHETIC_TRAIN} / {SYNTHETIC_TEST})")
  p.add_argument("--cpu-agreement", type=int, default=0, metavar="N",
                 help="score N test images with the fitted GLAD on the default device and on the CPU backend")
  p.add_argument("--json", default=None, help="write the figures to this JSON file (after each stage)")
  p.add_argument("--quick", action="store_true",
                 help="small run (~1 min on 2 CPU cores): 20 train / 16 test images, K=32, 5 iterations")
  args = p.parse_args(argv)
  if args.quick:
    args.max_train = args.max_train or 20
    args.max_test = args.max_test or 16
    args.k = min(args.k, 32)
    args.max_iter = min(args.max_iter, 5)
    args.repeats = min(args.repeats, 3)
  try:
    args.batches = tuple(sorted({int(b) for b in args.batches.split(",") if b.strip()}))
  except ValueError:
    p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
  if not args.batches or min(args.batches) < 1:
    p.error(f"--batches needs batch sizes >= 1, got {args.batches!r}")
  if args.synthetic:
    args.max_train = args.max_train or SYNTHETIC_TRAIN
    args.max_test = args.max_test or SYNTHETIC_TEST
    if args.max_test < 2:
      p.error("--synthetic needs --max-test >= 2 (good and anomalous test images)")
  args.layers = tuple(v.strip() for v in args.layers.split(",") if v.strip())
  if args.cpu_agreement < 0:
    p.error(f"--cpu-agreement must be >= 0, got {args.cpu_agreement}")
  return args


# ------------------------------------------------------------------------------------------- data


def _spread(records: list, n: int | None) -> list:
  """At most n records, evenly spaced over the list (the test split is sorted by defect type, so both labels
  and every defect type stay represented)."""
  if n is None or n >= len(records):
    return list(records)
  idx = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
  return [records[i] for i in idx]


def synthetic_split(n: int, size: int, n_bad: int, seed: int, split: str) -> mvtec.ImageBatch:
  """n seeded striped textures (uint8 RGB, size x size), the last n_bad with a dark square defect.

  The same family as the tests' tiny category, vectorised and scaled with the image size (4 stripe periods
  across): enough structure for the backbone and the mixtures to do real work, so that the timings are those of
  a real category of that size, without any file (the accelerator machine only gets the checkout).
  """
  rng = np.random.default_rng(seed)
  xx = np.arange(size, dtype=np.float32)
  phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
  base = 128 + 60 * np.sin(2 * np.pi * xx[None, None, :] / (size / 4) + phase)   # (n, 1, size)
  noise = rng.standard_normal((n, size, size, 3), dtype=np.float32) * 6
  images = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
  masks = np.zeros((n, size, size), bool)
  s = max(2, size // 5)
  for i in range(n - n_bad, n):
    y, x = rng.integers(s, size - 2 * s, size=2)
    images[i, y:y + s, x:x + s] = 10
    masks[i, y:y + s, x:x + s] = True
  labels = (np.arange(n) >= n - n_bad).astype(np.int32)
  defects = tuple("square" if label else "good" for label in labels)
  paths = tuple(pathlib.Path(f"synthetic/{split}/{d}/{i:03d}.png") for i, d in enumerate(defects))
  return mvtec.ImageBatch(images, masks, np.ones(n, bool), labels, defects, paths)


def load_data(args: argparse.Namespace, size: int) -> tuple[mvtec.ImageBatch, mvtec.ImageBatch]:
  if args.synthetic:
    return (synthetic_split(args.max_train, size, 0, seed=0, split="train"),
            synthetic_split(args.max_test, size, args.max_test // 2, seed=1, split="test"))
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


def inference_ms(fn: Callable, images: np.ndarray, repeats: int, backbone: Callable | None = None,
                 batches: tuple[int, ...] = (1, 16)) -> tuple[dict[int, float], ...]:
  """Best ms per image of fn at each batch size (compilation excluded); with `backbone`, also the backbone's,
  timed in alternation with fn (one call of each per round): ({batch: fn ms}[, {batch: backbone ms}])."""
  fns = [fn] if backbone is None else [fn, backbone]
  best = {}
  for b in batches:
    x = batch_of(images, b)
    times = [[] for _ in fns]
    for f in fns:  # warm-up: compilation
      jax.block_until_ready(f(x))
    for _ in range(repeats):
      for i, f in enumerate(fns):
        times[i].append(profiling.time_call(f, x, repeats=1, warmup=0).best)
    for i in range(len(fns)):
      best[i, b] = 1000.0 * min(times[i]) / b
  return tuple({b: best[i, b] for b in batches} for i in range(len(fns)))


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


def _finite(x: Any) -> Any:
  """JSON-safe: NaN and infinities become None (JSON has no such numbers)."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


class Figures(dict):
  """The run's figures; with a path, rewritten (atomically) after each stage so that a run stopped by a
  timeout still leaves what it measured for the caller (scripts/device_check.sh)."""

  def __init__(self, path: str | None):
    super().__init__(complete=False)
    self.path = None if path is None else pathlib.Path(path)

  def dump(self) -> None:
    if self.path is None:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(dict(self)), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, self.path)

  def stage(self, name: str, values: dict) -> None:
    self[name] = values
    self.dump()


def _per_second(ms: dict[int, float]) -> dict[int, float]:
  return {b: 1000.0 / v for b, v in ms.items()}


# ------------------------------------------------------------------------------------------ methods


def run_glad(config: GLADConfig, extractor, train_feats, features_s: float, test: mvtec.ImageBatch,
             args: argparse.Namespace, backbone: Callable) -> tuple[Row, GLAD]:
  model = GLAD(config, extractor=extractor)
  with profiling.PeakMemory() as fit_mem:
    model.fit_features(train_feats)
  fn = model.score_fn()
  ms, bb_ms = inference_ms(fn, test.images, args.repeats, backbone, args.batches)
  with profiling.PeakMemory() as inf_mem:
    scores, maps = score_in_batches(fn, test.images)
  img, px = auroc_pair(test, scores, maps)
  row = Row("GLAD", features_s + fit_mem.report.seconds, fit_mem.report.seconds, ms, bb_ms,
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
  missing = sorted(set(config.layers) - set(train_feats))
  if missing:
    raise SystemExit(f"{name} needs the backbone layers {list(config.layers)}: add {missing} to --layers")
  feats = {k: train_feats[k] for k in config.layers}
  with profiling.PeakMemory() as fit_mem:
    state = jax.block_until_ready(method.fit(feats, config, jax.random.key(0)))
  size = extractor.image_size

  @jax.jit
  def fused(params, state, images):  # the same fused shape as GLAD.score_fn: uint8 -> scores, maps
    return method.score(state, extractor.apply(params, images), out_size=size)

  fn = lambda images: fused(extractor.params, state, images)  # noqa: E731
  ms, bb_ms = inference_ms(fn, test.images, args.repeats, backbone, args.batches)
  with profiling.PeakMemory() as inf_mem:
    scores, maps = score_in_batches(fn, test.images)
  img, px = auroc_pair(test, scores, maps)
  label = {"padim": "PaDiM", "patchcore": "PatchCore"}[name]
  return Row(label, features_s + fit_mem.report.seconds, fit_mem.report.seconds, ms, bb_ms,
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


def _rel_diff(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
  """max |a - ref| / |ref| elementwise (image scores are log-likelihood quantiles, far from 0), the max absolute
  difference, and the max difference relative to the largest |ref| (for maps, whose values cross 0)."""
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  diff = np.abs(a - ref)
  tiny = np.finfo(np.float64).tiny
  return {"max_rel": float(np.max(diff / np.maximum(np.abs(ref), tiny))), "max_abs": float(np.max(diff)),
          "max_rel_to_range": float(np.max(diff) / max(float(np.max(np.abs(ref))), tiny))}


def cpu_agreement(model: GLAD, images: np.ndarray, n: int) -> dict[str, Any]:
  """The same fitted model scores the same n images on the default device and on the CPU backend.

  The same function of (params, state, images) as `GLAD.score_fn`, compiled for each backend, on bit-identical
  weights and model: on the default device through `score_fn` itself (with n equal to a timed batch size its
  compilation is reused), on the CPU with every input committed to the CPU. Two comparisons, because they answer
  different questions:

  * end to end (uint8 images -> image scores): what a user sees; includes the backbone, which runs at the
    backend's default precision (TF32 convolutions on recent NVIDIA GPUs, or bfloat16 by choice);
  * from the same features (the default device's backbone output, copied to the CPU): the mixture scoring
    alone, whose products all ask for HIGHEST, so it should match to float32 round-off.
  """
  cpu = jax.devices("cpu")[0]
  dev = jax.devices()[0]
  x = images[np.arange(n) % images.shape[0]]
  ext = model.extractor
  layer_models = model.layer_models()
  size = (model.config.image_size,) * 2
  q = float(model.config.quantile)
  # Every array is an argument (none closed over): each call then runs wholly where its inputs are committed.
  from_features = jax.jit(lambda lm, f, mask: scoring.score_unchecked(lm, f, mask, q, size).image_score)
  out: dict[str, Any] = {"images": int(n), "device": f"{dev.platform} ({dev.device_kind})",
                         "reference": f"{cpu.platform} ({cpu.device_kind})", "same_backend": dev == cpu}
  scores, maps, seconds = {}, {}, {}

  t0 = time.perf_counter()
  xd = jax.device_put(x, dev)
  s, m = jax.block_until_ready(model.score_fn()(xd))
  scores["device"], maps["device"] = np.asarray(s), np.asarray(m)
  feats = {k: np.asarray(v) for k, v in ext.apply(ext.params, xd).items() if k in layer_models}
  lm, fi, mask = jax.device_put((layer_models, feats, model.mask), dev)
  scores["device_from_features"] = np.asarray(from_features(lm, fi, mask))
  seconds["device"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  fused = jax.jit(glad_methods.images_fn(glad_methods.get_method("glad"), ext.apply))
  # Scoring does not read the update statistics (K x d x d scatter matrices per layer: GBs at K = 1000,
  # d = 1024): leave them out of the copy.
  params, state, xc = jax.device_put((ext.params, model.state.replace(update_stats=None), x), cpu)
  m, s = jax.block_until_ready(fused(params, state, xc))
  scores["cpu"], maps["cpu"] = np.asarray(s), np.asarray(m)
  lm, fi, mask = jax.device_put((layer_models, feats, model.mask), cpu)
  scores["cpu_from_features"] = np.asarray(from_features(lm, fi, mask))
  seconds["cpu"] = time.perf_counter() - t0

  out["end_to_end"] = _rel_diff(scores["device"], scores["cpu"])
  out["maps_end_to_end"] = _rel_diff(maps["device"], maps["cpu"])
  out["from_features"] = _rel_diff(scores["device_from_features"], scores["cpu_from_features"])
  out["seconds"] = seconds  # compilation included: one call each
  out["scores_device"] = scores["device"].tolist()
  out["scores_cpu"] = scores["cpu"].tolist()
  return out


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.stdout.reconfigure(line_buffering=True)  # long runs: show each line as it comes
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bad = sorted(set(methods) - {"glad", "padim", "patchcore"})
  if bad:
    raise SystemExit(f"unknown method(s) {bad}; choose among glad, padim, patchcore")
  if args.cpu_agreement and "glad" not in methods:
    raise SystemExit("--cpu-agreement scores the fitted GLAD model: add glad to --methods")
  figures = Figures(args.json)
  try:
    run(args, methods, figures)
  except BaseException as e:  # noqa: BLE001  (recorded, then raised again: the exit status says it failed)
    figures["error"] = f"{type(e).__name__}: {e}"
    figures.dump()
    raise
  figures["complete"] = True
  figures.dump()
  return 0


def run(args: argparse.Namespace, methods: list[str], figures: Figures) -> None:
  config = GLADConfig(backbone=args.backbone, weights=args.weights, n_components=args.k, max_iter=args.max_iter,
                      max_samples=args.max_samples, backbone_dtype=args.backbone_dtype,
                      image_size=args.image_size, layers=args.layers)
  t_load = time.perf_counter()
  train, test = load_data(args, config.image_size)
  t_load = time.perf_counter() - t_load
  extractor = GLAD(config).extractor
  dev = jax.devices()[0]
  grids = {k: tuple(int(v) for v in shape) for k, shape in extractor.feature_shapes().items()
           if k in config.layers}
  need = distributed.estimate_fit_bytes(len(train), grids, config.n_components)
  figures.stage("setup", {
      "device": f"{dev.platform} ({dev.device_kind})", "platform": dev.platform, "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "jax": jax.__version__,
      "data": "synthetic" if args.synthetic else str(args.data), "train_images": len(train),
      "test_images": len(test), "image_size": config.image_size, "backbone": config.backbone,
      "backbone_dtype": config.backbone_dtype, "weights": config.weights or "packaged", "layers": grids,
      "k": config.n_components, "max_iter": config.max_iter, "max_samples": config.max_samples,
      "batches": list(args.batches), "repeats": args.repeats, "estimated_fit_bytes_per_device": need})
  print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); jax {jax.__version__}")
  print(f"data: {'synthetic textures' if args.synthetic else args.data}: {len(train)} train / {len(test)} test images "
        f"({int(test.labels.sum())} anomalous), decoded to {config.image_size}x{config.image_size} in {t_load:.1f} s")
  print(f"backbone: {config.backbone} ({config.backbone_dtype}, weights {config.weights or 'packaged'}), "
        f"layers {dict(extractor.feature_shapes())}")
  print(f"load average at start: {_load()} (the machine may be shared: timings are best-of-{args.repeats})")
  print(f"GLAD: K={config.n_components}, max_iter={config.max_iter}, max_samples={config.max_samples}, "
        f"radius={config.radius}, quantile={config.quantile}")
  print(f"estimated fit memory (features + widest mixture, float32): {need / 2**30:.2f} GiB on one device")

  # Backbone only: the floor of any pipeline built on it.
  bb = lambda images: extractor.apply(extractor.params, images)  # noqa: E731
  (bb_ms,) = inference_ms(bb, test.images, args.repeats, batches=args.batches)
  with profiling.PeakMemory() as feat_mem:
    train_feats = extractor(train.images, batch_size=16)
  features_s = feat_mem.report.seconds
  print("\nbackbone only: " + ", ".join(f"{v:.1f} ms/image at batch {b}" for b, v in bb_ms.items())
        + " (" + ", ".join(f"{1000.0 / v:.1f}" for v in bb_ms.values()) + " images/s)")
  print(f"training features: {features_s:.1f} s for {len(train)} images, peak host RSS "
        f"+{feat_mem.report.host_increase / MB:.0f} MB (total {feat_mem.report.host_peak / MB:.0f} MB), "
        f"{sum(v.nbytes for v in train_feats.values()) / MB:.0f} MB of features")
  figures.stage("backbone", {"ms_per_image": bb_ms, "images_per_s": _per_second(bb_ms),
                             "features_s": features_s, "features_device_peak_bytes": feat_mem.report.device_peak})

  rows = []
  if "glad" in methods:
    row, model = run_glad(config, extractor, train_feats, features_s, test, args, bb)
    rows.append(row)
    figures.stage("glad", {
        "fit_s": row.fit_s, "model_fit_s": row.model_s, "features_s": features_s,
        "ms_per_image": row.ms, "images_per_s": _per_second(row.ms), "backbone_ms_per_image": row.bb_ms,
        "device_peak_bytes": row.device_bytes, "model_bytes": row.model_bytes, "image_auroc": row.image_auroc,
        "pixel_auroc": row.pixel_auroc,
        "layers": {name: {"n_samples": info.n_samples, "n_samples_global": info.n_samples_global,
                          "dim": info.dim, "n_iter": info.n_iter, "k_end": info.n_components,
                          "global_s": info.seconds_global, "local_s": info.seconds_local,
                          "mean_nnz": info.mean_nnz} for name, info in model.fit_info.items()}})
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
    profile = scoring_profile(model, test_feats, args.repeats)
    for name, ms in profile.items():
      print(f"  {name:32s} {ms:8.2f}")
    figures["glad"]["scoring_profile_ms_per_image"] = profile
    figures.dump()
    if args.cpu_agreement:
      agree = cpu_agreement(model, test.images, args.cpu_agreement)
      figures.stage("cpu_agreement", agree)
      print(f"\nGPU/CPU agreement of the image scores ({agree['images']} test images, {agree['device']} vs "
            f"{agree['reference']}):")
      for key, what in (("end_to_end", "end to end (backbone + scoring)"),
                        ("from_features", "from the same features (scoring)")):
        d = agree[key]
        print(f"  {what:34s} max rel {d['max_rel']:.3g}, max abs {d['max_abs']:.3g}")
      d = agree["maps_end_to_end"]
      print(f"  {'anomaly maps, end to end':34s} max abs {d['max_abs']:.3g} "
            f"({d['max_rel_to_range']:.3g} of the largest |value|)")
    del model
  for name in ("padim", "patchcore"):
    if name in methods:
      rows.append(run_baseline(name, extractor, train_feats, features_s, test, args, bb))

  xbb_width = {b: max(5, len(str(b)) + 4) for b in args.batches}
  ms_head = " ".join(f"{f'b{b} ms':>7s}" for b in args.batches)
  xbb_head = " ".join(f"{f'xbb{b}':>{xbb_width[b]}s}" for b in args.batches)
  print(f"\n{'method':10s} {'fit s':>7s} {'model s':>8s} {ms_head} {xbb_head} "
        f"{'fit MB':>7s} {'inf MB':>7s} {'dev MB':>7s} {'model MB':>9s} {'img AUROC':>10s} {'px AUROC':>9s}")
  print(f"{'backbone':10s} {features_s:7.1f} {'':>8s} " + " ".join(f"{bb_ms[b]:7.1f}" for b in args.batches) + " "
        + " ".join(f"{1.0:{xbb_width[b]}.2f}" for b in args.batches))
  for r in rows:
    dev_mb = None if r.device_bytes is None else r.device_bytes / MB
    print(f"{r.method:10s} {r.fit_s:7.1f} {r.model_s:8.1f} " + " ".join(f"{r.ms[b]:7.1f}" for b in args.batches)
          + " " + " ".join(f"{r.ms[b] / r.bb_ms[b]:{xbb_width[b]}.2f}" for b in args.batches)
          + f" {r.fit_bytes / MB:7.0f} {r.infer_bytes / MB:7.0f} {_fmt(dev_mb, '7.0f'):>7s} "
          f"{r.model_bytes / MB:9.2f} {r.image_auroc:10.4f} {_fmt(r.pixel_auroc, '9.4f'):>9s}")
  print("images/s (uint8 images -> scores and maps): " + "; ".join(
      f"{r.method} " + ", ".join(f"{1000.0 / r.ms[b]:.1f} at batch {b}" for b in args.batches) for r in rows))
  lifetime_peak = profiling.device_peak_bytes()
  print(f"peak host RSS of the whole run: {profiling.host_peak_rss_bytes() / MB:.0f} MB; peak device memory "
        f"{_fmt(None if lifetime_peak is None else lifetime_peak / MB, '.0f')} MB; load average now {_load()}")
  figures.stage("memory", {"host_peak_rss_bytes": profiling.host_peak_rss_bytes(),
                           "device_peak_bytes": lifetime_peak})
  figures["methods"] = {r.method: {"fit_s": r.fit_s, "model_s": r.model_s, "ms_per_image": r.ms,
                                   "images_per_s": _per_second(r.ms), "device_peak_bytes": r.device_bytes,
                                   "model_bytes": r.model_bytes, "image_auroc": r.image_auroc,
                                   "pixel_auroc": r.pixel_auroc} for r in rows}
  figures.dump()

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


if __name__ == "__main__":
  sys.exit(main())
