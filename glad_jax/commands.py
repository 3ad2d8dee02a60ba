"""What each `glad` sub-command does: read data, call `GLAD`, write outputs. The CLI parses; this module acts.

Kept apart from cli.py so that `glad --help` imports nothing heavy, and so that tests can call the commands.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from glad_jax.config import GLADConfig


# ------------------------------------------------------------------------------------------ progress


# tqdm bars on a terminal, plain rate-limited lines in logs/CI/notebooks, nothing with --quiet: progress.py.
from glad_jax.progress import ProgressReporter as ProgressBars  # the name cmd_*, demo and compare use


def _say(msg: str) -> None:
  print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- data

# Library code lives in glad_jax.evaluation / glad_jax.report; the private aliases keep cmd_* bodies unchanged.
from glad_jax.evaluation import collect_image_paths, evaluate, load_records, read_training_data  # noqa: E402
from glad_jax.report import markdown_table, write_report  # noqa: E402
from glad_jax.report import write_json as _write_json  # noqa: E402
from glad_jax.report import write_rows as _write_rows  # noqa: E402


# ------------------------------------------------------------------------------------------ commands


def cmd_fit(args: argparse.Namespace, config: GLADConfig) -> int:
  """`glad fit DATA --out CKPT`: on this process alone, or as one process of a multi-process fit."""
  from glad_jax import distributed

  # Checked and started before any other JAX work: the runtime cannot start once a backend has.
  options = distributed.resolve_options(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                        getattr(args, "process_id", None), getattr(args, "local_devices", None))
  if options is not None:
    distributed.initialize(*options)
    if options.num_processes > 1:
      return _fit_distributed(args, config)
  from glad_jax.model import GLAD

  bars = ProgressBars(not args.quiet)
  category, train, calib = read_training_data(args.data, holdout=args.holdout, seed=config.seed)
  _say(f"glad: fitting on {len(train)} images of {category.root} "
       f"({len(calib)} held out for thresholds)")
  batch = load_records(train, config.image_size, on_corrupt=args.on_corrupt, progress=bars)
  t0 = time.perf_counter()
  model = GLAD(config).fit(batch.images, progress=bars, source_shape=common_file_shape(batch.paths))
  fit_seconds = time.perf_counter() - t0
  if calib:
    cal = load_records(calib, config.image_size, on_corrupt=args.on_corrupt, progress=bars)
    model.calibrate(cal.images, fpr=args.fpr)
  bars.close()
  out = model.save(args.out)
  _report_fit(model, config)
  thr = "" if model.image_threshold is None else f"; image threshold {model.image_threshold:.4g} at FPR {args.fpr}"
  print(f"saved {out} (fit {fit_seconds:.1f} s{thr})")
  return 0


def _fit_distributed(args: argparse.Namespace, config: GLADConfig) -> int:
  """One process of a multi-process `glad fit` (the runtime is started).

  Every process lists the same sorted training and held-out images and takes its block of each
  (`distributed.process_shard`), fits with the others (`GLAD.fit` over the global mesh) and calibrates
  on the scores of all processes' held-out blocks; process 0 writes the checkpoint and reports.
  """
  from glad_jax import distributed
  from glad_jax.model import GLAD

  info = distributed.process_info()
  lead = distributed.is_coordinator()
  who = f"process {info.process_id}/{info.num_processes}"
  bars = ProgressBars(not args.quiet and lead)
  category, train, calib = read_training_data(args.data, holdout=args.holdout, seed=config.seed)
  mine, mine_calib = distributed.process_shard(train), distributed.process_shard(calib)
  if lead:
    _say(f"glad: fitting on {len(train)} images of {category.root} ({len(calib)} held out for thresholds) "
         f"over {info.num_processes} processes, {info.device_count} devices")
  if not args.quiet:
    _say(f"glad: {who}: {len(mine)} training and {len(mine_calib)} held-out images, "
         f"{info.local_device_count} devices")
  size = config.image_size

  def load(records):
    """This process's images (none for an empty block), every process told if one failed."""
    error, images, paths = None, np.zeros((0, size, size, 3), np.uint8), ()
    try:
      if records:
        batch = load_records(records, size, on_corrupt=args.on_corrupt, progress=bars)
        images, paths = batch.images, batch.paths
    except (ValueError, OSError) as e:
      error = e
    distributed.check_all(error, "reading its images")
    return images, paths

  images, paths = load(mine)
  t0 = time.perf_counter()
  model = GLAD(config).fit(images, progress=bars, distributed=True,
                           source_shape=common_file_shape(paths) if len(paths) else None)
  fit_seconds = time.perf_counter() - t0
  if calib:
    model.calibrate(load(mine_calib)[0], fpr=args.fpr, distributed=True)
  bars.close()
  out = model.save(args.out)
  if not lead:
    if not args.quiet:
      _say(f"glad: {who}: done (the checkpoint {out} was written by process 0)")
    return 0
  _report_fit(model, config)
  thr = "" if model.image_threshold is None else f"; image threshold {model.image_threshold:.4g} at FPR {args.fpr}"
  print(f"saved {out} (fit {fit_seconds:.1f} s over {info.num_processes} processes{thr})")
  return 0


