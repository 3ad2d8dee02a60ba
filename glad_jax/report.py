"""Report folders and result files: Markdown tables, atomic CSV/JSON/text writers, the evaluation report.

Every writer goes through a temporary file and `os.replace`: an interrupted run never leaves a
half-written result. Library code: the CLI, the demo, the scripts and the protocols import it.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any

import numpy as np


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (temporary sibling file, then rename)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  write_text(path, json.dumps(obj, indent=2))


def write_rows(out: str | os.PathLike, stem: str, rows: list[dict]) -> None:
  """Writes rows (dicts sharing the first row's keys) to out/stem.csv and out/stem.json, atomically."""
  out = pathlib.Path(out)
  tmp = out / f".{stem}.csv.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, out / f"{stem}.csv")
  write_json(out / f"{stem}.json", rows)


def markdown_table(rows: list[dict]) -> str:
  """A Markdown table of dict rows: the union of their keys as columns (first-seen order), floats
  with 4 decimals, None as an empty cell."""
  cols = []
  for r in rows:
    cols.extend(c for c in r if c not in cols)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def write_report(out: pathlib.Path, name: str, model, test_batch, result: dict, pred) -> None:
  """metrics.json/.md, ROC curve, score histogram, weight decay, local maps and example heat maps.

  Args:
    out: report folder (created).
    name: category name (titles).
    model: the fitted `GLAD`.
    test_batch: the decoded test split it was evaluated on.
    result: the metrics row (`glad_jax.evaluation.evaluate`'s first output, plus any extra entries).
    pred: the `Prediction` on `test_batch`.
  """
  from glad_jax import local as local_lib
  from glad_jax import metrics, plots

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "metrics.json", result)
  write_text(out / "metrics.md", markdown_table([{"category": name, **result}]) + "\n")
  labels = test_batch.labels.astype(bool)
  fpr, tpr, _ = metrics.roc_curve(labels, pred.image_scores)
  plots.roc_curves({f"GLAD {name}": (fpr, tpr, result["image_auroc"])}, out / "roc.png",
                   title=f"image ROC, {name}")
  plots.score_histogram(pred.image_scores, labels, out / "score_histogram.png", threshold=model.image_threshold)
  infos = model.fit_info
  layers = model.layers
  if infos:
    plots.weight_decay({n: np.asarray(l.mixture.weights) for n, l in layers.items()},
                       {n: infos[n].n_samples_global for n in infos}, {n: infos[n].dim for n in infos},
                       out / "weight_decay.png")
  first = next(iter(layers))
  layer = layers[first]
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


__all__ = [
    "markdown_table",
    "write_json",
    "write_report",
    "write_rows",
    "write_text",
]
