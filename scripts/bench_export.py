"""Exported scorer vs in-process model (issue 19): ms per image of the same fitted model scored three ways, side by
side in one run, and how far their outputs are apart.

    python scripts/bench_export.py                                   # tire, reduced fit settings (printed)
    python scripts/bench_export.py ../shared/data/magnetic_tile --align none --n-test 32

The three ways: `GLAD.score` (in-process, jitted, batch `--batch-size`), `glad_jax.export.load_exported` (the
exported StableHLO module called through glad_jax's wrapper) and `scripts/run_exported.py`'s `load_scorer` (the
jax + numpy loader README "Deploying" quotes). Each is compiled first (one untimed call), then timed over the same
`--n-test` test images, best of `--repeats`. The fit uses reduced settings by default (K = 100, 20,000 vectors per
layer) because only the scoring is timed: the scorer's cost depends on the number of live components and the
sparsity of the local weights, both printed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from glad_jax import export as export_lib  # noqa: E402
from glad_jax.config import GLADConfig  # noqa: E402
from glad_jax.data import mvtec  # noqa: E402
from glad_jax.model import GLAD, prepare_images  # noqa: E402
from run_exported import load_scorer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def best_seconds(fn, repeats: int) -> float:
  fn()  # compile (and warm up) outside the timing
  best = float("inf")
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("data", nargs="?", default=str(SHARED / "mvtec3d_tire_rgb"), help="MVTec-layout category")
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--max-samples", type=int, default=20000)
  p.add_argument("--n-train", type=int, default=60, help="seeded subset of the training images")
  p.add_argument("--n-test", type=int, default=32, help="seeded subset of the test images that get timed")
  p.add_argument("--align", default="none", help="alignment of the fitted model (none, euclidean, ...)")
  p.add_argument("--batch-size", type=int, default=8, help="in-process batch size = exported chunk")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)

  rng = np.random.default_rng(0)
  category = mvtec.read_category(args.data, require_masks=False)

  def subset(records, n):
    records = list(records)
    return records if n >= len(records) else [records[i] for i in np.sort(rng.choice(len(records), n, False))]

  config = GLADConfig(n_components=args.k, max_samples=args.max_samples, align=args.align)
  size = (config.image_size, config.image_size)
  train = mvtec.load_split(subset(category.train, args.n_train), size).images
  test = prepare_images(mvtec.load_split(subset(category.test, args.n_test), size).images, config.image_size)
  print(f"{category.name}: fit on {len(train)} images (K={args.k}, max_samples={args.max_samples}, "
        f"align={args.align}), {len(test)} test images timed, batch/chunk {args.batch_size}", flush=True)
  model = GLAD(config).fit(train[: len(train) * 4 // 5]).calibrate(train[len(train) * 4 // 5:], fpr=0.05)
  live = {name: int(layer.n_components) for name, layer in model.layer_models().items()}
  print(f"fitted: live components per layer {live}", flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    path = export_lib.save_exported(model, pathlib.Path(tmp) / "model.gladx", ("cpu",), chunk=args.batch_size)
    size_mb = path.stat().st_size / 2**20
    scorer = export_lib.load_exported(path)
    _, loader_score = load_scorer(path)
    ref = model.score(test, batch_size=args.batch_size)
    got = scorer(test)
    loaded = loader_score(test)
    rows = [
        ("in-process GLAD.score", best_seconds(lambda: model.score(test, batch_size=args.batch_size),
                                               args.repeats)),
        ("exported (glad_jax.export.load_exported)", best_seconds(lambda: scorer(test), args.repeats)),
        ("exported (scripts/run_exported.py loader)", best_seconds(lambda: loader_score(test), args.repeats)),
    ]
  base = rows[0][1]
  print(f"\nexported file: {size_mb:.1f} MiB")
  print("| scorer | ms per image | vs in-process |\n|---|---|---|")
  for name, seconds in rows:
    print(f"| {name} | {1000 * seconds / len(test):.1f} | {seconds / base:.2f}x |")

  def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b) / np.maximum(np.abs(b), 1e-6)))

  print(f"\nmax relative difference to in-process: image scores {rel(got.image_scores, ref.image_scores):.2e} "
        f"(loader {rel(loaded['image_scores'], ref.image_scores):.2e}), anomaly maps "
        f"{rel(got.anomaly_maps, ref.anomaly_maps):.2e}; same decisions: "
        f"{bool(np.array_equal(got.image_labels, ref.image_labels))}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
