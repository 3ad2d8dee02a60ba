"""Runs a scorer written by `glad export` in a process that imports only jax and numpy (no glad_jax, no flax).

    python scripts/run_exported.py tire.gladx images.npy --out scores.npz

images.npy: uint8 array (B, S, S, 3), RGB, S = the manifest's image_size (resize before: the exported function
takes the images as the model scores them). Prints one line per image (score, normalised score, decision) and
writes every output (image_scores, normalised_scores, anomaly_maps, image_labels, pixel_masks) to the .npz.
`load_scorer` below is the loader quoted in README "Deploying" (tests/test_export.py runs this file).
"""

import argparse
import json
import zipfile

import jax
import numpy as np
from jax import export


def load_scorer(path):
  """(manifest, score): score(uint8 images (B, S, S, 3)) -> dict of NumPy arrays (see manifest["outputs"])."""
  with zipfile.ZipFile(path) as z:
    manifest = json.loads(z.read("manifest.json"))
    exported = export.deserialize(bytearray(z.read("scorer.bin")))
  call = jax.jit(exported.call)  # compiled once per batch size

  def score(images):
    out = call(np.asarray(images, dtype=np.uint8))
    return {name: np.asarray(value) for name, value in out.items()}

  return manifest, score


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("scorer", help="file written by `glad export`")
  p.add_argument("images", help=".npy file, uint8 (B, S, S, 3)")
  p.add_argument("--out", default=None, help=".npz file for all outputs")
  args = p.parse_args(argv)
  manifest, score = load_scorer(args.scorer)
  out = score(np.load(args.images))
  for i, s in enumerate(out["image_scores"]):
    verdict = "" if manifest["image_threshold"] is None else (
        "ANOMALOUS" if out["image_labels"][i] else "normal")
    print(f"{i:5d} {s:10.4f} {out['normalised_scores'][i]:6.3f} {verdict}")
  if args.out:
    np.savez(args.out, **out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
