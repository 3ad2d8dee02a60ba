"""One table: GLAD and the baselines on the five development categories (and any MVTec-layout folder).

  python scripts/benchmark.py [EXTRA_CATEGORY ...] [--dev all|none|NAME,...] [--methods glad,padim,...]
      [--max-train 300] [--coreset-ratio R] [--validate] [--quick] [--out DIR] [more: --help]

Runs GLAD with its defaults (`GLADConfig()`: K = 1000, layers 1-3 of EfficientNet-Lite0, 256 px, no alignment,
no mask) and PaDiM, PatchCore and MahaAD with their papers' defaults on the SAME backbone features
(`glad_jax.robustness.protocols.run_standard`: one shared extractor, every method fitted through the registry)
over the development categories

  mvtec3d_tire_rgb, magnetic_tile, mpdd_metal_plate, casting   (MVTec layout, from --data-root, default
                                                                ../shared/data; casting has image labels only)
  elpv                                                         (the packaged elpv solar cells, mono; split of
                                                                glad_jax/data/elpv.py; image labels only)

plus every MVTec-layout category folder given on the command line, each with its own test split (all of it;
--max-test takes a seeded subset). It prints one Markdown table, a row per (category, method):

  image_auroc, pixel_auroc, aupro   test split (pixel metrics only where the category has masks)
  fit_s                             fit on precomputed features (backbone excluded; includes JIT compilation
                                    and, with --align auto, GLAD's probe fits)
  align                             with --align auto: the motion model GLAD chose
  ms_per_image                      backbone + scorer per test image (one jitted function, compile excluded)
  val_auroc, val_pixel_auroc        with --validate: synthetic-defect image / pixel AUROC on the held-out good
                                    images (glad_jax.validation: cut-paste, scratch, blob; seed --seed), a
                                    number computed WITHOUT any test label, to choose settings by

then one 'mean' row per method (pixel metrics averaged over the categories that have masks). With --out DIR,
the table goes to DIR/benchmark.md and every number with the settings to DIR/benchmark.json. Progress on stderr.

Documented subsets (seeded by --seed, the same rule for every category and method):
* held-out good images: validation/good when the category has it (tire), otherwise a seeded 10% of
  train/good (at least one image), removed from training for every method whether or not --validate is
  given, so that the table does not change with the flag. They are used by --validate only.
* training: the remaining train/good images, capped by a seeded random subset of --max-train (default 300;
  magnetic_tile 685 -> 300, elpv mono 397 -> 300; tire 210, mpdd 49, casting 270 are used whole).
* PatchCore's memory bank keeps --coreset-ratio of the training patches (default 0.1, the paper's). With
  300 training images the greedy selection over ~300,000 patches dominates the whole benchmark on a CPU;
  --coreset-ratio 0.01 (the paper's other setting, its Table 5 row "1%") is the documented way to lower it,
  and applies to every category alike.

--quick: a smoke test (8 training, 8 test, 4 held-out images per category, K = 16, 128 px, 5,000 vectors per
layer for GLAD's global fit). The full run takes about an hour on a 2-core CPU: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

DEV_CATEGORIES = ("mvtec3d_tire_rgb", "magnetic_tile", "mpdd_metal_plate", "casting", "elpv")
METHODS = ("glad", "padim", "patchcore", "mahaad")
MAX_TRAIN = 300
HOLDOUT = 0.1  # fraction of train/good held out when a category has no validation/good
QUICK = {"max_train": 8, "max_test": 8, "max_held": 4, "k": 16, "image_size": 128, "max_samples": 5000}
DATA_ROOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN_KEYS = ("image_auroc", "pixel_auroc", "aupro", "fit_s", "ms_per_image", "val_auroc", "val_pixel_auroc")


def _names(text: str) -> list[str]:
  return [v.strip() for v in text.split(",") if v.strip()]


def _max_samples(text: str):
  from glad_jax.config import parse_max_samples

  try:
    value = parse_max_samples(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return "all" if value is None else value  # not None: that means "not given"


def build_parser() -> argparse.ArgumentParser:
  from glad_jax.config import GLADConfig

  d = GLADConfig()
  p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("extra", nargs="*", help="more MVTec-layout category folders")
  p.add_argument("--dev", default="all",
                 help="development categories to run: 'all' (default), 'none', or a comma-separated subset of "
                      + ",".join(DEV_CATEGORIES))
  p.add_argument("--data-root", default=str(DATA_ROOT),
                 help="folder holding the MVTec-layout development categories (default %(default)s)")
  p.add_argument("--methods", type=_names, default=list(METHODS),
                 help="comma-separated methods (default %(default)s)")
  p.add_argument("--max-train", type=int, default=None,
                 help=f"seeded subset cap on training images per category (default {MAX_TRAIN})")
  p.add_argument("--max-test", type=int, default=None,
                 help="seeded subset of test images, good/anomalous proportions kept (default: all)")
  p.add_argument("--max-held", type=int, default=None, help="cap on held-out good images for --validate")
  p.add_argument("--coreset-ratio", type=float, default=None,
                 help="PatchCore memory-bank fraction, every category alike (default: the paper's 0.1)")
  p.add_argument("--validate", action="store_true",
                 help="add the synthetic-defect validation AUROC of every fitted model (no test label used)")
  p.add_argument("--quick", action="store_true", help="tiny subsets, K=16, 128 px: a smoke test")
  p.add_argument("--k", type=int, default=None, help=f"GLAD's initial K (default {d.n_components})")
  p.add_argument("--max-samples", type=_max_samples, default=None,
                 help="GLAD's global-fit vectors per layer: N, 'all' or 'auto' (default: GLAD's own, "
                      f"{d.max_samples:,} with its max_sample_work cap)")
  p.add_argument("--backbone", default=d.backbone)
  p.add_argument("--align", default=d.align,
                 help="GLAD's align (default %(default)s; 'auto': chosen per category from its training images)")
  p.add_argument("--weights", default=None)
  p.add_argument("--image-size", type=int, default=None, help=f"default {d.image_size}")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="folder for benchmark.md and benchmark.json")
  p.add_argument("--quiet", action="store_true", help="no progress on stderr")
  return p


def settings(args) -> dict[str, Any]:
  """The effective settings: --quick's values where an option was not given, else the defaults."""
  from glad_jax.config import GLADConfig

  d = GLADConfig()
  base = {"max_train": MAX_TRAIN, "max_test": None, "max_held": None, "k": d.n_components,
          "image_size": d.image_size, "max_samples": d.max_samples}
  if args.quick:
    base.update(QUICK)
  out = {}
  for key, default in base.items():
    given = getattr(args, key)
    out[key] = default if given is None else given
  if out["max_samples"] == "all":
    out["max_samples"] = None
  out["coreset_ratio"] = args.coreset_ratio
  return out


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class CategoryData:
  """The records of one category after the documented subsets.

  Attributes:
    name: category name.
    train: training records (good).
    held: held-out good records (for --validate; never used for training).
    held_split: where they come from ('validation/good' or 'train/good holdout').
    test: test records (good and anomalous, with labels).
  """

  name: str
  train: tuple
  held: tuple
  held_split: str
  test: tuple


