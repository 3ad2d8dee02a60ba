"""Checkpoint reading without PyTorch: formats, safety, key mapping errors, conversion cache.

reader_{zip,legacy}.pt, reader_expected.npz and resnet_tiny_aa_wrapped.pth were written by
PyTorch (scripts/make_backbone_fixtures.py); .safetensors files are written here with the
safetensors library, an independent writer.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from glad_jax import backbones as bb
from glad_jax.backbones import weights as wio

FIXTURES = Path(__file__).parent / "fixtures" / "backbones"
TINY_CKPT = FIXTURES / "resnet_tiny_aa_wrapped.pth"


@pytest.mark.parametrize("filename", ["reader_zip.pt", "reader_legacy.pt"])
def test_torch_formats_read_every_dtype_stride_and_view(filename):
  expected = np.load(FIXTURES / "reader_expected.npz")
  state = bb.read_state_dict(FIXTURES / filename)
  assert list(state) == list(expected.files)  # order kept, '_metadata' not a key
  for key in expected.files:
    got, want = state[key], expected[key]
    assert got.shape == want.shape, key
    if key == "bfloat16":
      assert got.dtype == ml_dtypes.bfloat16
      got = got.astype(np.float32)
    else:
      assert got.dtype == want.dtype, key
    np.testing.assert_array_equal(got, want, err_msg=key)
    assert got.flags.c_contiguous and got.flags.writeable


def test_safetensors_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"w": rng.standard_normal((3, 4)).astype(np.float32),
             "h": rng.standard_normal(5).astype(np.float16),
             "b": rng.standard_normal(2).astype(ml_dtypes.bfloat16),
             "i": np.arange(6, dtype=np.int64).reshape(2, 3), "m": np.array([True, False]),
             "s": np.array(2.5, np.float64)}
  path = tmp_path / "w.safetensors"
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np"})
  state = bb.read_state_dict(path)
  assert set(state) == set(tensors)
  for k, v in tensors.items():
    assert state[k].dtype == v.dtype and state[k].shape == v.shape
    np.testing.assert_array_equal(state[k], v)


def _assert_same_variables(a, b):
  fa, fb = wio.flatten(a), wio.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_wrapped_training_checkpoint_and_conversion_cache(tmp_path, monkeypatch):
  state = bb.read_state_dict(TINY_CKPT)  # {'state_dict': {'module.' + key: ...}, 'epoch': ...}
  assert not any(k.startswith("module.") for k in state)
  spec = bb.get_spec("resnet_tiny_aa")
  assert set(state) == {t.key for t in spec.torch_layout()}
  x = np.random.default_rng(1).random((2, 40, 40, 3), dtype=np.float32)
  fe = bb.create_feature_extractor("resnet_tiny_aa", ("layer2",), TINY_CKPT, 40,
                                   cache_dir=tmp_path)
  # The fixture holds random_state_dict(layout, seed=0): the same variables, so features.
  from_seed = bb.load_variables(spec, "random", seed=0)
  _assert_same_variables(fe.params, from_seed)
  features = fe(x)["layer2"]
  np.testing.assert_array_equal(fe.apply(from_seed, x)["layer2"], features)
  cached = list((tmp_path / "backbones").glob("resnet_tiny_aa-*.npz"))
  assert len(cached) == 1
  assert wio.file_sha256(TINY_CKPT)[:24] in cached[0].name

  def no_reading(*args):
    raise AssertionError("the cache should have been used")

  monkeypatch.setattr(wio, "read_state_dict", no_reading)
  _assert_same_variables(bb.load_variables(spec, str(TINY_CKPT), cache_dir=tmp_path), from_seed)
  monkeypatch.undo()
  cached[0].write_bytes(b"not an npz")  # a corrupt cache entry is converted again
  _assert_same_variables(bb.load_variables(spec, TINY_CKPT, cache_dir=tmp_path), from_seed)
  assert np.load(cached[0]).files  # rewritten as a valid npz


def test_cache_location_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("GLAD_JAX_CACHE", str(tmp_path / "env_cache"))
  assert wio.default_cache_dir() == tmp_path / "env_cache"
  bb.load_variables(bb.get_spec("resnet_tiny_aa"), TINY_CKPT)
  assert len(list((tmp_path / "env_cache" / "backbones").glob("*.npz"))) == 1
  monkeypatch.delenv("GLAD_JAX_CACHE")
  assert wio.default_cache_dir() == Path.home() / ".cache" / "glad_jax"


def test_checkpoint_of_another_architecture_lists_the_keys(tmp_path):
  with pytest.raises(bb.WeightMismatchError) as err:
    bb.create_feature_extractor("resnet18_aa", weights=TINY_CKPT, cache_dir=tmp_path)
  e = err.value
  assert "layer1.1.conv1.weight" in e.missing
  assert ("conv1.weight", (64, 3, 7, 7), (8, 3, 7, 7)) in e.mismatched
  assert not e.unexpected
  msg = str(e)
  assert str(TINY_CKPT) in msg and "'resnet18_aa'" in msg
  assert "missing key(s): layer1.1.conv1.weight" in msg
  assert "conv1.weight (expected (64, 3, 7, 7), found (8, 3, 7, 7))" in msg
  lite = bb.get_spec("efficientnet_lite0").default_weights()
  with pytest.raises(bb.WeightMismatchError, match=r"unexpected key\(s\): _conv_stem.weight"):
    bb.create_feature_extractor("resnet18", weights=lite, cache_dir=tmp_path)
  # torchvision weights into the anti-aliased network: the Sequential indices differ.
  tv = bb.random_state_dict(bb.get_spec("resnet_tiny").torch_layout(), 0)
  with pytest.raises(bb.WeightMismatchError) as err:
    bb.create_feature_extractor("resnet_tiny_aa", weights=tv)
  assert "layer2.0.conv2.1.weight" in err.value.missing
  assert "layer2.0.conv2.weight" in err.value.unexpected


def test_blurpool_filter_of_another_size_is_refused():
  layout = bb.get_spec("resnet_tiny_aa").torch_layout()
  state = bb.random_state_dict(layout, 0)
  state["maxpool.1.filt"] = np.full_like(state["maxpool.1.filt"], 1 / 16)
  with pytest.raises(bb.WeightMismatchError, match="maxpool.1.filt is not the normalised"):
    bb.convert_state_dict(state, layout, "resnet_tiny_aa")


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
  raw = src.read_bytes()
  dst.write_bytes(raw[:int(len(raw) * fraction)])
  return dst


@pytest.mark.parametrize("src", [TINY_CKPT, FIXTURES / "reader_legacy.pt",
                                 FIXTURES / "reader_zip.pt"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_truncated_files_raise_checkpoint_error(tmp_path, src, fraction):
  path = _truncated(src, tmp_path / src.name, fraction)
  with pytest.raises(bb.CheckpointError, match=str(path)):
    bb.read_state_dict(path)


def test_truncated_packaged_legacy_file(tmp_path):
  lite = bb.get_spec("efficientnet_lite0").default_weights()
  path = _truncated(lite, tmp_path / "lite0.pth", 0.6)
  with pytest.raises(bb.CheckpointError, match="truncated"):
    bb.create_feature_extractor("efficientnet_lite0", weights=path, cache_dir=tmp_path)


def test_truncated_safetensors(tmp_path):
  path = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(path))
  short = _truncated(path, tmp_path / "short.safetensors", 0.5)
  with pytest.raises(bb.CheckpointError, match="outside the data section"):
    bb.read_state_dict(short)
  header_only = tmp_path / "header.safetensors"
  header_only.write_bytes(path.read_bytes()[:30])
  with pytest.raises(bb.CheckpointError, match="header runs past the end"):
    bb.read_state_dict(header_only)


class _Exploit:
  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Eval:
  def __reduce__(self):
    return (eval, ("1 + 1",))


def _legacy_stream(obj, protocol: int = 2) -> bytes:
  """A legacy torch.save layout (magic, protocol, sys_info, object, keys) around `obj`."""
  parts = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True},
           obj, []]
  return b"".join(pickle.dumps(p, protocol=protocol) for p in parts)


def test_pickle_asking_for_os_system_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  payload = {"conv1.weight": _Exploit(marker)}
  plain = tmp_path / "plain.pth"
  plain.write_bytes(pickle.dumps(payload, protocol=2))
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(_legacy_stream(payload))
  zipped = tmp_path / "zipped.pth"
  with zipfile.ZipFile(zipped, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    zf.writestr("archive/version", "3\n")
  for path in (plain, legacy, zipped):
    with pytest.raises(bb.UnsafeCheckpointError, match=r"global (posix|os|nt)\.system"):
      bb.read_state_dict(path)
    with pytest.raises(bb.UnsafeCheckpointError, match="must never run code"):
      bb.create_feature_extractor("resnet_tiny", weights=path, cache_dir=tmp_path)
  assert not marker.exists()
  evil = tmp_path / "eval.pth"
  evil.write_bytes(_legacy_stream({"w": _Eval()}))
  with pytest.raises(bb.UnsafeCheckpointError, match=r"(builtins|__builtin__)\.eval"):
    bb.read_state_dict(evil)
  assert issubclass(bb.UnsafeCheckpointError, ValueError)


def test_numpy_scalars_beside_the_state_dict_are_accepted(tmp_path):
  path = tmp_path / "train.pth"
  payload = {"epoch": 90, "best_acc1": np.float64(71.2), "lr": np.float32(0.1),
             "state_dict": {"w": np.arange(6.0).reshape(2, 3)}}
  for protocol in (2, 4):
    path.write_bytes(_legacy_stream(payload, protocol))
    loaded = bb.load_checkpoint(path)
    assert loaded["best_acc1"] == np.float64(71.2)
    np.testing.assert_array_equal(bb.read_state_dict(path)["w"], np.arange(6.0).reshape(2, 3))
  # ...but an object array cannot smuggle a callable in.
  path.write_bytes(_legacy_stream({"w": np.array([os.system], dtype=object)}))
  with pytest.raises(bb.UnsafeCheckpointError, match=r"system"):
    bb.read_state_dict(path)


def test_pickled_model_object_is_refused(tmp_path):
  # A whole pickled nn.Module names its class: refused, with advice to save a state_dict.
  # Hand-written protocol-2 pickle of {'model': torch.nn.modules.conv.Conv2d()}.
  obj = (b"\x80\x02}X\x05\x00\x00\x00model" b"ctorch.nn.modules.conv\nConv2d\n)\x81s.")
  path = tmp_path / "model.pth"
  path.write_bytes(_legacy_stream(None).replace(pickle.dumps(None, protocol=2), obj, 1))
  with pytest.raises(bb.UnsafeCheckpointError,
                     match=r"torch\.nn\.modules\.conv\.Conv2d(.|\n)*state_dict"):
    bb.read_state_dict(path)


def test_malformed_tensor_record(tmp_path):
  # Hand-written pickle of _rebuild_tensor_v2({}, 0, (2,), (1,), False): no storage behind it.
  obj = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(}K\x00K\x02\x85K\x01\x85\x89tR."
  path = tmp_path / "bad.pth"
  path.write_bytes(_legacy_stream(None).replace(pickle.dumps(None, protocol=2), obj, 1))
  with pytest.raises(bb.CheckpointError, match="malformed tensor record"):
    bb.read_state_dict(path)


@pytest.mark.parametrize("content, match", [
    (b"", "not a PyTorch"),
    (b"hello world, not weights", "not a PyTorch"),
    (pickle.dumps({"a": 1}, protocol=2), "no PyTorch magic number"),
    (pickle.dumps([1, 2], protocol=2)[:5], "corrupt or truncated"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, match):
  path = tmp_path / "weights.pth"
  path.write_bytes(content)
  with pytest.raises(bb.CheckpointError, match=match):
    bb.read_state_dict(path)


def test_missing_file_and_non_state_dict_objects(tmp_path):
  with pytest.raises(bb.CheckpointError, match="does not exist"):
    bb.create_feature_extractor("resnet_tiny", weights=tmp_path / "nope.pth")
  path = tmp_path / "list.pth"
  path.write_bytes(_legacy_stream([1, 2, 3]))
  with pytest.raises(bb.CheckpointError, match="does not contain a state_dict"):
    bb.read_state_dict(path)
  path.write_bytes(_legacy_stream({"epoch": 3, "arch": "resnet18"}))
  with pytest.raises(bb.CheckpointError, match=r"top-level keys \['epoch', 'arch'\]"):
    bb.read_state_dict(path)
  assert issubclass(bb.CheckpointError, ValueError)


def test_uncached_when_cache_dir_is_not_writable(tmp_path):
  blocker = tmp_path / "file_not_dir"
  blocker.write_text("x")
  with pytest.warns(RuntimeWarning, match="could not cache"):
    variables = bb.load_variables(bb.get_spec("resnet_tiny_aa"), TINY_CKPT, cache_dir=blocker)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 8)


def test_packaged_lite0_weights_are_found_offline():
  path = bb.get_spec("efficientnet_lite0").default_weights()
  assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
  state = bb.read_state_dict(path)
  assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_conv_stem.weight"].flags.c_contiguous  # stored channels-last in the file
