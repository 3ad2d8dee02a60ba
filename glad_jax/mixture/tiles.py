"""Grouping of items by key into fixed-size tiles, one key per tile (pure JAX, static shapes).

Used wherever per-item work needs a per-key matrix: the cluster scatter matrices of the M-step
(`stats.cluster_moments`: rows grouped by their component) and the exact scores of candidate
(sample, component) pairs (`pruned`: pairs grouped by component). Sorting the items by key and
padding each key's run to whole tiles of T items turns the work into one small batched matmul
per tile, with the key's d x d matrix read once per tile instead of once per item.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TileLayout(NamedTuple):
  """Where each item goes in a flat buffer of `n_tiles` tiles of `tile` slots.

  Attributes:
    counts: int32 array of shape (n_keys,), items per key.
    order: int32 array of shape (n,), the items sorted by key (ignored items last).
    dest: int32 array of shape (n,), slot of item order[j] in the flat buffer of
      n_tiles * tile slots; ignored items get distinct slots past its end (dropped by
      ``.at[dest].set(..., mode="drop")``, and a gather with mode="fill" reads the fill value).
    owner: int32 array of shape (n_tiles,), the key of each tile; n_keys for unused tiles.
    n_tiles: number of tiles (static): a bound on sum_k ceil(counts_k / tile), rounded up to a
      multiple of the `multiple` argument.
  """

  counts: jax.Array
  order: jax.Array
  dest: jax.Array
  owner: jax.Array
  n_tiles: int


def tile_layout(keys: jax.Array, n_keys: int, tile: int, multiple: int = 1) -> TileLayout:
  """Lays out items sorted by key in tiles of `tile` slots, each key's run padded to whole tiles.

  Args:
    keys: int32 array of shape (n,), the key of each item in [0, n_keys]; n_keys marks an item to
      ignore.
    n_keys: number of keys (static).
    tile: slots per tile (static).
    multiple: n_tiles is rounded up to a multiple of this (e.g. the tiles per scan step).

  Returns:
    a `TileLayout`.
  """
  n = keys.shape[0]
  valid = keys < n_keys
  clipped = jnp.minimum(keys, n_keys - 1)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), clipped, num_segments=n_keys)
  tiles_k = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(tiles_k)
  run_start = jnp.cumsum(counts) - counts
  order = jnp.argsort(keys, stable=True).astype(jnp.int32)   # ignored items (key n_keys) last
  sorted_keys = clipped[order]
  dest = ((tile_end[sorted_keys] - tiles_k[sorted_keys]) * tile + jnp.arange(n)
          - run_start[sorted_keys])
  n_tiles = -(-n // tile) + n_keys                   # static bound on sum_k ceil(counts_k / tile)
  n_tiles = -(-n_tiles // multiple) * multiple
  dest = jnp.where(valid[order], dest, n_tiles * tile + jnp.arange(n)).astype(jnp.int32)
  owner = jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right").astype(jnp.int32)
  return TileLayout(counts=counts, order=order, dest=dest, owner=owner, n_tiles=n_tiles)