def _subset(records: Sequence, n: int | None, rng: np.random.Generator) -> list:
  if n is None or n >= len(records):
    return list(records)
  if n < 1:
    raise ValueError(f"subset sizes must be >= 1, got {n}")
  keep = np.sort(rng.choice(len(records), size=n, replace=False))
  return [records[i] for i in keep]


def _subset_test(records: Sequence, n: int | None, rng: np.random.Generator) -> list:
  """A seeded subset of n test records with the good/anomalous proportions (at least one of each)."""
  if n is None or n >= len(records):
    return list(records)
  good = [r for r in records if r.label == 0]
  bad = [r for r in records if r.label == 1]
  n_good = min(len(good), max(1, round(n * len(good) / len(records))))
  n_bad = min(len(bad), max(1, n - n_good))
  return _subset(good, n_good, rng) + _subset(bad, n_bad, rng)


def read_category(spec: str, data_root: pathlib.Path, seed: int):
  """The `Category` of a development name ('elpv' or a folder under data_root) or of a folder path."""
  from glad_jax.data import elpv, mvtec

  if spec == "elpv":
    return elpv.elpv_category("mono", seed=seed)
  path = data_root / spec if spec in DEV_CATEGORIES else pathlib.Path(spec)
  if spec in DEV_CATEGORIES and not path.is_dir():
    raise ValueError(f"development category {spec!r} not found at {path} (set --data-root, or leave it out "
                     f"with --dev)")
  return mvtec.read_category(path, require_masks=False)


