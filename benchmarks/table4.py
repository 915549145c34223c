"""The analog of the paper's Table 4: amortised speed of a refresh schedule.

Xu, Bu, Zhang & Barnett measured Hi-DLR's relative speed on ViT-base at
``K = 2`` for several ``Phi`` (0.81 at ``Phi = 8``). This runs the same
measurement on a transformer encoder whose steps take milliseconds on a GPU
(``benchmarks/_models.py``'s ``transformer``, width 512, depth 8, sequence
128, batch 32: not launch-bound), for the probe and the secant estimators at
``K = 2``, ``Phi`` in ``{1, 2, 4, 8}``: the refresh and non-refresh steps
timed interleaved with the base AdamW step (:mod:`benchmarks.overhead`), and
the amortised speed ``Phi / ((Phi - 1) / non + 1 / refresh)``. Run from the
repository root, on the machine to measure::

  python -m benchmarks.table4 --out benchmarks/results/table4_gpu.md
  python -m benchmarks.table4 --quick           # tiny sizes, a CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from benchmarks import _models
from benchmarks.overhead.report import environment, write
from benchmarks.overhead.steps import BASE, Bench, Variant
from benchmarks.overhead.tables import table
from benchmarks.overhead.timing import amortised, bound_full, interleaved, ms, speed

PHIS = (1, 2, 4, 8)
ESTIMATORS = ("probe", "secant")


def model(quick: bool) -> _models.Model:
  """A transformer with millisecond steps on a GPU (tiny with ``quick``)."""
  if quick:
    return _models.transformer(vocab=64, width=32, heads=2, depth=2, ff=64, seq=8, batch=2)
  return _models.transformer(vocab=4096, width=512, heads=8, depth=8, ff=2048, seq=128,
                             batch=32)


def measure(bench: Bench, reps: int) -> list[list]:
  """Per estimator: base, non-refresh and refresh step times, amortised speeds."""
  variants = {e: Variant(k=2, estimator=e) for e in ESTIMATORS}
  thunks = {"base": bench.step_call(BASE)}
  for e, v in variants.items():
    thunks[f"{e} non"] = bench.step_call(v, count=1)
    thunks[f"{e} ref"] = bench.step_call(v, count=0)
  t = interleaved(thunks, reps)
  rows = []
  for e in ESTIMATORS:
    non, ref = speed(t, f"{e} non"), speed(t, f"{e} ref")
    rows.append([e, ms(t["base"]), ms(t[f"{e} non"]), ms(t[f"{e} ref"]),
                 *(amortised(non, ref, phi) for phi in PHIS)])
  rows.append(["paper's bound, full training", "", "", "", *(bound_full(2, p) for p in PHIS)])
  return rows


def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--out", default=None)
  args = p.parse_args(list(argv))
  bench = Bench.create(model(args.quick))
  reps = args.reps or (3 if args.quick else 30)
  rows = measure(bench, reps)
  header = ["estimator", "base ms", "non-refresh ms", "refresh ms",
            *(f"amortised, Phi={p}" for p in PHIS)]
  text = "\n".join([
      f"Command: `python -m benchmarks.table4 {' '.join(argv)}`", "",
      f"# Amortised speed at K = 2 ({jax.default_backend().upper()})", "", environment(), "",
      f"{bench.model.description}; {reps} interleaved repetitions, medians; Hi-DLR over"
      " Adam's direction with probes on a separate batch.", "", table(header, rows), ""])
  print(text)
  if args.out:
    write(args.out, text)
  return text


if __name__ == "__main__":
  main()
