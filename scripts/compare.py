"""Compares GLAD, its Table 1 ablations and the baselines on one data set, under four protocols.

  python scripts/compare.py DATA [--methods glad padim ...]
      [--protocols standard,rd,contamination,adversarial] [--max-train N] [--max-test N]
      [--k K] [--out DIR] [more options: --help]

DATA is an MVTec-layout category folder (MVTec AD, or MVTec 3D-AD RGB; see glad_jax.data.mvtec)
or ``elpv`` (the packaged elpv solar cells, --elpv-cell mono|poly|all; image labels only, so no
pixel metrics). Every method runs on the same backbone features (glad_jax.robustness.protocols).

Prints a Markdown report on stdout: a header naming the data, the backbone and every setting
that differs from the paper's ("reduced settings"), then one summary table, one row per method:

  image_auroc, pixel_auroc, aupro   standard protocol: fit on train/good, test on test/
  fit_s                             fit time on precomputed features (backbone excluded;
                                    includes JIT compilation, which dominates on tiny runs)
  inference_ms                      backbone + scorer per test image (one jitted function)
  size_mb                           fitted arrays, 1 MB = 1e6 bytes (backbone excluded)
  rd_normal, rd_auroc, rd_diff      Rd-: image AUROC clean, mean over randomised versions, gap
  c<N>_auroc, c<N>_drop             N anomalous test images moved into training
  adv_pixel_ap, adv_pixel_ap_eps<e> pixel AP, clean and under the pixel PGD at the largest
                                    budget e/255 (and 'e t': targeted, towards the reversed mask)
  adv_hide_det_eps<e>               anomalous images still above the calibrated threshold when
                                    only they are attacked (score pushed down), largest budget
  adv_alarm_eps<e>                  good images above the threshold when only they are attacked

and one detail table per protocol (per Rd- version, per N, per budget). The same report goes to
DIR/compare.md, and all numbers with the settings to DIR/compare.json. Progress goes to stderr.

Defaults are the paper's: K = 1000 Gaussians, 256 px, all training and test images, 5 Rd-
versions, N in {10, 40}, epsilon in {1, 2, 4, 8}/255 with 5 PGD steps, layers 1-3. The backbone
defaults to EfficientNet-Lite0 (the paper's anti-aliased WideResNet50-2 has no offline weights:
--backbone wide_resnet50_2_aa --weights FILE). That takes hours on a CPU; each of these runs
took about 3 minutes on 2 shared CPU cores (MVTec 3D-AD tire, Lite0):

  # all 10 methods, standard protocol
  python scripts/compare.py ../shared/data/mvtec3d_tire_rgb --protocols standard \\
      --max-train 16 --max-test 16 --k 8 --image-size 128 --max-samples 20000
  # all 4 protocols, 2 methods
  python scripts/compare.py ../shared/data/mvtec3d_tire_rgb --methods glad mahaad \\
      --max-train 16 --max-test 16 --k 8 --image-size 128 --max-samples 20000 \\
      --rd-versions 1 --contamination 4 --epsilons 8 --pgd-steps 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

PROTOCOLS = ("standard", "rd", "contamination", "adversarial")
# The paper's settings (Section 4.1, 4.4; OmniAL supp. for PGD; robustness suite for N).
PAPER = {"backbone": "wide_resnet50_2_aa", "k": 1000, "image_size": 256, "max_iter": 100,
         "max_samples": None, "max_train": None, "max_test": None, "rd_versions": 5,
         "contamination": [10, 40], "epsilons": [1.0, 2.0, 4.0, 8.0], "pgd_steps": 5,
         "targeted_epsilon": 8.0}


def _ints(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
  try:
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
  return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
  from glad_jax.config import GLADConfig

  d = GLADConfig()
  p = argparse.ArgumentParser(
      prog="compare.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data", help="MVTec-layout category folder, or 'elpv'")
  p.add_argument("--methods", nargs="+", default=None,
                 help="methods to run (default: all): every method of the registry "
                      "(glad_jax.methods: glad, mahaad, padim, patchcore, ...) and their variants "
                      "(glad-global, glad-em, glad-no-oas, glad-<layer subsets>)")
  p.add_argument("--protocols", type=_names, default=list(PROTOCOLS),
                 help="comma-separated subset of " + ",".join(PROTOCOLS) + " (default: all)")
  p.add_argument("--max-train", type=int, default=None, help="seeded subset of training images")
  p.add_argument("--max-test", type=int, default=None,
                 help="seeded subset of test images (good/anomalous proportions kept)")
  p.add_argument("--k", type=int, default=d.n_components, help="initial Gaussians K (paper: 1000)")
  p.add_argument("--backbone", default=d.backbone)
  p.add_argument("--weights", default=None, help="backbone checkpoint file, or 'random'")
  p.add_argument("--layers", type=_names, default=list(d.layers), help="comma-separated layers")
  p.add_argument("--image-size", type=int, default=d.image_size)
  p.add_argument("--max-iter", type=int, default=d.max_iter, help="K-MLE / EM iteration cap")
  p.add_argument("--max-samples", type=int, default=None,
                 help="cap on feature vectors per layer for GLAD's global fit")
  p.add_argument("--align", default=d.align, help="GLAD's motion model (default none)")
  p.add_argument("--mask", default=d.mask, choices=("none", "object", "margin"))
  p.add_argument("--rd-versions", type=int, default=PAPER["rd_versions"])
  p.add_argument("--contamination", type=_ints, default=PAPER["contamination"],
                 help="comma-separated N (default 10,40)")
  p.add_argument("--epsilons", type=_floats, default=PAPER["epsilons"],
                 help="pixel PGD budgets in 1/255 units, comma-separated (default 1,2,4,8)")
  p.add_argument("--targeted-epsilon", type=float, default=PAPER["targeted_epsilon"],
                 help="budget of the targeted pixel PGD in 1/255 units (default 8; < 0 skips it)")
  p.add_argument("--image-epsilons", type=_floats, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                 help="budgets of the one-sided image attacks in 1/255 units (default "
                      "0.25,0.5,1,2,4)")
  p.add_argument("--holdout", type=float, default=0.2,
                 help="fraction of the training images held out of the attack protocol's fits "
                      "(map statistics and threshold; default 0.2)")
  p.add_argument("--fpr", type=float, default=0.01,
                 help="false-positive rate of the attack protocol's image threshold (default 0.01)")
  p.add_argument("--pgd-steps", type=int, default=PAPER["pgd_steps"])
  p.add_argument("--pgd-batch-size", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--elpv-cell", default="mono", choices=("mono", "poly", "all"))
  p.add_argument("--out", default=None, help="output folder (default runs/compare/<data name>)")
  p.add_argument("--quiet", action="store_true", help="no progress on stderr")
  return p


# --------------------------------------------------------------------------------------------- data


def _subset_train(records, n: int | None, rng: np.random.Generator):
  if n is None or n >= len(records):
    return list(records)
  keep = np.sort(rng.choice(len(records), size=n, replace=False))
  return [records[i] for i in keep]


def _subset_test(records, n: int | None, rng: np.random.Generator):
  """A seeded subset of n test records keeping the good/anomalous proportions (>= 1 of each)."""
  if n is None or n >= len(records):
    return list(records)
  good = [i for i, r in enumerate(records) if r.label == 0]
  bad = [i for i, r in enumerate(records) if r.label == 1]
  n_good = min(len(good), max(1, round(n * len(good) / len(records))))
  n_bad = min(len(bad), max(1, n - n_good))
  keep = np.sort(np.concatenate([rng.choice(good, n_good, replace=False),
                                 rng.choice(bad, n_bad, replace=False)]))
  return [records[i] for i in keep]


def load_data(args) -> tuple[str, list, list]:
  """(name, train records, test records) after the seeded subsets."""
  from glad_jax.data import elpv, mvtec

  if args.data == "elpv":
    category = elpv.elpv_category(args.elpv_cell, seed=args.seed)
  else:
    category = mvtec.read_category(args.data)
  if not category.test:
    raise ValueError(f"{args.data} has no test split (test/<defect>/...) to compare on")
  rng = np.random.default_rng(args.seed)
  return (category.name, _subset_train(category.train, args.max_train, rng),
          _subset_test(category.test, args.max_test, rng))


# ------------------------------------------------------------------------------------------- report


def reduced_settings(args) -> list[str]:
  """Every setting that differs from the paper's, as 'name: used (paper: value)'."""
  used = {"backbone": args.backbone, "k": args.k, "image_size": args.image_size,
          "max_iter": args.max_iter, "max_samples": args.max_samples,
          "max_train": args.max_train, "max_test": args.max_test}
  if "rd" in args.protocols:
    used["rd_versions"] = args.rd_versions
  if "contamination" in args.protocols:
    used["contamination"] = list(args.contamination)
  if "adversarial" in args.protocols:
    used["epsilons"] = [float(e) for e in args.epsilons]
    used["pgd_steps"] = args.pgd_steps
    used["targeted_epsilon"] = None if args.targeted_epsilon < 0 else float(args.targeted_epsilon)
  show = lambda v: "all" if v is None else v  # noqa: E731
  return [f"{k}: {show(v)} (paper: {show(PAPER[k])})" for k, v in used.items() if v != PAPER[k]]