def _report_fit(model, config: GLADConfig) -> None:
  """One line per fitted layer (stderr), and the alignment align='auto' chose."""
  if model.align_choice is not None:
    _say(f"  alignment: {model.align_choice.describe()}")
  for name, info in model.fit_info.items():
    nnz = "" if info.mean_nnz is None else f", {info.mean_nnz:.1f} non-zero weights/position"
    nnz += "" if info.radius is None else f" at r = {info.radius:g}"
    _say(f"  {name}: d={info.dim}, grid {info.grid_shape[0]}x{info.grid_shape[1]}, K {config.n_components} -> "
         f"{info.n_components} in {info.n_iter} iterations{nnz}; global fit on {info.n_samples_global} of "
         f"{info.n_samples} vectors ({info.global_reason})")


def cmd_score(args: argparse.Namespace) -> int:
  """Scores image files and folders (recursively) with a checkpoint or a file written by `glad export`.

  Writes OUT/scores.json (per image: raw and normalised score, decision, regions), OUT/scores.csv, OUT/regions.csv
  (one line per connected anomalous region: bounding box, area, peak score) and heat-map PNGs.
  """
  from glad_jax import export as export_lib
  from glad_jax import plots, regions
  from glad_jax.data import images as images_io
  from glad_jax.data import mvtec

  if export_lib.is_exported_file(args.checkpoint):
    scorer = export_lib.load_exported(args.checkpoint)
    size, thresholds = scorer.image_size, (scorer.image_threshold, scorer.pixel_threshold, scorer.good_score_median)
    score = scorer.score
  else:
    from glad_jax.model import GLAD

    model = GLAD.load(args.checkpoint)
    size = model.config.image_size
    thresholds = (model.image_threshold, model.pixel_threshold, getattr(model, "good_score_median", None))
    score = model.score
  image_threshold, pixel_threshold, median = thresholds

  # Folders are scored recursively (e.g. category/test/<defect>/...); each image is named by its path relative to
  # the folder given, a file given by itself by its name.
  names: dict[pathlib.Path, str] = {}
  for item in args.images:
    p = pathlib.Path(item)
    if p.is_dir():
      found = sorted((f for f in p.rglob("*") if images_io.is_image_file(f)
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                     key=lambda f: f.relative_to(p).parts)
      if not found:
        exts = ", ".join(e.lstrip(".") for e in images_io.IMAGE_EXTENSIONS)
        raise images_io.DataError(f"no image in {p} or its subfolders (looked for files ending in {exts}, any case)")
      names.update((f, f.relative_to(p).as_posix()) for f in found if f not in names)
    else:
      names.update((f, f.name) for f in collect_image_paths([item]) if f not in names)
  records = [mvtec.ImageRecord(p, 0, "unknown", None) for p in names]
  bars = ProgressBars(not args.quiet)
  batch = load_records(records, size, on_corrupt=args.on_corrupt, progress=bars)
  pred = score(batch.images, batch_size=args.batch_size, progress=bars)
  bars.close()
  rows = regions.decision_rows([names[p] for p in batch.paths], pred.image_scores, pred.anomaly_maps,
                               image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                               good_score_median=median, extra=[{"path": str(p)} for p in batch.paths])
  out = pathlib.Path(args.out)
  regions.write_decisions(out, rows)
  if not args.no_heatmaps:
    vmin, vmax = np.percentile(pred.anomaly_maps, [1, 99.9])
    for i, row in enumerate(rows):
      stem = pathlib.PurePosixPath(row["image"]).with_suffix("").as_posix().replace("/", "__")
      plots.heatmap_panel(batch.images[i], pred.anomaly_maps[i], out / "heatmaps" / f"{i:04d}_{stem}.png",
                          title=f"{row['image']}: score {row['score']:.3f}",
                          pixel_threshold=pixel_threshold, vmin=vmin, vmax=vmax)
  for row in rows:
    norm = "" if row["normalised_score"] is None else f"  {row['normalised_score']:.3f}"
    verdict = "" if row["anomalous"] is None else ("  ANOMALOUS" if row["anomalous"] else "  normal   ")
    found = "" if not row["regions"] else f" ({row['n_regions']} region{'s' * (row['n_regions'] > 1)})"
    print(f"{row['score']:10.4f}{norm}{verdict}  {row['image']}{found}")
  if image_threshold is None:
    _say("glad: note: this model has no calibrated thresholds, so no decisions and no regions "
         "(fit it with held-out good images: validation/good or --holdout)")
  elif median is None:
    _say("glad: note: no normalised scores: this model was calibrated before they existed (re-calibrate it)")
  _say(f"glad: wrote {out / 'scores.csv'}, {out / 'scores.json'} and {out / 'regions.csv'}"
       + ("" if args.no_heatmaps else f" and {len(rows)} heat maps in {out / 'heatmaps'}"))
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  from glad_jax.data import mvtec
  from glad_jax.model import GLAD

  model = GLAD.load(args.checkpoint)
  category = mvtec.read_category(args.data)
  if not category.test:
    raise ValueError(f"{args.data} has no test split (test/<defect>/...) to evaluate on")
  bars = ProgressBars(not args.quiet)
  batch = load_records(category.test, model.config.image_size, progress=bars)
  result, pred = evaluate(model, batch, batch_size=args.batch_size, progress=bars)
  bars.close()
  print(markdown_table([{"category": category.name, **result}]))
  if args.out:
    write_report(pathlib.Path(args.out), category.name, model, batch, result, pred)
    _say(f"glad: report written to {args.out}")
  return 0


def cmd_info(args: argparse.Namespace) -> int:
  from glad_jax.model import GLAD

  model = GLAD.load(args.checkpoint)
  print(f"checkpoint {args.checkpoint}")
  for k, v in vars(model.config).items():
    print(f"  {k}: {v}")
  if model.align_choice is not None:
    print(f"  alignment: {model.align_choice.describe()}")
  for name, layer in model.layers.items():
    info = model.fit_info.get(name)
    extra = "" if info is None else (f", global fit on {info.n_samples_global} of {info.n_samples} vectors "
                                     f"({info.global_reason})")
    local = "global only" if layer.local is None else f"{layer.local.n_tiles} local tiles"
    if layer.local is not None and layer.model.radius is not None:
      local += f" at r = {layer.model.radius:g}"
      choice = None if info is None else info.radius_choice
      if choice and choice.get("held_out_log_likelihood"):
        local += (" (chosen by held-out log-likelihood " + ", ".join(
            f"{r:g}: {v:.4f}" for r, v in zip(choice["radii"], choice["held_out_log_likelihood"])) + ")")
    print(f"  {name}: K={layer.model.n_components}, d={layer.model.dim}, {local}{extra}")
  print(f"  thresholds: image {model.image_threshold}, pixel {model.pixel_threshold}")
  print(f"  size: {model.model_size_bytes() / 2**20:.2f} MiB")
  _print_update_info(model)
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  from glad_jax import demo

  quick = args.quick or os.environ.get("GLAD_DEMO_QUICK", "") not in ("", "0")
  result = demo.run_demo(pathlib.Path(args.out), pathlib.Path(args.checkpoint), quick=quick,
                         progress=ProgressBars(not args.quiet))
  print(markdown_table([result]))
  _say(f"glad: report written to {args.out}")
  return 0


def cmd_export(args: argparse.Namespace) -> int:
  """Serializes a checkpoint's fused scorer (jax.export, symbolic batch) with its thresholds to one file."""
  from glad_jax import export as export_lib
  from glad_jax.model import GLAD

  platforms = export_lib.check_platforms(args.platforms)
  model = GLAD.load(args.checkpoint)
  if model.image_threshold is None:
    _say("glad: note: this model has no calibrated thresholds: the exported scorer gives scores and maps, "
         "no decisions")
  t0 = time.perf_counter()
  path = export_lib.save_exported(model, args.out, platforms, chunk=args.chunk)
  print(f"exported {path} ({path.stat().st_size / 2**20:.2f} MiB; platforms {','.join(platforms)}; "
        f"uint8 (b, {model.config.image_size}, {model.config.image_size}, 3) with symbolic b; "
        f"{time.perf_counter() - t0:.1f} s)")
  return 0


def cmd_validate(args: argparse.Namespace) -> int:
  """Synthetic-defect AUROC and clean false-positive rates on a category's held-out good images."""
  from glad_jax import synthetic, validation
  from glad_jax.data import mvtec
  from glad_jax.model import GLAD

  kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
  unknown = [k for k in kinds if k not in synthetic.KINDS]
  if unknown or not kinds:
    raise ValueError(f"--kinds: unknown defect kind(s) {unknown or args.kinds!r}; choose among "
                     f"{','.join(synthetic.KINDS)}")
  config = synthetic.DefectConfig(area=_area_arg(args.area))
  synthetic.check_config(config)
  if args.n_per_image < 1:
    raise ValueError(f"--n-per-image must be >= 1, got {args.n_per_image}")
  category = mvtec.read_category(args.data, require_masks=False)
  records, split = validation.held_out_good(category)
  model = GLAD.load(args.checkpoint)
  bars = ProgressBars(not args.quiet)
  batch = load_records(records, model.config.image_size, progress=bars)
  _say(f"glad: validating on {len(batch.labels)} held-out good images ({split} of {category.root}) and "
       f"{args.n_per_image} defective cop{'y' if args.n_per_image == 1 else 'ies'} of each per kind")
  result = validation.validate(model, batch.images, seed=args.seed, kinds=kinds, n_per_image=args.n_per_image,
                               config=config, batch_size=args.batch_size, progress=bars)
  bars.close()
  result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": split, **result}
  print(markdown_table(validation.result_rows(result)))
  print(validation.threshold_summary(result))
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "validate.json", result)
    _say(f"glad: wrote {out / 'validate.json'}")
  return 0


