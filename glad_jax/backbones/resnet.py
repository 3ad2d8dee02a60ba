"""ResNet18/50, WideResNet50-2 and their anti-aliased versions, in inference mode (Flax, NHWC).

Layer structure follows torchvision's ``resnet.py`` exactly (ResNet v1.5: the stride of a
Bottleneck is on its 3x3 conv), with explicit PyTorch padding everywhere. The anti-aliased
variants follow antialiased-cnns (Zhang, "Making convolutional networks shift-invariant
again", ICML 2019), which GLAD uses (paper Section 4.1): every strided operation becomes
"dense operation -> BlurPool(stride)":

- stem: MaxPool(3, stride 2, pad 1) -> MaxPool(2, stride 1) -> BlurPool(stride 2);
- BasicBlock: conv1 at stride 1, then BlurPool before conv2;
- Bottleneck: conv2 at stride 1, then BlurPool before conv3;
- shortcut: BlurPool before the 1x1 conv (which then has stride 1).

BlurPool uses the binomial filter of size 4 with reflect padding (the published weights).
GLAD's "layers 1, 2, 3" are the outputs of ``layer1``, ``layer2``, ``layer3`` (strides 4, 8, 16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from glad_jax.backbones import keymap
from glad_jax.backbones.common import ConvBN, Dense, blur_pool, last_requested, max_pool

OUTPUTS = ("layer1", "layer2", "layer3", "layer4", "logits")
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_PAD1 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Architecture of a torchvision-style ResNet.

  Attributes:
    block: 'basic' (ResNet18/34) or 'bottleneck' (ResNet50, WideResNet50-2).
    stage_sizes: number of blocks in layer1..layer4.
    stage_widths: planes of layer1..layer4 (torchvision: 64, 128, 256, 512).
    stem_width: output channels of conv1.
    width_per_group: 64, or 128 for WideResNet-x-2 (Bottleneck inner width = planes * wpg / 64).
    antialiased: insert BlurPool as antialiased-cnns does.
    filter_size: BlurPool binomial filter size.
    num_classes: outputs of ``fc``.
  """

  block: Literal["basic", "bottleneck"]
  stage_sizes: tuple[int, ...]
  stage_widths: tuple[int, ...] = (64, 128, 256, 512)
  stem_width: int = 64
  width_per_group: int = 64
  antialiased: bool = False
  filter_size: int = 4
  num_classes: int = 1000

  @property
  def expansion(self) -> int:
    return 1 if self.block == "basic" else 4

  def inner_width(self, planes: int) -> int:
    """Bottleneck width, torchvision's ``int(planes * (base_width / 64.)) * groups``."""
    return int(planes * (self.width_per_group / 64.0)) if self.block == "bottleneck" else planes

  @property
  def channels(self) -> dict[str, int]:
    chans = {f"layer{i + 1}": w * self.expansion for i, w in enumerate(self.stage_widths)}
    chans["logits"] = self.num_classes
    return chans


RESNET18 = ResNetConfig("basic", (2, 2, 2, 2))
RESNET50 = ResNetConfig("bottleneck", (3, 4, 6, 3))
WIDE_RESNET50_2 = ResNetConfig("bottleneck", (3, 4, 6, 3), width_per_group=128)
# Tiny variant for fast tests of code that consumes features (not a published network).
RESNET_TINY = ResNetConfig("basic", (1, 1, 1, 1), stage_widths=(8, 16, 32, 64), stem_width=8,
                           num_classes=10)


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock`` (or its antialiased-cnns version)."""

  planes: int
  strides: int
  downsample: bool
  antialiased: bool
  filter_size: int = 4
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(dtype=self.dtype, precision=self.precision)
    blurred = self.antialiased and self.strides > 1
    y = ConvBN(self.planes, 3, 1 if blurred else self.strides, _PAD1, name="conv1", **conv)(x)
    y = nn.relu(y)
    if blurred:
      y = blur_pool(y, self.filter_size, self.strides)
    y = ConvBN(self.planes, 3, 1, _PAD1, name="conv2", **conv)(y)
    shortcut = _shortcut(self, x, self.planes)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5, stride on the 3x3) or its antialiased-cnns version."""

  planes: int
  width: int
  strides: int
  downsample: bool
  antialiased: bool
  filter_size: int = 4
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(dtype=self.dtype, precision=self.precision)
    blurred = self.antialiased and self.strides > 1
    y = nn.relu(ConvBN(self.width, 1, name="conv1", **conv)(x))
    y = ConvBN(self.width, 3, 1 if blurred else self.strides, _PAD1, name="conv2", **conv)(y)
    y = nn.relu(y)
    if blurred:
      y = blur_pool(y, self.filter_size, self.strides)
    y = ConvBN(self.planes * 4, 1, name="conv3", **conv)(y)
    shortcut = _shortcut(self, x, self.planes * 4)
    return nn.relu(y + shortcut)


