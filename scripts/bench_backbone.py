"""Benchmarks feature extraction (images/s) of the Flax backbones against PyTorch, same weights.

For each backbone: a batch of uint8 images (default 16 x 256 x 256) -> ImageNet
normalisation -> layers 1, 2, 3 (the forward pass stops after layer3 on both sides).
Ours is `FeatureExtractor.apply` (jitted, compile time excluded); PyTorch (if importable) is
the reference model of scripts/make_backbone_fixtures.py in ``torch.inference_mode``, with
the same seeded weights (the packaged ones for Lite0). Prints one row per backbone:

  backbone  ours img/s  torch img/s  ours/torch

Usage (PyTorch side only where torch, torchvision, antialiased-cnns and
efficientnet-lite-pytorch import, e.g. the fixture venv):
  /work/refvenv_tv/bin/python scripts/bench_backbone.py --repeats 3
  python scripts/bench_backbone.py --backbones resnet18 efficientnet_lite0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT = ("resnet18", "resnet50", "wide_resnet50_2", "resnet18_aa", "resnet50_aa",
           "wide_resnet50_2_aa", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
LAYERS = ("layer1", "layer2", "layer3")


def best_times(fns: dict, repeats: int) -> dict:
  """Best wall time of each callable over `repeats` rounds, after one warm-up call each.

  The callables are interleaved within each round so that a change of machine load
  affects both implementations alike.
  """
  for fn in fns.values():
    fn()
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t0)
  return best


def ours_runner(name: str, state: dict, images: np.ndarray):
  import jax
  from glad_jax import backbones as bb
  fe = bb.create_feature_extractor(name, LAYERS, weights=state, image_size=images.shape[1])
  x = jax.device_put(images)
  return lambda: jax.block_until_ready(fe.apply(fe.params, x))


class _Stop(Exception):
  pass


def torch_runner(name: str, state: dict, images: np.ndarray):
  """PyTorch reference forward up to layer3, or None if the references do not import."""
  from glad_jax import backbones as bb
  try:
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from make_backbone_fixtures import layer_modules, torch_reference
  except ImportError:
    return None
  hw = images.shape[1:3]
  model = torch_reference(name, hw)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  model.eval()

  def stop(*args):
    raise _Stop

  layer_modules(name, model, hw)["layer3"].register_forward_hook(stop)  # layers 1-3 only
  mean = torch.tensor(bb.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(bb.IMAGENET_STD).view(1, 3, 1, 1)
  u8 = torch.from_numpy(images).permute(0, 3, 1, 2)

  def run():
    with torch.inference_mode():
      x = (u8.float() / 255.0 - mean) / std
      try:
        model(x)
      except _Stop:
        pass

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbones", nargs="*", default=DEFAULT)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--single-thread", action="store_true",
                      help="one thread for both XLA and PyTorch (robust to a busy machine)")
  args = parser.parse_args()
  if args.single_thread:
    # Must be set before JAX initialises its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1")
  import jax
  from glad_jax import backbones as bb
  try:
    import torch
    torch.set_num_threads(1 if args.single_thread else torch.get_num_threads())
    threads = torch.get_num_threads()
  except ImportError:
    threads = None
  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}); torch threads {threads}; batch {args.batch} x "
        f"{args.size}x{args.size}; best of {args.repeats}")
  print(f"{'backbone':<22}{'ours img/s':>12}{'torch img/s':>13}{'ours/torch':>12}")
  for name in args.backbones:
    spec = bb.get_spec(name)
    if name == "efficientnet_lite0":
      state = bb.read_state_dict(spec.default_weights())
    else:
      state = bb.random_state_dict(spec.torch_layout(), 0)
    runners = {"ours": ours_runner(name, state, images)}
    theirs_run = torch_runner(name, state, images)
    if theirs_run is not None:
      runners["torch"] = theirs_run
    best = best_times(runners, args.repeats)
    ours = args.batch / best["ours"]
    theirs = args.batch / best["torch"] if "torch" in best else None
    ratio = f"{ours / theirs:12.2f}" if theirs else f"{'-':>12}"
    theirs_s = f"{theirs:13.1f}" if theirs else f"{'n/a':>13}"
    print(f"{name:<22}{ours:12.1f}{theirs_s}{ratio}", flush=True)


if __name__ == "__main__":
  main()