def split_category(category, *, seed: int, max_train: int | None, max_test: int | None,
                   max_held: int | None) -> CategoryData:
  """Held-out good, training and test records by the module docstring's rule.

  Seeds: np.random.default_rng([seed, 0]) picks the holdout, [seed, 1] the training cap, [seed, 2] the test
  subset, [seed, 3] the held-out cap; each is independent of the others' sizes.
  """
  if not category.test:
    raise ValueError(f"{category.root} has no test split (test/<defect>/...) to benchmark on")
  train = list(category.train)
  if category.validation:
    held, held_split = [r for r in category.validation if r.label == 0], "validation/good"
  else:
    rng = np.random.default_rng([seed, 0])
    n_held = max(1, int(round(HOLDOUT * len(train))))
    if len(train) - n_held < 2:
      raise ValueError(f"{category.root}: {len(train)} training images are too few to hold some out")
    idx = set(rng.choice(len(train), n_held, replace=False).tolist())
    held = [r for i, r in enumerate(train) if i in idx]
    train = [r for i, r in enumerate(train) if i not in idx]
    held_split = "train/good holdout"
  train = _subset(train, max_train, np.random.default_rng([seed, 1]))
  test = _subset_test(list(category.test), max_test, np.random.default_rng([seed, 2]))
  held = _subset(held, max_held, np.random.default_rng([seed, 3]))
  return CategoryData(category.name, tuple(train), tuple(held), held_split, tuple(test))


# ------------------------------------------------------------------------------------------- methods


def make_methods(args, config):
  """The registry variants on `config`'s backbone, PatchCore's coreset ratio replaced when given."""
  from glad_jax.robustness import protocols as P

  variants = []
  for v in P.select_methods(config, args.methods):
    if v.method == "patchcore" and args.coreset_ratio is not None:
      v = dataclasses.replace(v, config=dataclasses.replace(v.config, coreset_ratio=args.coreset_ratio))
    variants.append(v)
  return tuple(variants)


def validation_columns(fitted, held_images: np.ndarray, extractor, *, seed: int, batch_size: int) -> dict:
  """val_auroc / val_pixel_auroc of one fitted method on the held-out good images (label-free)."""
  from glad_jax import validation
  from glad_jax.robustness import protocols as P

  images = held_images
  if fitted.variant.align != "none":  # protocol states score aligned images: align them on the reference
    images = P.featurize(extractor, held_images, align=fitted.variant.align, reference=fitted.state.reference,
                         with_features=False).images
  res = validation.validate(fitted, images, seed=seed, batch_size=batch_size)
  return {"val_auroc": res["overall"]["image_auroc"], "val_pixel_auroc": res["overall"]["pixel_auroc"]}


def run_category(data: CategoryData, methods, extractor, args, progress) -> list[dict[str, Any]]:
  """Fits and tests every method on one category; the rows of the table."""
  from glad_jax.evaluation import load_records
  from glad_jax.robustness import protocols as P

  size = extractor.image_size
  bars = None if progress is None else progress.bars
  train = load_records(data.train, size, progress=bars)
  test = load_records(data.test, size, progress=bars)
  result = P.run_standard(methods, train.images, test, extractor=extractor, batch_size=args.batch_size,
                          seed=args.seed, keep_fitted=args.validate, progress=progress)
  held = load_records(data.held, size, progress=bars) if args.validate else None
  rows = []
  for r in result.rows:
    row = {"category": data.name, "method": r["method"], "n_train": r["n_train"], "n_test": r["n_test"]}
    if "error" in r:
      rows.append({**row, "error": r["error"]})
      continue
    row.update(image_auroc=r["image_auroc"], pixel_auroc=r.get("pixel_auroc"), aupro=r.get("aupro"),
               fit_s=r["fit_s"], ms_per_image=r["inference_ms"])
    if r.get("align") is not None:  # GLAD with align='auto' (--align auto): what it chose
      row["align"] = r["align"]
    if args.validate:
      row["n_held"] = len(data.held)
      row.update(validation_columns(result.details["fitted"][r["method"]], held.images, extractor,
                                    seed=args.seed, batch_size=args.batch_size))
    rows.append(row)
  return rows


