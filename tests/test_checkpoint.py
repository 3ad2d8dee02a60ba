"""Checkpoint round trip, atomicity and error messages (glad_jax.checkpoint)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from glad_jax import checkpoint


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "layer1": {"means": rng.normal(size=(7, 5)).astype(np.float32),
                 "cov_chol": rng.normal(size=(7, 5, 5)).astype(np.float32),
                 "index": rng.integers(0, 7, size=(16, 3)).astype(np.int32)},
      "layer2": {"weights": rng.random(4)},
  }


def _assert_trees_identical(a, b):
  assert set(a) == set(b)
  for k in a:
    if isinstance(a[k], dict):
      _assert_trees_identical(a[k], b[k])
    else:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
      np.testing.assert_array_equal(a[k], b[k])


def test_round_trip_is_bit_identical(tmp_path):
  tree = _tree()
  meta = {"config": {"k": 7}, "note": "x"}
  checkpoint.save_checkpoint(tmp_path / "ck", tree, meta)
  arrays, meta2 = checkpoint.load_checkpoint(tmp_path / "ck")
  _assert_trees_identical(tree, arrays)
  assert meta2 == meta
  # Nothing temporary left beside it.
  assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_overwrite_replaces_and_refuses_when_asked(tmp_path):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(0), {})
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(1), {"v": 2})
  arrays, meta = checkpoint.load_checkpoint(tmp_path / "ck")
  _assert_trees_identical(_tree(1), arrays)
  assert meta == {"v": 2}
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoint.save_checkpoint(tmp_path / "ck", _tree(0), {}, overwrite=False)


def test_crash_mid_save_leaves_no_valid_checkpoint(tmp_path, monkeypatch):
  # Crash after the arrays were written but before the directory is renamed into place.
  real_replace = os.replace

  def exploding_replace(src, dst):
    raise OSError("simulated crash (disk full)")

  monkeypatch.setattr(checkpoint.os, "replace", exploding_replace)
  with pytest.raises(OSError, match="simulated crash"):
    checkpoint.save_checkpoint(tmp_path / "ck", _tree(), {})
  monkeypatch.setattr(checkpoint.os, "replace", real_replace)
  assert not (tmp_path / "ck").exists()
  assert os.listdir(tmp_path) == []  # the temporary directory was cleaned up
  with pytest.raises(checkpoint.CheckpointError, match="not found"):
    checkpoint.load_checkpoint(tmp_path / "ck")


def test_crash_while_replacing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(0), {"v": 1})
  real_replace = os.replace
  n = {"calls": 0}

  def fail_second_replace(src, dst):
    n["calls"] += 1
    if n["calls"] == 2:  # old moved aside, new not yet in place
      raise OSError("simulated crash")
    return real_replace(src, dst)

  monkeypatch.setattr(checkpoint.os, "replace", fail_second_replace)
  with pytest.raises(OSError):
    checkpoint.save_checkpoint(tmp_path / "ck", _tree(1), {"v": 2})
  monkeypatch.setattr(checkpoint.os, "replace", real_replace)
  # The new model never appeared at ck; the old one survives beside it, intact.
  assert not (tmp_path / "ck").exists()
  old = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.old-")]
  assert len(old) == 1
  arrays, meta = checkpoint.load_checkpoint(old[0])
  assert meta == {"v": 1}


def test_missing_header_is_reported(tmp_path):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(), {})
  (tmp_path / "ck" / "glad_checkpoint.json").unlink()
  with pytest.raises(checkpoint.CheckpointError, match="glad_checkpoint.json is missing"):
    checkpoint.load_checkpoint(tmp_path / "ck")


def test_corrupt_header_is_reported(tmp_path):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(), {})
  (tmp_path / "ck" / "glad_checkpoint.json").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="header .* is corrupt"):
    checkpoint.load_checkpoint(tmp_path / "ck")


def test_other_format_version_is_refused(tmp_path):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(), {})
  header_path = tmp_path / "ck" / "glad_checkpoint.json"
  header = json.loads(header_path.read_text())
  header["format_version"] = checkpoint.FORMAT_VERSION + 1
  header["library_version"] = "9.9.9"
  header_path.write_text(json.dumps(header))
  newer = checkpoint.FORMAT_VERSION + 1
  with pytest.raises(checkpoint.CheckpointError, match=rf"format version {newer} \(written by glad_jax 9.9.9\)"):
    checkpoint.load_checkpoint(tmp_path / "ck")


def test_missing_or_corrupt_arrays_are_reported(tmp_path):
  checkpoint.save_checkpoint(tmp_path / "ck", _tree(), {})
  header_path = tmp_path / "ck" / "glad_checkpoint.json"
  header = json.loads(header_path.read_text())
  header["manifest"]["['layer1']['means']"] = [[8, 5], "float32"]
  header_path.write_text(json.dumps(header))
  with pytest.raises(checkpoint.CheckpointError, match="do not match its manifest"):
    checkpoint.load_checkpoint(tmp_path / "ck")
  import shutil
  shutil.rmtree(tmp_path / "ck" / "arrays")
  with pytest.raises(checkpoint.CheckpointError, match="array directory .* is missing"):
    checkpoint.load_checkpoint(tmp_path / "ck")


def test_not_a_directory_and_not_a_checkpoint(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(checkpoint.CheckpointError, match="is a file"):
    checkpoint.load_checkpoint(tmp_path / "file")
  (tmp_path / "dir").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="is missing"):
    checkpoint.load_checkpoint(tmp_path / "dir")


def test_restore_on_a_different_device_count(tmp_path):
  """Saved from a process with 8 (forced host) devices holding sharded arrays; restored here on 1."""
  script = textwrap.dedent(f"""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from glad_jax import checkpoint
      assert jax.device_count() == 8
      mesh = Mesh(np.array(jax.devices()), ("data",))
      x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("data")))
      checkpoint.save_checkpoint({str(tmp_path / 'ck')!r}, {{"x": x}}, {{"devices": 8}})
  """)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  arrays, meta = checkpoint.load_checkpoint(tmp_path / "ck")
  assert meta == {"devices": 8}
  np.testing.assert_array_equal(arrays["x"], np.arange(64.0).reshape(16, 4))


def test_state_trees_round_trip_generically(tmp_path):
  """Struct dataclasses (their pytree and static fields), dicts, tuples, None and scalars come back as they
  were, with no per-class code in the checkpoint module."""
  import jax.numpy as jnp

  from glad_jax.config import GLADConfig
  from glad_jax.local import SparseLocalWeights
  from glad_jax.methods import BaselineState

  local = SparseLocalWeights(tile_component=jnp.arange(3, dtype=jnp.int32),
                             tile_position=jnp.zeros((3, 4), jnp.int32),
                             tile_log_weight=jnp.full((3, 4), -jnp.inf), grid_shape=(2, 2), n_components=3)
  state = BaselineState(fitted={"local": local, "none": None, "pair": (np.arange(4.0), 7),
                                "config": np.uint8([1, 2])}, image_size=64)
  checkpoint.save_state(tmp_path / "s", state, {"config": {"k": 1}})
  restored, meta = checkpoint.load_state(tmp_path / "s")
  assert meta == {"config": {"k": 1}}
  assert type(restored) is BaselineState and restored.image_size == 64
  r = restored.fitted["local"]
  assert type(r) is SparseLocalWeights and r.grid_shape == (2, 2) and r.n_components == 3
  np.testing.assert_array_equal(r.tile_log_weight, np.asarray(local.tile_log_weight))
  assert restored.fitted["none"] is None and restored.fitted["pair"][1] == 7
  np.testing.assert_array_equal(restored.fitted["pair"][0], np.arange(4.0))
  # A frozen dataclass as a static field (a state's config) comes back equal, tuples as tuples.
  config = GLADConfig(layers=("layer2",), max_samples=10)
  checkpoint.save_state(tmp_path / "c", BaselineState(fitted=None, image_size=config), {})
  assert checkpoint.load_state(tmp_path / "c")[0].image_size == config


def test_state_naming_a_foreign_class_is_refused(tmp_path):
  from glad_jax.methods import BaselineState

  checkpoint.save_state(tmp_path / "s", BaselineState(fitted=np.zeros(2), image_size=8), {})
  header_path = tmp_path / "s" / "glad_checkpoint.json"
  header = json.loads(header_path.read_text())
  header["state"]["__node__"] = "os:system"
  header_path.write_text(json.dumps(header))
  with pytest.raises(checkpoint.CheckpointError, match="'os:system', which is not a glad_jax class"):
    checkpoint.load_state(tmp_path / "s")
  checkpoint.save_checkpoint(tmp_path / "plain", _tree(), {})
  with pytest.raises(checkpoint.CheckpointError, match="holds no model state"):
    checkpoint.load_state(tmp_path / "plain")
