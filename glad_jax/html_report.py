"""One self-contained, offline HTML page for an evaluation: DIR/index.html plus PNG files beside it (DIR/html/).

    write_html_report("reports/tire", "GLAD on tire", metrics, image_scores=s, labels=y, anomaly_maps=a,
                      images=x, masks=m, has_mask=h, names=paths, image_threshold=t, pixel_threshold=tp)

The page holds the metrics table, the image ROC curve, the PRO curve (MVTec protocol; when pixel ground truth
exists), the score histogram with the image threshold, any extra figures (e.g. weight decay, local maps), and a
gallery of test images sorted by score (most anomalous first): the image, its heat map over it, the ground-truth
outline (green, when known) and the predicted regions (red outline of map > pixel threshold, yellow bounding boxes
from glad_jax.regions). No script, font or style is fetched from anywhere: the CSS is inline, the images are
relative paths. A tiny inline script marks each <img> once loaded (data-loaded="1"; "0" if it failed), which a
headless browser test reads back.
"""

from __future__ import annotations

import datetime
import html
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from glad_jax import regions as regions_lib

ASSET_DIR = "html"
DEFAULT_MAX_GALLERY = 48
DEFAULT_PANEL_PX = 160
_GT_COLOUR = (0, 230, 0)
_PRED_COLOUR = (255, 40, 40)
_BOX_COLOUR = (255, 230, 0)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures img { max-width: 480px; margin: 6px 12px 6px 0; vertical-align: top; }
.gallery td { vertical-align: middle; } .gallery img { display: block; }
.anomalous { color: #b00; font-weight: bold; } .normal { color: #070; }
.note { color: #666; font-size: 0.9em; }
"""

_LOAD_SCRIPT = """
window.addEventListener("load", function () {
  for (const img of document.images) {
    img.dataset.loaded = (img.complete && img.naturalWidth > 0) ? "1" : "0";
  }
  document.body.dataset.ready = "1";
});
"""


def write_html_report(out_dir: str | os.PathLike, title: str, metrics: Mapping[str, Any], *,
                      image_scores, labels=None, anomaly_maps=None, images=None, masks=None, has_mask=None,
                      names: Sequence[str] | None = None, image_threshold: float | None = None,
                      pixel_threshold: float | None = None, good_score_median: float | None = None,
                      figures: Sequence[str | os.PathLike] = (), notes: Sequence[str] = (),
                      max_gallery: int | None = DEFAULT_MAX_GALLERY, panel_px: int = DEFAULT_PANEL_PX
                      ) -> pathlib.Path:
  """Writes out_dir/index.html and its PNGs (out_dir/html/); returns the path of index.html.

  Args:
    out_dir: report folder (created).
    title: page title and heading.
    metrics: name -> value (floats shown with 4 decimals); e.g. image_auroc, pixel_auroc, aupro.
    image_scores: array of shape (N,), higher = more anomalous.
    labels: optional array of shape (N,), 0 good / 1 anomalous (ROC curve, histogram colours, gallery column).
    anomaly_maps: optional array of shape (N, S, S) (PRO curve, gallery heat maps and regions).
    images: optional uint8 array of shape (N, S, S, 3) (the gallery; without it there is none).
    masks: optional bool array of shape (N, S, S), the pixel ground truth.
    has_mask: optional bool array of shape (N,): masks[i] is known (default: all, when masks are given).
    names: optional N image names for the gallery.
    image_threshold, pixel_threshold, good_score_median: calibration (decisions, normalised scores, regions).
    figures: extra PNG files to show (copied next to the page when they live elsewhere).
    notes: extra lines shown under the title (e.g. the setting).
    max_gallery: at most this many gallery rows (the most and the least anomalous halves); None = all.
    panel_px: size of each gallery picture.
  """
  out = pathlib.Path(out_dir)
  assets = out / ASSET_DIR
  assets.mkdir(parents=True, exist_ok=True)
  scores = np.asarray(image_scores, np.float64).ravel()
  n = scores.size
  y = None if labels is None else np.asarray(labels).astype(bool).ravel()
  names = [f"image {i}" for i in range(n)] if names is None else [str(s) for s in names]
  if len(names) != n or (y is not None and y.size != n):
    raise ValueError(f"names ({len(names)}) and labels ({None if y is None else y.size}) should have one entry per "
                     f"image score ({n})")
  if masks is not None and has_mask is None:
    has_mask = np.ones(n, bool)

  figs: list[tuple[str, str]] = []  # (relative src, caption)
  if y is not None and y.any() and not y.all():
    from glad_jax import metrics as metrics_lib
    from glad_jax import plots

    fpr, tpr, _ = metrics_lib.roc_curve(y, scores)
    auc = metrics_lib.auroc(y, scores)
    plots.roc_curves({title: metrics_lib.thin_curve(fpr, tpr) + (auc,)}, assets / "roc.png", title="image ROC")
    figs.append((f"{ASSET_DIR}/roc.png", f"image ROC (AUROC {auc:.4f})"))
  pro = _pro_figure(assets / "pro.png", masks, anomaly_maps, has_mask)
  if pro is not None:
    figs.append((f"{ASSET_DIR}/pro.png", pro))
  _histogram(assets / "score_histogram.png", scores, y, image_threshold)
  figs.append((f"{ASSET_DIR}/score_histogram.png", "image scores" + (
      "" if image_threshold is None else f", threshold {image_threshold:.4g}")))
  for f in figures:
    f = pathlib.Path(f)
    if not f.is_file():
      continue
    dest = assets / f.name if f.resolve().parent != out.resolve() else f
    if dest != f:
      shutil.copyfile(f, dest)
    figs.append((dest.resolve().relative_to(out.resolve()).as_posix(), f.stem.replace("_", " ")))

  gallery_rows, gallery_note = [], ""
  if images is not None:
    gallery_rows, gallery_note = _gallery(assets, scores, y, anomaly_maps, np.asarray(images), masks, has_mask,
                                          names, image_threshold, pixel_threshold, good_score_median,
                                          max_gallery, panel_px)

  page = _page(title, metrics, notes, figs, gallery_rows, gallery_note, image_threshold, pixel_threshold,
               good_score_median)
  path = out / "index.html"
  tmp = out / ".index.html.tmp"
  tmp.write_text(page, encoding="utf-8")
  os.replace(tmp, path)
  return path


# ------------------------------------------------------------------------------------------ figures


def _pyplot():
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def _pro_figure(path: pathlib.Path, masks, maps, has_mask) -> str | None:
  """PRO curve (FPR <= 0.3 shaded, the AUPRO range) when there is pixel ground truth; returns its caption."""
  if masks is None or maps is None:
    return None
  m = np.asarray(masks).astype(bool)[np.asarray(has_mask, bool)]
  a = np.asarray(maps)[np.asarray(has_mask, bool)]
  if not m.any() or m.all():
    return None
  from glad_jax import metrics as metrics_lib

  fpr, pro, _ = metrics_lib.pro_curve(m, a)
  value = metrics_lib.aupro(m, a)
  fpr, pro = metrics_lib.thin_curve(fpr, pro)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.axvspan(0.0, metrics_lib.AUPRO_MAX_FPR, color="0.92")
  ax.plot(fpr, pro, label=f"AUPRO (FPR <= {metrics_lib.AUPRO_MAX_FPR}) {value:.3f}")
  ax.set_xlabel("false-positive rate (pixels)")
  ax.set_ylabel("per-region overlap")
  ax.set_title("PRO curve")
  ax.legend(loc="lower right", fontsize=8)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return f"PRO curve (AUPRO {value:.4f})"


def _histogram(path: pathlib.Path, scores: np.ndarray, y: np.ndarray | None, threshold: float | None) -> None:
  if y is not None:
    from glad_jax import plots

    plots.score_histogram(scores, y, path, threshold=threshold)
    return
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  ax.hist(scores, bins=30, alpha=0.7, label="images")
  if threshold is not None:
    ax.axvline(threshold, color="k", ls="--", label="threshold")
  ax.set_xlabel("image anomaly score")
  ax.legend()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


# ------------------------------------------------------------------------------------------ gallery


def _gallery(assets, scores, y, maps, images, masks, has_mask, names, image_threshold, pixel_threshold,
             good_score_median, max_gallery, panel_px):
  order = np.argsort(-scores, kind="stable")
  ranks = np.arange(1, order.size + 1)  # 1 = highest score
  note = ""
  if max_gallery is not None and order.size > max_gallery:
    top = (max_gallery + 1) // 2
    keep = np.concatenate([np.arange(top), np.arange(order.size - (max_gallery - top), order.size)])
    order, ranks = order[keep], ranks[keep]
    note = (f"showing the {top} highest and the {max_gallery - top} lowest scores of {scores.size} images")
  norm = regions_lib.normalise_scores(scores, image_threshold, good_score_median)
  vmin = vmax = None
  if maps is not None:
    vmin, vmax = (float(v) for v in np.percentile(np.asarray(maps), [1, 99.9]))
  gdir = assets / "gallery"
  shutil.rmtree(gdir, ignore_errors=True)  # our own folder: no picture left over from an earlier, larger report
  gdir.mkdir(parents=True, exist_ok=True)
  rows = []
  for rank, i in zip(ranks, order):
    i, rank = int(i), int(rank)
    row = {"rank": rank, "name": names[i], "score": float(scores[i]),
           "normalised": None if norm is None else float(norm[i]),
           "decision": None if image_threshold is None else bool(scores[i] > image_threshold),
           "label": None if y is None else bool(y[i]), "pictures": []}
    image = images[i]
    row["pictures"].append(_save_png(_resize_rgb(image, panel_px), gdir / f"{rank:05d}_image.png", "image"))
    if maps is not None:
      row["pictures"].append(_save_png(_overlay(image, maps[i], vmin, vmax, panel_px),
                                       gdir / f"{rank:05d}_heatmap.png", "heat map"))
    if masks is not None:
      if has_mask[i]:
        pic = _outlined(image, [(np.asarray(masks[i], bool), _GT_COLOUR)], [], panel_px, None)
        row["pictures"].append(_save_png(pic, gdir / f"{rank:05d}_truth.png", "ground truth"))
      else:
        row["pictures"].append(None)
    if maps is not None and pixel_threshold is not None:
      found = regions_lib.find_regions(maps[i], pixel_threshold)
      row["n_regions"] = len(found)
      pic = _outlined(image, [(np.asarray(maps[i]) > pixel_threshold, _PRED_COLOUR)], found, panel_px,
                      np.asarray(maps[i]).shape)
      row["pictures"].append(_save_png(pic, gdir / f"{rank:05d}_regions.png", "predicted regions"))
    rows.append(row)
  return rows, note


def _resize_rgb(image: np.ndarray, px: int) -> np.ndarray:
  from PIL import Image

  im = np.asarray(image)
  if im.ndim == 2:
    im = np.repeat(im[..., None], 3, axis=-1)
  return np.asarray(Image.fromarray(im.astype(np.uint8)).resize((px, px), Image.BILINEAR))


def _overlay(image, amap, vmin, vmax, px) -> np.ndarray:
  import matplotlib
  from PIL import Image

  a = np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize((px, px), Image.BILINEAR))
  a = np.clip((a - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  heat = matplotlib.colormaps["jet"](a)[..., :3] * 255.0
  return np.clip(0.55 * _resize_rgb(image, px) + 0.45 * heat, 0, 255).astype(np.uint8)


def _outlined(image, masks_colours, found, px, map_shape) -> np.ndarray:
  """The image with the outline of each mask in its colour, and the bounding boxes of `found` regions."""
  from PIL import Image, ImageDraw
  from scipy import ndimage as ndi

  out = _resize_rgb(image, px).copy()
  for mask, colour in masks_colours:
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((px, px), Image.NEAREST)) > 127
    edge = m & ~ndi.binary_erosion(m)
    edge = ndi.binary_dilation(edge)  # 2 px wide: visible at thumbnail size
    out[edge] = colour
  if found:
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    sy, sx = px / map_shape[0], px / map_shape[1]
    for r in found:
      draw.rectangle([r.x * sx, r.y * sy, (r.x + r.width) * sx - 1, (r.y + r.height) * sy - 1],
                     outline=_BOX_COLOUR, width=1)
    out = np.asarray(pil)
  return out


def _save_png(pixels: np.ndarray, path: pathlib.Path, caption: str) -> tuple[str, str]:
  from PIL import Image

  Image.fromarray(pixels).save(path)
  return f"{ASSET_DIR}/gallery/{path.name}", caption


# --------------------------------------------------------------------------------------------- page


def _fmt(v: Any) -> str:
  if v is None:
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.4f}"
  return str(v)


def _page(title, metrics, notes, figs, gallery_rows, gallery_note, image_threshold, pixel_threshold,
          good_score_median) -> str:
  import glad_jax

  e = html.escape
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>",
           f'<p class="note">glad_jax {e(glad_jax.__version__)}, written {e(stamp)}</p>']
  parts += [f'<p class="note">{e(str(n))}</p>' for n in notes]
  parts.append('<h2>Metrics</h2><table id="metrics"><tr><th>metric</th><th>value</th></tr>')
  calib = {"image threshold": image_threshold, "pixel threshold": pixel_threshold,
           "median good score (calibration)": good_score_median}
  for k, v in list(metrics.items()) + list(calib.items()):
    parts.append(f'<tr><td>{e(str(k))}</td><td class="num">{e(_fmt(v))}</td></tr>')
  parts.append("</table>")
  parts.append('<h2>Curves and scores</h2><div class="figures" id="figures">')
  for src, caption in figs:
    parts.append(f'<figure style="display:inline-block;margin:0"><img src="{e(src)}" alt="{e(caption)}">'
                 f"<figcaption>{e(caption)}</figcaption></figure>")
  parts.append("</div>")
  if gallery_rows:
    parts.append("<h2>Test images, most anomalous first</h2>")
    parts.append('<p class="note">normalised score: 1 / (1 + exp(-(s - t) / (t - m))), t = image threshold, '
                 "m = median good score at calibration (threshold -> 0.5). Green: ground truth; red: map above "
                 "the pixel threshold; yellow: bounding boxes of the predicted regions.</p>")
    if gallery_note:
      parts.append(f'<p class="note">{e(gallery_note)}</p>')
    heads = _picture_heads(gallery_rows)
    parts.append('<table class="gallery" id="gallery"><tr><th>rank</th><th>image</th><th>score</th>'
                 "<th>normalised</th><th>decision</th><th>truth</th><th>regions</th>"
                 + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr>")
    for r in gallery_rows:
      decision = ("—" if r["decision"] is None else
                  ('<span class="anomalous">anomalous</span>' if r["decision"] else '<span class="normal">normal</span>'))
      truth = "—" if r["label"] is None else ("anomalous" if r["label"] else "good")
      cells = [f'<td class="num">{r["rank"]}</td>', f"<td>{e(r['name'])}</td>",
               f'<td class="num">{r["score"]:.4f}</td>', f'<td class="num">{e(_fmt(r["normalised"]))}</td>',
               f"<td>{decision}</td>", f"<td>{truth}</td>", f'<td class="num">{e(_fmt(r.get("n_regions")))}</td>']
      for pic in r["pictures"]:
        cells.append("<td>—</td>" if pic is None else f'<td><img src="{e(pic[0])}" alt="{e(pic[1])}"></td>')
      parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
  parts.append(f"<script>{_LOAD_SCRIPT}</script></body></html>")
  return "\n".join(parts) + "\n"


def _picture_heads(rows) -> list[str]:
  """Column heads of the picture cells: the captions of the first row that has every picture."""
  for r in rows:
    if all(p is not None for p in r["pictures"]):
      return [p[1] for p in r["pictures"]]
  return [p[1] if p is not None else "" for p in rows[0]["pictures"]]