def mean_rows(rows: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
  """One 'mean' row per method: the unweighted mean over categories of each metric it has."""
  out = []
  for m in methods:
    mine = [r for r in rows if r["method"] == m and "error" not in r]
    if not mine:
      continue
    row: dict[str, Any] = {"category": f"mean ({len(mine)})", "method": m}
    for key in MEAN_KEYS:
      vals = [r[key] for r in mine if r.get(key) is not None]
      if vals:
        row[key] = float(np.mean(vals))
    out.append(row)
  return out


class _Progress:
  """Protocol steps as one line each on stderr; the other stages through glad's progress reporter."""

  def __init__(self, quiet: bool):
    from glad_jax.progress import ProgressReporter

    self.quiet = quiet
    self.bars = ProgressReporter(not quiet, prefix="benchmark")

  def __call__(self, stage: str, info: dict) -> None:
    if self.quiet:
      return
    if stage == "protocol":
      self.bars.close()
      print(f"benchmark: {info['step']} {info['method']} ({info['done'] + 1}/{info['total']})", file=sys.stderr)
    else:
      self.bars(stage, info)


# ---------------------------------------------------------------------------------------------- main


def category_specs(args) -> list[str]:
  if args.dev == "all":
    dev = list(DEV_CATEGORIES)
  elif args.dev == "none":
    dev = []
  else:
    dev = _names(args.dev)
    unknown = [d for d in dev if d not in DEV_CATEGORIES]
    if unknown:
      raise ValueError(f"--dev: unknown development categories {unknown}; choose among "
                       f"{','.join(DEV_CATEGORIES)} (or all / none)")
  specs = dev + list(args.extra)
  if not specs:
    raise ValueError("no category to run (--dev none and no folder given)")
  return specs


def run(args) -> tuple[str, dict[str, Any]]:
  """Runs every category; returns (Markdown report, JSON-able dict)."""
  from glad_jax.config import GLADConfig
  from glad_jax.methods import glad as glad_method
  from glad_jax.report import markdown_table
  from glad_jax.robustness import protocols as P

  s = settings(args)
  specs = category_specs(args)
  if s["coreset_ratio"] is not None and not 0.0 < s["coreset_ratio"] <= 1.0:
    raise ValueError(f"--coreset-ratio must be in (0, 1], got {s['coreset_ratio']}")
  config = GLADConfig(backbone=args.backbone, weights=args.weights, image_size=s["image_size"],
                      n_components=s["k"], max_samples=s["max_samples"], align=args.align, seed=args.seed)
  glad_method.check_config(config)  # a bad --align fails here, not after the first categories' fits
  methods = make_methods(args, config)
  data_root = pathlib.Path(args.data_root)
  # Read and split every category first: a missing folder fails before an hour of fitting.
  splits = [split_category(read_category(spec, data_root, args.seed), seed=args.seed, max_train=s["max_train"],
                           max_test=s["max_test"], max_held=s["max_held"]) for spec in specs]
  extractor = P.make_extractor(config, methods)
  progress = _Progress(args.quiet)
  rows, per_category = [], {}
  t0 = time.perf_counter()
  for data in splits:
    if not args.quiet:
      print(f"benchmark: {data.name}: {len(data.train)} training, {len(data.test)} test, {len(data.held)} "
            f"held-out good images ({data.held_split})", file=sys.stderr)
    t1 = time.perf_counter()
    rows += run_category(data, methods, extractor, args, progress)
    per_category[data.name] = {"n_train": len(data.train), "n_test": len(data.test), "n_held": len(data.held),
                               "held_split": data.held_split, "seconds": time.perf_counter() - t1}
    progress.bars.close()
  seconds = time.perf_counter() - t0
  table = rows + mean_rows(rows, [m.name for m in methods])
  patchcore = next((m.config for m in methods if m.method == "patchcore"), None)
  header = [
      f"Backbone {config.backbone} (weights: {config.weights or 'packaged default'}), layers "
      f"{'+'.join(config.layers)}, {config.image_size} px; GLAD K = {config.n_components}, max_samples "
      f"{config.max_samples or 'all'}, align {config.align}; training capped at {s['max_train']} images "
      f"(seeded); test "
      f"{'all' if s['max_test'] is None else s['max_test']}"
      + ("" if patchcore is None else f"; PatchCore coreset ratio {patchcore.coreset_ratio}")
      + f"; seed {args.seed}; {seconds:.0f} s" + (" (--quick)" if args.quick else "") + ".",
  ]
  if args.validate:
    header.append("val_*: synthetic defects (cut-paste, scratch, blob; 0.05-2% of the image) in the held-out "
                  "good images, one copy per image and kind; no test label used.")
  report = "\n".join(["# Benchmark", "", *header, "", markdown_table(table)]) + "\n"
  data = {"settings": {**s, "backbone": config.backbone, "weights": config.weights, "layers": list(config.layers),
                       "align": config.align,
                       "methods": [m.name for m in methods], "seed": args.seed, "quick": args.quick,
                       "validate": args.validate, "categories": specs,
                       "patchcore_coreset_ratio": None if patchcore is None else patchcore.coreset_ratio},
          "categories": per_category, "rows": rows, "mean": mean_rows(rows, [m.name for m in methods]),
          "seconds": seconds}
  return report, data


def add_study_arguments(p: argparse.ArgumentParser) -> None:
  """The options the study scripts (study_local_radius.py, study_score_rule.py) share with the benchmark."""
  p.add_argument("extra", nargs="*", help="more MVTec-layout category folders")
  p.add_argument("--dev", default="all", help="development categories: all, none or a comma-separated list")
  p.add_argument("--data-root", default=str(DATA_ROOT))
  p.add_argument("--max-train", type=int, default=MAX_TRAIN)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="tiny subsets, K=16, 128 px: a smoke test")
  p.add_argument("--out", default=None)


