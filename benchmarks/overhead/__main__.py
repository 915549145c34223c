"""``python -m benchmarks.overhead``: the command line of the overhead report."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

import jax

from benchmarks import overhead
from benchmarks.overhead import report
from benchmarks.overhead.timing import CLOCK


def parse(argv: Sequence[str]) -> argparse.Namespace:
  """The command line (``--quick``: tiny models and few repetitions)."""
  p = argparse.ArgumentParser(description=overhead.__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny models and few reps")
  p.add_argument("--models", nargs="+", default=["mlp", "lora", "transformer"])
  p.add_argument("--grid-models", nargs="*", default=None,
                 help="models that get the full K x estimator x batching grid"
                      " (default: every model of --models; none when given empty)")
  p.add_argument("--out", default=None, help="markdown file to write")
  p.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                 help="step timer: wall time, or this process's CPU time (CPU only)")
  p.add_argument("--compile-reps", type=int, default=None,
                 help="repetitions of the compile-time table (default 11, 1 with --quick)")
  p.add_argument("--device-peaks", nargs="*", default=[],
                 help="models whose device peak memory is also measured, each"
                      " variant in a child process (GPU)")
  args = p.parse_args(argv)
  args.command = " ".join(["python -m benchmarks.overhead", *map(shlex.quote, argv)])
  if args.quick:
    args.reps = {m: 3 for m in ("mlp", "lora", "transformer")}
    compile_reps, args.ks, args.phis = 1, (2,), (1, 8)
    args.scan_ks = (1, 2, 4)
    args.batchings = ("chunk1", "vmap")
  else:
    cpu = jax.default_backend() == "cpu"
    args.reps = ({"mlp": 15, "lora": 9, "transformer": 5} if cpu
                 else {"mlp": 30, "lora": 30, "transformer": 30})
    compile_reps, args.ks, args.phis = 11, (1, 2, 4, 8), (1, 2, 4, 8, 16)
    args.scan_ks = (1, 2, 4, 8, 16, 33)
    args.batchings = ("chunk1", "chunk2", "chunk4", "vmap")
  args.compile_reps = args.compile_reps or compile_reps
  args.estimators = ("probe", "jvp", "secant")
  if args.grid_models is None:
    args.grid_models = args.models
  if args.out is None:
    args.out = f"benchmarks/results/overhead_{jax.default_backend()}.md"
  return args



def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> None:
  args = parse(list(argv))
  report.write(args.out, report.run(args))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
