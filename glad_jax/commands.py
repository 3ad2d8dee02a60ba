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


class ProgressBars:
  """tqdm bars driven by the `GLAD` progress callback (stage, info); silent when disabled."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self._bar = None
    self._key = None

  def __call__(self, stage: str, info: dict) -> None:
    if not self.enabled:
      return
    from tqdm.auto import tqdm

    if stage == "global":
      key = (stage, info["layer"])
      total, done = info["max_iter"], info["iteration"]
      desc = f"K-MLE {info['layer']}"
      postfix = {"loglik": f"{info['log_likelihood']:.4f}", "K": info["components"]}
    else:
      key = (stage, info.get("layer"))
      total, done = info["total"], info["done"]
      desc = {"features": "features", "local": f"local weights {info.get('layer', '')}",
              "score": "scoring", "images": "reading images"}.get(stage, stage)
      postfix = None
    if key != self._key:
      self.close()
      # disable=None: no bar when stderr is not a terminal (logs, CI).
      self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
      self._key = key
    self._bar.n = done
    if postfix:
      self._bar.set_postfix(postfix, refresh=False)
    self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
      self._key = None


def _say(msg: str) -> None:
  print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- data


def load_records(records, size: int, *, on_corrupt: str = "stop", progress: ProgressBars | None = None):
  """Decodes records to an ImageBatch; with on_corrupt='skip', unreadable images are named and left out."""
  from glad_jax.data import images as images_io
  from glad_jax.data import mvtec

  records = list(records)
  if not records:
    raise ValueError("no image to load (empty split)")
  sizes = set()
  good = []
  for r in records:
    try:
      sizes.add(images_io.image_size(r.path))
      good.append(r)
    except images_io.DataError as e:
      if on_corrupt == "stop":
        raise images_io.DataError(f"{e} (use --on-corrupt skip to leave unreadable images out)") from None
      _say(f"glad: skipping unreadable image {r.path}")
  if not good:
    raise ValueError("every image was unreadable")
  if len(sizes) > 1:
    _say(f"glad: note: the images have {len(sizes)} different sizes; all are resized to {size}x{size}")
  cb = None if progress is None else (lambda done, total: progress("images", {"done": done, "total": total}))
  return mvtec.load_split(good, (size, size), progress=cb)


def read_training_data(path: str, *, holdout: float, seed: int):
  """Training and calibration records of an MVTec-layout category or a plain folder of good images."""
  from glad_jax.data import mvtec

  category = mvtec.read_category(path, require_masks=False)
  train = list(category.train)
  calib = list(category.validation)
  if not calib and holdout > 0:
    rng = np.random.default_rng(seed)
    n_hold = int(round(holdout * len(train)))
    if n_hold >= 1 and len(train) - n_hold >= 2:
      held = set(rng.choice(len(train), n_hold, replace=False).tolist())
      calib = [r for i, r in enumerate(train) if i in held]
      train = [r for i, r in enumerate(train) if i not in held]
  return category, train, calib


def collect_image_paths(inputs: Sequence[str]) -> list[pathlib.Path]:
  from glad_jax.data import images as images_io

  paths = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      paths.extend(images_io.list_images(p))
    elif p.is_file():
      if not images_io.is_image_file(p):
        exts = ", ".join(e.lstrip(".") for e in images_io.IMAGE_EXTENSIONS)
        raise ValueError(f"{p} is not an image file (expected one of: {exts})")
      paths.append(p)
    else:
      raise FileNotFoundError(f"no such file or folder: {p}")
  return paths


# ------------------------------------------------------------------------------------------ commands


def cmd_fit(args: argparse.Namespace, config: GLADConfig) -> int:
  from glad_jax.model import GLAD

  bars = ProgressBars(not args.quiet)
  category, train, calib = read_training_data(args.data, holdout=args.holdout, seed=config.seed)
  _say(f"glad: fitting on {len(train)} images of {category.root} "
       f"({len(calib)} held out for thresholds)")
  batch = load_records(train, config.image_size, on_corrupt=args.on_corrupt, progress=bars)
  t0 = time.perf_counter()
  model = GLAD(config).fit(batch.images, progress=bars)
  fit_seconds = time.perf_counter() - t0
  if calib:
    cal = load_records(calib, config.image_size, on_corrupt=args.on_corrupt, progress=bars)
    model.calibrate(cal.images, fpr=args.fpr)
  bars.close()
  out = model.save(args.out)
  for name, info in model.fit_info.items():
    nnz = "" if info.mean_nnz is None else f", {info.mean_nnz:.1f} non-zero weights/position"
    _say(f"  {name}: d={info.dim}, grid {info.grid_shape[0]}x{info.grid_shape[1]}, K {config.n_components} -> "
         f"{info.n_components} in {info.n_iter} iterations{nnz}")
  thr = "" if model.image_threshold is None else f"; image threshold {model.image_threshold:.4g} at FPR {args.fpr}"
  print(f"saved {out} (fit {fit_seconds:.1f} s{thr})")
  return 0


def cmd_score(args: argparse.Namespace) -> int:
  from glad_jax import plots
  from glad_jax.data import mvtec
  from glad_jax.model import GLAD

  model = GLAD.load(args.checkpoint)
  paths = collect_image_paths(args.images)
  records = [mvtec.ImageRecord(p, 0, "unknown", None) for p in paths]
  bars = ProgressBars(not args.quiet)
  batch = load_records(records, model.config.image_size, on_corrupt=args.on_corrupt, progress=bars)
  pred = model.score(batch.images, batch_size=args.batch_size, progress=bars)
  bars.close()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for i, p in enumerate(batch.paths):
    row = {"image": str(p), "score": float(pred.image_scores[i])}
    if pred.image_labels is not None:
      row["anomalous"] = bool(pred.image_labels[i])
      row["threshold"] = model.image_threshold
    rows.append(row)
  _write_rows(out, "scores", rows)
  if not args.no_heatmaps:
    vmin, vmax = np.percentile(pred.anomaly_maps, [1, 99.9])
    for i, p in enumerate(batch.paths):
      plots.heatmap_panel(batch.images[i], pred.anomaly_maps[i], out / "heatmaps" / f"{i:04d}_{p.stem}.png",
                          title=f"{p.name}: score {pred.image_scores[i]:.3f}",
                          pixel_threshold=model.pixel_threshold, vmin=vmin, vmax=vmax)
  for row in rows:
    verdict = "" if "anomalous" not in row else ("  ANOMALOUS" if row["anomalous"] else "  normal")
    print(f"{row['score']:10.4f}{verdict}  {row['image']}")
  _say(f"glad: wrote {out / 'scores.csv'} and {out / 'scores.json'}"
       + ("" if args.no_heatmaps else f" and {len(rows)} heat maps in {out / 'heatmaps'}"))
  return 0


def _write_rows(out: pathlib.Path, stem: str, rows: list[dict]) -> None:
  """CSV + JSON, each written to a temporary file and renamed: no half-written result."""
  tmp = out / f".{stem}.csv.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, out / f"{stem}.csv")
  _write_json(out / f"{stem}.json", rows)


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2))
  os.replace(tmp, path)


def evaluate(model, test_batch, *, batch_size: int = 16, progress=None) -> tuple[dict, Any]:
  """Metrics of a fitted model on a decoded test split: image AUROC, pixel AUROC, AUPRO, time per image."""
  from glad_jax import metrics

  # Compile outside the timing: every chunk of `score` has the shape of its first one.
  model.score(test_batch.images[:batch_size], batch_size=batch_size)
  t0 = time.perf_counter()
  pred = model.score(test_batch.images, batch_size=batch_size, progress=progress)
  seconds = time.perf_counter() - t0
  labels = test_batch.labels.astype(bool)
  result = {"n_test": int(len(labels)), "n_anomalous": int(labels.sum()),
            "image_auroc": float(metrics.image_auroc(labels, pred.image_scores)),
            "inference_ms_per_image": 1000.0 * seconds / len(labels)}
  with_masks = test_batch.has_mask  # good images have a known, empty mask
  if bool(np.any(test_batch.masks[with_masks])):
    maps, gts = pred.anomaly_maps[with_masks], test_batch.masks[with_masks]
    result["pixel_auroc"] = float(metrics.pixel_auroc(gts, maps))
    result["aupro"] = float(metrics.aupro(gts, maps, max_fpr=0.3))
  return result, pred


def write_report(out: pathlib.Path, name: str, model, test_batch, result: dict, pred) -> None:
  """metrics.json/.md, ROC curve, score histogram, weight decay, local maps and example heat maps."""
  from glad_jax import local as local_lib
  from glad_jax import metrics, plots

  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "metrics.json", result)
  (out / "metrics.md").write_text(markdown_table([{"category": name, **result}]) + "\n")
  labels = test_batch.labels.astype(bool)
  fpr, tpr, _ = metrics.roc_curve(labels, pred.image_scores)
  plots.roc_curves({f"GLAD {name}": (fpr, tpr, result["image_auroc"])}, out / "roc.png",
                   title=f"image ROC, {name}")
  plots.score_histogram(pred.image_scores, labels, out / "score_histogram.png", threshold=model.image_threshold)
  infos = model.fit_info
  if infos:
    plots.weight_decay({n: np.asarray(l.mixture.weights) for n, l in model.layers.items()},
                       {n: infos[n].n_samples_global for n in infos}, {n: infos[n].dim for n in infos},
                       out / "weight_decay.png")
  first = next(iter(model.layers))
  layer = model.layers[first]
  if layer.local is not None:
    dense = np.exp(np.asarray(local_lib.to_dense(layer.local)))  # to_dense holds log pi_k(x)
    k = int(np.argmax(np.asarray(layer.mixture.weights)))
    plots.local_maps(model.reference if model.reference is not None else test_batch.images[0],
                     local_lib.nnz_map(layer.local), dense[..., k], k, out / "local_maps.png", layer=first)
  order = np.argsort(pred.image_scores)
  picks = list(order[-4:][::-1]) + list(order[:2])  # the 4 most anomalous and the 2 most normal
  vmin, vmax = np.percentile(pred.anomaly_maps, [1, 99.9])
  for rank, i in enumerate(picks):
    kind = "anomalous" if labels[i] else "good"
    plots.heatmap_panel(test_batch.images[i], pred.anomaly_maps[i], out / "heatmaps" / f"{rank:02d}_{kind}_{i}.png",
                        title=f"{test_batch.defects[i]}: score {pred.image_scores[i]:.3f}",
                        pixel_threshold=model.pixel_threshold, vmin=vmin, vmax=vmax)


def markdown_table(rows: list[dict]) -> str:
  cols = []
  for r in rows:
    cols.extend(c for c in r if c not in cols)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


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
  for name, layer in model.layers.items():
    info = model.fit_info.get(name)
    extra = "" if info is None else f", fitted on {info.n_samples_global} of {info.n_samples} vectors"
    local = "global only" if layer.local is None else f"{layer.local.n_tiles} local tiles"
    print(f"  {name}: K={layer.mixture.n_components}, d={layer.mixture.dim}, {local}{extra}")
  print(f"  thresholds: image {model.image_threshold}, pixel {model.pixel_threshold}")
  print(f"  size: {model.model_size_bytes() / 2**20:.2f} MiB")
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  from glad_jax import demo

  quick = args.quick or os.environ.get("GLAD_DEMO_QUICK", "") not in ("", "0")
  result = demo.run_demo(pathlib.Path(args.out), pathlib.Path(args.checkpoint), quick=quick,
                         progress=ProgressBars(not args.quiet))
  print(markdown_table([result]))
  _say(f"glad: report written to {args.out}")
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
  if args.command == "info":
    return cmd_info(args)
  raise ValueError(f"unknown command {args.command!r}")