def _shortcut(block: nn.Module, x: jax.Array, out_ch: int) -> jax.Array:
  """Identity, or the 1x1 projection (after a BlurPool in the antialiased version)."""
  if not block.downsample:
    return x
  conv = dict(dtype=block.dtype, precision=block.precision, name="downsample")
  if block.antialiased and block.strides > 1:
    # conv1x1 and BlurPool commute; antialiased-cnns blurs first (cheaper), we follow it.
    return ConvBN(out_ch, 1, 1, **conv)(blur_pool(x, block.filter_size, block.strides))
  return ConvBN(out_ch, 1, block.strides, **conv)(x)


class ResNet(nn.Module):
  """A ResNet returning its named intermediate feature maps.

  Attributes:
    config: the architecture.
    dtype: computation dtype.
    precision: XLA precision of convolutions and the classifier.
  """

  config: ResNetConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, outputs: Sequence[str] = ("layer1", "layer2", "layer3")
               ) -> dict[str, jax.Array]:
    """Forward pass up to the deepest requested output.

    Args:
      x: normalised images, array of shape (B, H, W, 3).
      outputs: names among 'layer1'..'layer4', 'logits'.

    Returns:
      dict name -> array; 'layerN' of shape (B, ceil(H / 2^(N+1)), ..., C_N), 'logits' (B, classes).
    """
    cfg = self.config
    conv = dict(dtype=self.dtype, precision=self.precision)
    last = last_requested(outputs, OUTPUTS)
    x = ConvBN(cfg.stem_width, 7, 2, ((3, 3), (3, 3)), name="conv1", **conv)(x)
    x = nn.relu(x)
    if cfg.antialiased:
      x = blur_pool(max_pool(x, 2, 1, 0), cfg.filter_size, 2)
    else:
      x = max_pool(x, 3, 2, 1)
    feats = {}
    in_ch = cfg.stem_width
    for i, (n_blocks, planes) in enumerate(zip(cfg.stage_sizes, cfg.stage_widths)):
      if i > last:
        break
      out_ch = planes * cfg.expansion
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        downsample = j == 0 and (strides != 1 or in_ch != out_ch)
        common = dict(strides=strides, downsample=downsample, antialiased=cfg.antialiased,
                      filter_size=cfg.filter_size, name=f"layer{i + 1}_{j}", **conv)
        if cfg.block == "basic":
          x = BasicBlock(planes, **common)(x)
        else:
          x = Bottleneck(planes, cfg.inner_width(planes), **common)(x)
        in_ch = out_ch
      feats[f"layer{i + 1}"] = x
    if "logits" in outputs:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      feats["logits"] = Dense(cfg.num_classes, name="fc", **conv)(pooled)
    return {name: feats[name] for name in outputs}


def torch_layout(cfg: ResNetConfig) -> list[keymap.TorchTensor]:
  """The torchvision (or antialiased-cnns) state_dict of `cfg`, mapped onto `ResNet`'s variables."""
  specs = keymap.conv_bn("conv1.weight", "bn1", ("conv1",), cfg.stem_width, 3, 7)
  if cfg.antialiased:
    specs.append(keymap.blur("maxpool.1.filt", cfg.stem_width, cfg.filter_size))
  in_ch = cfg.stem_width
  for i, (n_blocks, planes) in enumerate(zip(cfg.stage_sizes, cfg.stage_widths)):
    out_ch = planes * cfg.expansion
    for j in range(n_blocks):
      tk, fp = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      strides = 2 if (i > 0 and j == 0) else 1
      blurred = cfg.antialiased and strides > 1
      if cfg.block == "basic":
        convs = [(planes, in_ch, 3), (planes, planes, 3)]
      else:
        width = cfg.inner_width(planes)
        convs = [(width, in_ch, 1), (width, width, 3), (out_ch, width, 1)]
      for c, (o, inp, k) in enumerate(convs, start=1):
        key = f"{tk}.conv{c}.weight"
        # antialiased-cnns wraps the conv after the BlurPool in nn.Sequential(BlurPool, conv).
        if blurred and c == len(convs):
          specs.append(keymap.blur(f"{tk}.conv{c}.0.filt", inp, cfg.filter_size))
          key = f"{tk}.conv{c}.1.weight"
        specs += keymap.conv_bn(key, f"{tk}.bn{c}", (fp, f"conv{c}"), o, inp, k)
      if j == 0 and (strides != 1 or in_ch != out_ch):
        if blurred:
          specs.append(keymap.blur(f"{tk}.downsample.0.filt", in_ch, cfg.filter_size))
          specs += keymap.conv_bn(f"{tk}.downsample.1.weight", f"{tk}.downsample.2",
                                  (fp, "downsample"), out_ch, in_ch, 1)
        else:
          specs += keymap.conv_bn(f"{tk}.downsample.0.weight", f"{tk}.downsample.1",
                                  (fp, "downsample"), out_ch, in_ch, 1)
      in_ch = out_ch
  specs += keymap.linear("fc", ("fc",), cfg.num_classes, in_ch)
  return specs