def summary_rows(methods, results: dict) -> list[dict[str, Any]]:
  """One row per method with the headline numbers of every protocol that ran."""
  from glad_jax.robustness.protocols import adversarial_tables

  adv = None if "adversarial" not in results else {
      k: {r["method"]: r for r in t} for k, t in adversarial_tables(results["adversarial"]).items()}
  rows = []
  for m in methods:
    row: dict[str, Any] = {"method": m.name}
    errors = []

    def take(protocol, **where):
      res = results.get(protocol)
      if res is None:
        return None
      r = res.row(m.name, **where)
      if "error" in r:
        errors.append(f"{protocol}: {r['error']}")
        return None
      return r

    if (r := take("standard")) is not None:
      row.update({k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro", "fit_s",
                                    "inference_ms", "size_mb")})
    if (r := take("rd")) is not None:
      row.update(rd_normal=r["normal_auroc"], rd_auroc=r["rd_auroc"], rd_diff=r["rd_diff"])
    if "contamination" in results:
      for n in results["contamination"].settings["sizes"]:
        if (r := take("contamination", n_requested=n)) is not None:
          row[f"c{n}_auroc"] = r["contaminated_auroc"]
          row[f"c{n}_drop"] = r["drop"]
    if take("adversarial", attack="none") is not None:
      st = results["adversarial"].settings
      pixel, hide, alarm = (adv[k][m.name] for k in ("pixel", "hide", "false-alarm"))
      row["adv_pixel_ap"] = pixel.get("pixel_ap_clean")
      if st["pixel_epsilons"]:
        e = f"{round(max(st['pixel_epsilons']) * 255, 4):g}"
        row[f"adv_pixel_ap_eps{e}"] = pixel.get(f"pixel_ap_eps{e}")
      if st["targeted_epsilon"] is not None:
        e = f"{round(st['targeted_epsilon'] * 255, 4):g}t"
        row[f"adv_pixel_ap_eps{e}"] = pixel.get(f"pixel_ap_eps{e}")
      if st["image_epsilons"]:
        e = f"{round(max(st['image_epsilons']) * 255, 4):g}"
        row[f"adv_hide_det_eps{e}"] = hide[f"detection_rate_eps{e}"]
        row[f"adv_alarm_eps{e}"] = alarm[f"false_alarm_rate_eps{e}"]
    if errors:
      row["error"] = "; ".join(sorted(set(errors)))
    rows.append(row)
  return rows


