"""One process of a multi-process global + local GLAD fit of seeded synthetic features.

Used by tests/test_distributed.py and scripts/bench_distributed.py; every process runs this same
script. The features of M synthetic images (one (h, w, d) grid each, position-dependent
clusters, from a seed) exist on every process, but each process keeps only its
`distributed.process_shard` of the images, turns them into a global array over all processes'
devices (`distributed.to_global`), fits the global K-MLE mixture on the mesh, then the local
weights with the images split over the mesh. Every process writes what it got to
OUT/p{process_id}.npz (weights, means, cov_chol, dense local log-weights, iterations, seconds).

  # the 2-process fit on localhost, 2 CPU devices per process:
  python scripts/distributed_fit.py --coordinator localhost:12345 --num-processes 2 --process-id 0 --out /tmp/d &
  python scripts/distributed_fit.py --coordinator localhost:12345 --num-processes 2 --process-id 1 --out /tmp/d
  # the one-process reference (one device, no mesh):
  python scripts/distributed_fit.py --num-processes 1 --local-devices 1 --no-mesh --out /tmp/d1
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from glad_jax import distributed  # noqa: E402  (before any other JAX work)


def synthetic_features(n_images: int, grid: tuple[int, int], dim: int, n_clusters: int,
                       seed: int):
  """(M, h, w, d) float32 features: at each position a seeded mix of 2 of the clusters."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  h, w = grid
  centres = rng.normal(size=(n_clusters, dim)) * 4.0
  # Each position draws from its own pair of clusters (so the local weights differ by position).
  pair = rng.integers(0, n_clusters, size=(h, w, 2))
  pick = rng.integers(0, 2, size=(n_images, h, w))
  labels = np.take_along_axis(np.broadcast_to(pair, (n_images, h, w, 2)), pick[..., None],
                              axis=-1)[..., 0]
  x = centres[labels] + rng.normal(size=(n_images, h, w, dim))
  return x.astype(np.float32)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--local-devices", type=int, default=2, help="CPU devices per process")
  p.add_argument("--no-mesh", action="store_true", help="one device, no mesh (the reference)")
  p.add_argument("--images", type=int, default=7)
  p.add_argument("--grid", type=int, nargs=2, default=(6, 5))
  p.add_argument("--dim", type=int, default=3)
  p.add_argument("--clusters", type=int, default=4)
  p.add_argument("--k", type=int, default=6, help="initial K of the global mixture")
  p.add_argument("--max-iter", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True, help="folder for p{process_id}.npz")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  info = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                args.local_devices)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from glad_jax import local, sharding  # noqa: PLC0415
  from glad_jax.mixture import KMLEConfig, fit_kmle  # noqa: PLC0415

  feats = synthetic_features(args.images, tuple(args.grid), args.dim, args.clusters, args.seed)
  config = KMLEConfig(n_components=args.k, max_iter=args.max_iter)
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  if args.no_mesh:
    mixture, fit_info = fit_kmle(feats.reshape(-1, args.dim), config, key)
    t1 = time.perf_counter()
    sparse = local.fit_local_weights(feats, mixture)
  else:
    mesh = distributed.global_mesh()
    mine = distributed.process_shard(list(range(args.images)))
    local_feats = feats[mine] if mine else feats[:0]
    features, mask = distributed.to_global(local_feats, mesh)
    samples = distributed.global_samples(features, mask, mesh)
    mixture, fit_info = fit_kmle(samples, config, key, mesh=mesh)
    mixture = sharding.to_local(mixture, mesh)
    t1 = time.perf_counter()
    sparse = local.fit_local_weights(features, mixture, mesh=mesh, image_mask=mask)
  t2 = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / f"p{info.process_id}.tmp.npz"
  np.savez(tmp, weights=np.asarray(mixture.weights), means=np.asarray(mixture.means),
           cov_chol=np.asarray(mixture.cov_chol), log_weights=np.asarray(local.to_dense(sparse)),
           n_iter=fit_info.n_iter, global_s=t1 - t0, local_s=t2 - t1,
           devices=info.device_count, processes=info.num_processes)
  os.replace(tmp, out / f"p{info.process_id}.npz")
  distributed.barrier("distributed_fit_done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