def _area_arg(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"--area must be two comma-separated fractions LOW,HIGH of the image area "
                     f"(e.g. 0.0005,0.02), got {text!r}") from None
  return lo, hi


# ------------------------------------------------------------------------------------------- update


def _file_shape(path: pathlib.Path) -> tuple[int, int, int]:
  """(height, width, channels) of an image file, from its header."""
  from PIL import Image

  from glad_jax.data import images as images_io

  try:
    with Image.open(path) as im:
      return im.height, im.width, len(im.getbands())
  except (OSError, SyntaxError, ValueError) as e:
    raise images_io.DataError(f"cannot read image {path}: {e}") from e


def common_file_shape(paths: Sequence[pathlib.Path]) -> tuple[int, int, int] | None:
  """(H, W, C) shared by all image files, None when they differ (the model then accepts any shape)."""
  shapes = {_file_shape(pathlib.Path(p)) for p in paths}
  return shapes.pop() if len(shapes) == 1 else None


def _print_update_info(model) -> None:
  """`glad info`'s lines about updates: statistics size and history."""
  state = model.state
  if state.update_stats is None:
    print("  update statistics: none (this checkpoint cannot be updated; refit it with `glad fit`)")
  else:
    import jax

    nbytes = sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(state.update_stats))
    print(f"  update statistics: {nbytes / 2**20:.2f} MiB")
  if state.source_shape is not None:
    h, w, ch = state.source_shape
    print(f"  training images: {h}x{w}, {ch} channel{'s' if ch != 1 else ''}")
  history = state.update_history
  print(f"  updates: {len(history)}")
  for r in history:
    ks = ", ".join(f"{name} K={k}" for name, k in r.n_components)
    thr = "thresholds recalibrated" if r.recalibrated else "thresholds kept"
    print(f"    {r.date}: {r.n_images} images, forgetting {r.forgetting:g}, +{r.n_added}/-{r.n_dropped} "
          f"components ({ks}), {thr}")