def render_markdown(header: list[str], summary: list[dict], results: dict) -> str:
  from glad_jax.report import markdown_table

  titles = {"standard": "Standard protocol (fit on train, test on test)",
            "rd": "Rd- (randomised pose; paper Table 4)",
            "contamination": "Contaminated training",
            "adversarial": "PGD attacks (OmniAL)"}
  parts = ["# Method comparison", "", *header, "", "## Summary", "", markdown_table(summary)]
  for name, res in results.items():
    parts += ["", f"## {titles[name]}", "", markdown_table(res.rows)]
    if name == "adversarial":
      from glad_jax.robustness.protocols import adversarial_tables

      adv_titles = {"pixel": "pixel AP / AUROC under the pixel PGD (OmniAL Tables 8-9; "
                             "'<e>t' = targeted)",
                    "hide": "hide the defect: only anomalous images attacked",
                    "false-alarm": "false alarm: only good images attacked"}
      for key, table in adversarial_tables(res).items():
        parts += ["", f"### {adv_titles[key]}", "", markdown_table(table)]
  return "\n".join(parts) + "\n"


def _write(path: pathlib.Path, text: str) -> None:
  from glad_jax.report import write_text

  write_text(path, text)  # no half-written result on interruption


class _Progress:
  """Protocol steps as one line each on stderr; GLAD's stages as tqdm bars."""

  def __init__(self, quiet: bool):
    from glad_jax.commands import ProgressBars

    self.quiet = quiet
    self.bars = ProgressBars(not quiet)

  def __call__(self, stage: str, info: dict) -> None:
    if self.quiet:
      return
    if stage == "protocol":
      self.bars.close()
      print(f"compare: [{info['protocol']}] {info['step']}: {info['method']} "
            f"({info['done'] + 1}/{info['total']})", file=sys.stderr)
    else:
      self.bars(stage, info)