def study_setup(args, name: str):
  """(GLAD config, category splits, feature extractor) of a study script: GLAD's defaults (--quick: QUICK's K,
  size and samples), the benchmark's splits and subsets; prints one line per category to stderr."""
  from glad_jax.backbones.extractor import feature_extractor_from_config
  from glad_jax.config import GLADConfig

  quick = QUICK if args.quick else {}
  config = GLADConfig(seed=args.seed)
  if args.quick:
    config = config.replace(n_components=quick["k"], image_size=quick["image_size"],
                            max_samples=quick["max_samples"])
  splits = [split_category(read_category(s, pathlib.Path(args.data_root), args.seed), seed=args.seed,
                           max_train=quick.get("max_train", args.max_train), max_test=quick.get("max_test"),
                           max_held=quick.get("max_held"))
            for s in category_specs(args)]
  for data in splits:
    print(f"{name}: {data.name}: {len(data.train)} training, {len(data.held)} held-out good "
          f"({data.held_split}), {len(data.test)} test images", file=sys.stderr)
  return config, splits, feature_extractor_from_config(config)


def write_outputs(out: str | pathlib.Path, name: str, report: str, data: dict[str, Any]
                  ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes OUT/<name>.md (the printed report) and OUT/<name>.json (every number); returns both paths."""
  from glad_jax.report import write_json, write_text

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  md, js = out / f"{name}.md", out / f"{name}.json"
  write_text(md, report)
  write_json(js, data)
  return md, js


def study_main(name: str, parser: argparse.ArgumentParser, run: Callable[[Any], tuple[str, dict[str, Any]]],
               argv: Sequence[str] | None) -> int:
  """The command line of a study script: parse, `run(args) -> (report, data)`, print the report, write OUT/<name>.*
  with --out; a bad value or a missing folder (ValueError, OSError) is one line on stderr and exit status 2."""
  args = parser.parse_args(argv)
  try:
    report, data = run(args)
  except (ValueError, OSError) as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 2
  print(report, end="")
  if args.out:
    write_outputs(args.out, name, report, data)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report, data = run(args)
  except (ValueError, OSError) as e:  # DataError is a ValueError
    print(f"benchmark: error: {e}", file=sys.stderr)
    return 2
  print(report, end="")
  if args.out:
    md, js = write_outputs(args.out, "benchmark", report, data)
    print(f"benchmark: wrote {md} and {js}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