def cmd_update(args: argparse.Namespace) -> int:
  """`glad update CKPT IMAGES... --out CKPT2`: online update with new good images into a new checkpoint."""
  from glad_jax.data import mvtec
  from glad_jax.model import GLAD
  from glad_jax import online

  src = pathlib.Path(args.checkpoint).expanduser().absolute()
  dst = pathlib.Path(args.out).expanduser().absolute()
  if dst == src or (dst.exists() and src.exists() and dst.resolve() == src.resolve()):
    raise ValueError(f"--out {args.out} is the checkpoint being updated: write the updated model to a new "
                     "path (the original checkpoint is never modified)")
  if not 0.0 < args.forgetting <= 1.0:
    raise ValueError(f"--forgetting must be in (0, 1], got {args.forgetting}")
  if not 0.0 <= args.holdout < 1.0:
    raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
  model = GLAD.load(src)
  if model.state.update_stats is None:
    raise ValueError(f"checkpoint {src}: cannot update this model: {online.NO_STATS_MESSAGE}")
  paths = collect_image_paths(args.images)
  if not paths:
    raise ValueError(f"no image files to update the model with in {' '.join(args.images)}")
  want = model.state.source_shape
  if want is not None:
    h, w, ch = want
    for p in paths:
      got = _file_shape(p)
      if got != tuple(want):
        chan = lambda c: f"{c} channel{'s' if c != 1 else ''}"
        raise ValueError(f"{p} is {got[0]}x{got[1]} with {chan(got[2])} but the model was fitted on {h}x{w} "
                         f"images with {chan(ch)}: give images of the training size and channel count, or refit")
  records = [mvtec.ImageRecord(p, 0, "good", None) for p in paths]
  hold = []
  if args.holdout > 0:
    rng = np.random.default_rng(model.config.seed)
    n_hold = int(round(args.holdout * len(records)))
    if n_hold < 1 or len(records) - n_hold < 1:
      raise ValueError(f"--holdout {args.holdout} of {len(records)} images leaves no image to hold out or none "
                       "to update with")
    held = set(rng.choice(len(records), n_hold, replace=False).tolist())
    hold = [r for i, r in enumerate(records) if i in held]
    records = [r for i, r in enumerate(records) if i not in held]
  bars = ProgressBars(not args.quiet)
  size = model.config.image_size
  batch = load_records(records, size, on_corrupt=args.on_corrupt, progress=bars)
  cal = load_records(hold, size, on_corrupt=args.on_corrupt, progress=bars).images if hold else None
  _say(f"glad: updating {src} with {len(batch)} images"
       + (f" ({len(hold)} held out for thresholds)" if hold else " (thresholds kept)"))
  t0 = time.perf_counter()
  model.update(batch.images, holdout=cal, fpr=args.fpr, forgetting=args.forgetting, progress=bars)
  seconds = time.perf_counter() - t0
  bars.close()
  out = model.save(dst)   # atomic: a temporary directory renamed into place
  for name, info in model.update_info.items():
    g = info.global_info
    _say(f"  {name}: K {g.index.size - g.n_added + g.n_dropped} -> {info.n_components} "
         f"(+{g.n_added} created from {g.n_poorly_explained} poorly explained vectors, -{g.n_dropped} dropped), "
         f"{g.n_iter} K-MLE iterations on {info.n_samples_global} vectors")
  thr = "" if model.image_threshold is None else f"; image threshold {model.image_threshold:.4g}"
  print(f"saved {out} (update {seconds:.1f} s{thr})")
  return 0


def run(args: argparse.Namespace, config: GLADConfig | None) -> int:
  if args.command == "fit":
    return cmd_fit(args, config)
  if args.command == "score":
    return cmd_score(args)
  if args.command == "eval":
    return cmd_eval(args)
  if args.command == "demo":
    return cmd_demo(args)
  if args.command == "export":
    return cmd_export(args)
  if args.command == "validate":
    return cmd_validate(args)
  if args.command == "update":
    return cmd_update(args)
  if args.command == "info":
    return cmd_info(args)
  raise ValueError(f"unknown command {args.command!r}")