# --------------------------------------------------------------------------------------------- main


def run(args) -> tuple[str, dict]:
  """Runs the requested protocols; returns (Markdown report, JSON-able dict)."""
  from glad_jax.config import GLADConfig
  from glad_jax.evaluation import load_records
  from glad_jax.robustness import protocols as P
  from glad_jax.robustness.adversarial import AttackSuiteConfig

  unknown = [p for p in args.protocols if p not in PROTOCOLS]
  if unknown or not args.protocols:
    raise ValueError(f"unknown protocol(s) {unknown or args.protocols}; choose among "
                     f"{','.join(PROTOCOLS)}")
  config = GLADConfig(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights,
                      image_size=args.image_size, n_components=args.k, max_iter=args.max_iter,
                      max_samples=args.max_samples, align=args.align, mask=args.mask,
                      seed=args.seed)
  names = None if args.methods is None else [n for v in args.methods for n in _names(v)]
  methods = P.default_methods(config) if names is None else P.select_methods(config, names)
  name, train_records, test_records = load_data(args)
  progress = _Progress(args.quiet)
  train = load_records(train_records, config.image_size, progress=progress.bars)
  test = load_records(test_records, config.image_size, progress=progress.bars)
  extractor = P.make_extractor(config, methods)
  common = dict(extractor=extractor, seed=args.seed, progress=progress)
  results: dict[str, P.ProtocolResult] = {}
  t0 = time.perf_counter()
  if "standard" in args.protocols:
    results["standard"] = P.run_standard(methods, train.images, test, batch_size=args.batch_size,
                                         **common)
  clean = results.get("standard")
  if "rd" in args.protocols:
    results["rd"] = P.run_rd(methods, train.images, test, n_versions=args.rd_versions,
                             batch_size=args.batch_size, clean=clean, **common)
  if "contamination" in args.protocols:
    results["contamination"] = P.run_contamination(
        methods, train.images, test, sizes=args.contamination, batch_size=args.batch_size,
        clean=clean, **common)
  if "adversarial" in args.protocols:
    # Refitted inside (a holdout of the training images calibrates each method), so the
    # standard protocol's fitted models are not reused.
    attacks = AttackSuiteConfig(
        pixel_epsilons=tuple(e / 255.0 for e in args.epsilons),
        targeted_epsilon=None if args.targeted_epsilon < 0 else args.targeted_epsilon / 255.0,
        image_epsilons=tuple(e / 255.0 for e in args.image_epsilons), steps=args.pgd_steps,
        fpr=args.fpr, holdout=args.holdout)
    results["adversarial"] = P.run_adversarial(methods, train.images, test, attacks=attacks,
                                               batch_size=args.pgd_batch_size, **common)
  progress.bars.close()
  seconds = time.perf_counter() - t0
  n_bad = int(np.sum(test.labels))
  reduced = reduced_settings(args)
  header = [
      f"Data: {args.data} ({name}): {len(train.labels)} training images, {len(test.labels)} test "
      f"images ({n_bad} anomalous).",
      f"Backbone: {config.backbone} (weights: {config.weights or 'packaged default'}), layers "
      f"{'+'.join(config.layers)}, {config.image_size} px; K = {config.n_components}; "
      f"seed {args.seed}; protocols: {', '.join(results)} ({seconds:.0f} s).",
      "Reduced settings: " + ("; ".join(reduced) if reduced else "none (the paper's)") + ".",
  ]
  summary = summary_rows(methods, results)
  report = render_markdown(header, summary, results)
  data = {"data": str(args.data), "category": name, "n_train": len(train.labels),
          "n_test": len(test.labels), "n_test_anomalous": n_bad,
          "settings": {k: v for k, v in vars(args).items() if k not in ("quiet", "out")},
          "reduced_settings": reduced, "seconds": seconds, "summary": summary,
          "protocols": {k: {"settings": r.settings, "rows": r.rows} for k, r in results.items()}}
  return report, data


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from glad_jax.data.images import DataError

  try:
    report, data = run(args)
  except (ValueError, DataError, FileNotFoundError) as e:
    print(f"compare: error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out or pathlib.Path("runs") / "compare" / data["category"])
  out.mkdir(parents=True, exist_ok=True)
  _write(out / "compare.md", report)
  _write(out / "compare.json", json.dumps(data, indent=2))
  print(report, end="")
  print(f"compare: wrote {out / 'compare.md'} and {out / 'compare.json'}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
