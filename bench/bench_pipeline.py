"""Cubes/s delivered by the pre-training input pipeline (corruption excluded: it runs on device).

  python bench/bench_pipeline.py [--subjects 8] [--seconds 3] [--repeats 3]

Prepares a phantom dataset (64x64x32 cubes, 256 per scan) in a temporary folder, then times
`pretrain_loader` at batch 6 and 32, in-process and with grain workers, against a baseline run
in the same process: a bare numpy loop gathering the same number of random cubes from the same
memory-mapped shards (the floor any loader pays), and, with --read_threads N, in-process loaders
whose grain ReadOptions use N read threads and 2 batches ahead (the setting before session 6) to
compare with the default (none). Repetitions are interleaved so CPU contention hits all alike;
the figures are medians. Compare with what a train step consumes: a full-width
CPU train step at batch 2 takes ~6-12 s (<1 cube/s); the small demo model takes far more.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import grain.python as grain
import numpy as np

from configs import pretrain_genesis
from genesis_jax.data import pipeline
from genesis_jax.data import prepare as prepare_lib


def _rate(next_batch, batch_size: int, seconds: float) -> float:
  """Cubes per second over at least `seconds` of pulling batches."""
  n, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds or n == 0:
    next_batch()
    n += batch_size
  return n / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subjects", type=int, default=8)
  parser.add_argument("--cubes_per_scan", type=int, default=256,
                      help="many, so the split has LUNA-like size (grain's per-epoch reshuffle "
                      "costs ~0.6 ms/cube on 100 cubes, ~20 us/cube on 10,000)")
  parser.add_argument("--dataset", default="", help="an existing prepared dataset dir to read")
  parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[6, 32])
  parser.add_argument("--read_threads", type=int, nargs="*", default=[2],
                      help="also time in-process loaders with this many grain read threads")
  args = parser.parse_args()

  cfg = pretrain_genesis.get_config().data
  cfg.phantom_subjects = args.subjects
  cfg.cubes_per_scan = args.cubes_per_scan
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    if args.dataset:
      dataset = args.dataset
    else:
      dataset = prepare_lib.ensure_dataset(cfg, workdir, seed=0)
      print(f"prepare (phantoms + extraction): {args.subjects} scans in "
            f"{time.perf_counter() - start:.1f} s")
    source = pipeline.CubeSource(dataset, "train")
    print(f"train split: {len(source)} cubes of {source.crop} (x, y, z)")
    rng = np.random.default_rng(0)

    for batch_size in args.batch_sizes:
      def raw_batch(bs=batch_size):
        np.stack([source[int(i)] for i in rng.integers(0, len(source), bs)])
      iterators = {}
      for workers in args.workers:
        it = iter(pipeline.pretrain_loader(source, batch_size=batch_size, seed=0,
                                           worker_count=workers))
        for _ in range(3):  # Warm-up: worker start-up is a one-off cost, not throughput.
          next(it)
        iterators[workers] = it
      default_options = pipeline.read_options
      for threads in args.read_threads:
        pipeline.read_options = lambda t=threads, b=batch_size: grain.ReadOptions(  # noqa: E731
            num_threads=t, prefetch_buffer_size=max(16, 2 * b))
        try:
          it = iter(pipeline.pretrain_loader(source, batch_size=batch_size, seed=0))
        finally:
          pipeline.read_options = default_options
        for _ in range(3):
          next(it)
        iterators[f"threads{threads}"] = it
      results = {"raw": [], **{w: [] for w in iterators}}
      for _ in range(args.repeats):
        results["raw"].append(_rate(raw_batch, batch_size, args.seconds))
        for workers, it in iterators.items():
          results[workers].append(_rate(lambda it=it: next(it), batch_size, args.seconds))
      raw = statistics.median(results["raw"])
      print(f"batch {batch_size:>3}: baseline numpy gather {raw:8.0f} cubes/s")
      for key in iterators:
        rate = statistics.median(results[key])
        what = (f"workers={key}" if isinstance(key, int)
                else f"workers=0, {key[7:]} read threads (old setting)")
        print(f"batch {batch_size:>3}: pretrain_loader {what} {rate:8.0f} cubes/s "
              f"({rate / batch_size:6.1f} batches/s, ratio to baseline {rate / raw:.2f})")
      del iterators


if __name__ == "__main__":
  main()
