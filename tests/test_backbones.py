"""Backbones: parity with the PyTorch references, the real Lite0 weights, the extractor API.

Reference outputs were computed once with PyTorch (torchvision, antialiased-cnns,
efficientnet-lite-pytorch) by scripts/make_backbone_fixtures.py; the seeded weights are
rebuilt here with NumPy, so no test needs PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from glad_jax import backbones as bb
from glad_jax.backbones import registry
from glad_jax.backbones.common import ConvBN, depthwise_conv
from glad_jax.backbones.weights import file_sha256, flatten
from glad_jax.config import GLADConfig

FIXTURES = Path(__file__).parent / "fixtures" / "backbones"
OUTPUTS = ("layer1", "layer2", "layer3", "logits")
PARITY = ("resnet18", "resnet50", "wide_resnet50_2", "resnet18_aa", "resnet50_aa",
          "wide_resnet50_2_aa", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_pytorch_reference(name):
  ref = np.load(FIXTURES / f"parity_{name}.npz")
  spec = bb.get_spec(name)
  state = bb.random_state_dict(spec.torch_layout(), int(ref["weight_seed"]))
  checksum = sum(float(np.abs(v).sum(dtype=np.float64)) for v in state.values())
  assert checksum == pytest.approx(float(ref["weights_checksum"]), rel=1e-9), (
      "the NumPy random stream changed: regenerate the fixtures with "
      "scripts/make_backbone_fixtures.py")
  variables = bb.convert_state_dict(state, spec.torch_layout(), name)
  x = np.random.default_rng(int(ref["input_seed"])).standard_normal(
      (1, *ref["input_hw"], 3)).astype(np.float32)
  out = jax.jit(lambda v, x: spec.module().apply(v, x, outputs=OUTPUTS))(variables, x)
  for key in OUTPUTS:
    assert out[key].shape == ref[key].shape, key
    assert rel_err(out[key], ref[key]) <= 1e-4, (key, rel_err(out[key], ref[key]))


@pytest.mark.parametrize("name", bb.list_backbones(include_test=True))
def test_torch_layout_fills_exactly_the_module_variables(name):
  spec = bb.get_spec(name)
  module = spec.module()
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                              outputs=spec.outputs))
  got = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
  assert got == registry.flax_shapes(spec.torch_layout())


def test_channels_and_strides_of_the_registry():
  expected = {"resnet18": (64, 128, 256), "wide_resnet50_2_aa": (256, 512, 1024),
              "efficientnet_lite0": (24, 40, 112), "efficientnet_lite2": (24, 48, 120)}
  for name, chans in expected.items():
    spec = bb.get_spec(name)
    assert tuple(spec.channels[f"layer{i}"] for i in (1, 2, 3)) == chans
    assert spec.strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
  assert "resnet_tiny" not in bb.list_backbones()
  assert "resnet_tiny" in bb.list_backbones(include_test=True)
  assert bb.list_backbones()[:6] == ("resnet18", "resnet50", "wide_resnet50_2", "resnet18_aa",
                                     "resnet50_aa", "wide_resnet50_2_aa")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
  return bb.create_feature_extractor("efficientnet_lite0", OUTPUTS,
                                     cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def lite0_outputs(lite0):
  """Lite0 on [astronaut, chelsea, coffee] in one batch (one compilation).

  astronaut()[::2, ::2] is already 256x256; chelsea and coffee are resized to 256 exactly as
  `preprocess` does (bilinear, antialiased; checked against PIL below), so the batch takes
  the same path as images given at their own size.
  """
  def resized(image):
    x = jnp.asarray(image, jnp.float32)[None] / 255.0
    return np.asarray(jax.image.resize(x, (1, 256, 256, 3), "bilinear", antialias=True))[0]

  batch = np.stack([data.astronaut()[::2, ::2].astype(np.float32) / 255.0,
                    resized(data.chelsea()), resized(data.coffee())])
  return lite0(batch)


def test_lite0_packaged_weights_match_pytorch(lite0_outputs):
  ref = np.load(FIXTURES / "lite0_real.npz")
  path = bb.get_spec("efficientnet_lite0").default_weights()
  assert file_sha256(path) == str(ref["weights_sha256"]), "different packaged Lite0 weights"
  for key in OUTPUTS:
    out = lite0_outputs[key][:1]
    assert out.shape == ref[key].shape
    assert rel_err(out, ref[key]) <= 1e-4, (key, rel_err(out, ref[key]))


def test_lite0_classifies_real_images(lite0_outputs):
  # Nobody tuned this: ImageNet classes 281-285 are cats, 967/968 espresso/cup.
  top1 = np.argmax(lite0_outputs["logits"], axis=-1)
  assert 281 <= int(top1[1]) <= 285
  assert int(top1[2]) in (967, 968)


def test_extractor_attributes(lite0):
  assert lite0.channels == {"layer1": 24, "layer2": 40, "layer3": 112, "logits": 1000}
  assert lite0.strides == {"layer1": 4, "layer2": 8, "layer3": 16}
  assert lite0.feature_shapes() == {"layer1": (64, 64, 24), "layer2": (32, 32, 40),
                                    "layer3": (16, 16, 112), "logits": (1000,)}
  assert set(lite0.params) == {"params", "batch_stats"}


@pytest.mark.parametrize("k, stride, padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                               (5, 2, ((1, 2), (2, 1)))])
def test_depthwise_and_pointwise_fast_paths_match_xla_convolution(k, stride, padding):
  rng = np.random.default_rng(k + stride)
  x = jnp.asarray(rng.standard_normal((2, 11, 9, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 1, 6)), jnp.float32)
  want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=6)
  got = depthwise_conv(x, w[:, :, 0], stride, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  conv = ConvBN(4, 1, stride)
  variables = conv.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  mult = 1 / np.sqrt(1 + 1e-5)  # default BN: scale 1, var 1, mean 0, bias 0
  want = jax.lax.conv_general_dilated(x, kernel * mult, (stride, stride), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_preprocess_matches_pil_and_imagenet_normalisation():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
  got = np.asarray(bb.preprocess(jnp.asarray(img), 64))
  mean, std = np.array(bb.IMAGENET_MEAN), np.array(bb.IMAGENET_STD)
  for b in range(2):
    chans = [np.asarray(Image.fromarray(img[b, ..., c].astype(np.float32) / 255.0, mode="F")
                        .resize((64, 64), Image.BILINEAR)) for c in range(3)]
    want = (np.stack(chans, -1) - mean) / std
    np.testing.assert_allclose(got[b], want, atol=1e-5)
  square = rng.random((1, 40, 40, 3), dtype=np.float32)
  np.testing.assert_allclose(np.asarray(bb.preprocess(jnp.asarray(square), 40)),
                             (square - mean) / std, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  return bb.create_feature_extractor("resnet_tiny", ("layer1", "layer2", "layer3"),
                                     image_size=32)


def test_grayscale_rgba_uint8_and_chunks_are_converted(tiny):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (5, 40, 36, 3), dtype=np.uint8)
  ref = tiny(rgb, batch_size=8)
  assert {k: v.shape for k, v in ref.items()} == {
      "layer1": (5, 8, 8, 8), "layer2": (5, 4, 4, 16), "layer3": (5, 2, 2, 32)}
  calls = []
  chunked = tiny(rgb, batch_size=2, callback=lambda done, total: calls.append((done, total)))
  assert calls == [(2, 5), (4, 5), (5, 5)]
  rgba = np.concatenate([rgb, rng.integers(0, 256, (5, 40, 36, 1), dtype=np.uint8)], -1)
  as_float = tiny(rgb.astype(np.float64) / 255.0, batch_size=8)
  as_uint16 = tiny(rgb.astype(np.uint16) * 257, batch_size=8)  # 65535 / 255 = 257
  from_rgba = tiny(rgba, batch_size=8)
  gray = rgb[..., 0]
  from_gray = tiny(gray, batch_size=8)
  from_gray3 = tiny(np.repeat(gray[..., None], 3, -1), batch_size=8)
  from_gray1 = tiny(gray[..., None], batch_size=8)
  for k in ref:
    np.testing.assert_allclose(chunked[k], ref[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_float[k], ref[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_uint16[k], ref[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(from_rgba[k], ref[k])
    np.testing.assert_array_equal(from_gray[k], from_gray3[k])
    np.testing.assert_array_equal(from_gray1[k], from_gray3[k])


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 8, 8, 3), np.int32), "dtype int32"),
    (np.zeros((2, 8, 8, 3), bool), "dtype bool"),
    (np.zeros((2, 8, 8, 3), np.complex64), "dtype complex64"),
    (np.zeros((8, 8), np.uint8), r"got \(8, 8\)"),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), r"got \(1, 2, 8, 8, 3\)"),
    (np.zeros((2, 8, 8, 2), np.uint8), r"got \(2, 8, 8, 2\)"),
    (np.zeros((40, 30, 3), np.uint8), "one RGB"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    (np.full((1, 8, 8, 3), 255.0, np.float32), r"in \[0, 1\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_raise_clear_errors(tiny, images, match):
  with pytest.raises(ValueError, match=match):
    tiny(images)


def test_apply_is_pure_jittable_and_differentiable(tiny):
  x = jnp.asarray(np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32))
  w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 4, 16)), jnp.float32)

  @jax.jit
  def loss(params, images):  # a linear functional of the features: little curvature
    return jnp.sum(tiny.apply(params, images)["layer2"] * w)

  grad = jax.grad(loss, argnums=1)(tiny.params, x)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
  # Central difference along a random direction (small step: ReLU/max-pool kinks).
  eps = 2e-3
  direction = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
  numeric = (loss(tiny.params, x + eps * direction) - loss(tiny.params, x - eps * direction)) / (
      2 * eps)
  assert float(jnp.vdot(grad, direction)) == pytest.approx(float(numeric), rel=2e-2)
  np.testing.assert_allclose(np.asarray(tiny.apply(tiny.params, x)["layer1"]),
                             tiny(np.asarray(x))["layer1"], rtol=1e-6, atol=1e-6)


def test_random_weights_are_seeded_and_bfloat16_runs():
  x = np.random.default_rng(4).random((2, 32, 32, 3), dtype=np.float32)
  spec = bb.get_spec("resnet_tiny_aa")
  a = bb.load_variables(spec, "random", seed=1)
  b = bb.load_variables(spec, None, seed=1)  # test-only variants default to random weights
  c = bb.load_variables(spec, "random", seed=2)
  flat_a, flat_b, flat_c = flatten(a), flatten(b), flatten(c)
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  assert not np.allclose(flat_a["params/conv1/kernel"], flat_c["params/conv1/kernel"])
  full = bb.create_feature_extractor("resnet_tiny_aa", ("layer3",), "random", 32, seed=1)(x)
  # Stopping after layer3 must not change it (the logits run the whole network).
  deeper = bb.create_feature_extractor("resnet_tiny_aa", ("logits", "layer3"), "random", 32,
                                       seed=1)(x)
  assert deeper["logits"].shape == (2, 10)
  np.testing.assert_array_equal(deeper["layer3"], full["layer3"])
  low = bb.create_feature_extractor("resnet_tiny_aa", ("layer3",), "random", 32, jnp.bfloat16,
                                    seed=1)(x)["layer3"]
  assert low.dtype == np.float32
  assert rel_err(low, full["layer3"]) < 5e-2


def test_feature_extractor_from_glad_config():
  cfg = GLADConfig(backbone="resnet_tiny", layers=("layer1", "layer3"), image_size=48)
  fe = bb.feature_extractor_from_config(cfg)
  assert fe.layers == ("layer1", "layer3") and fe.image_size == 48
  assert fe.feature_shapes() == {"layer1": (12, 12, 8), "layer3": (3, 3, 32)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet19"), "unknown backbone 'resnet19'; available: resnet18"),
    (dict(name="resnet_tiny", layers=("layer5",)), "layers must be distinct names"),
    (dict(name="resnet_tiny", layers=("layer1", "layer1")), "layers must be distinct"),
    (dict(name="resnet_tiny", layers=()), "layers must be distinct"),
    (dict(name="resnet_tiny", image_size=16), "image_size must be an integer >= 32"),
    (dict(name="resnet_tiny", image_size=64.0), "image_size must be an integer"),
    (dict(name="resnet_tiny", dtype=jnp.int32), "dtype must be a floating dtype"),
    (dict(name="resnet18"), "has no packaged weights"),
    (dict(name="resnet_tiny", weights=3), "weights must be None, 'random'"),
])
def test_create_feature_extractor_validates_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bb.create_feature_extractor(**kwargs)
