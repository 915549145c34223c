"""California housing regression with an MLP (or an additive model): Hi-DLR
against tuned schedules.

The paper's tabular experiment (section 4.4 / B.3: California housing, Adam,
batch 256, Phi = 8) with a plain ReLU MLP (8 -> 64 -> 64 -> 1) on the 8
standardised features (Pace & Barry, 1997; 80/20 split). Compared: Hi-DLR
with the (head) and (bias) groupings and one group per layer, Hi-ULR (GeN),
Prodigy, D-Adaptation, and AdamW with constant, linear-decay and cosine-decay
schedules (peak rate from a grid). ``--model nam`` trains instead the neural
additive model of ``additive_model.py`` (one small MLP per feature, plus a
bias) with Hi-DLR's one group per feature network and one for the bias, as in
the paper's Figure 5. Run from the repository root::

  python examples/california_mlp.py              # the benchmark (3 seeds)
  python examples/california_mlp.py --model nam  # the additive model
  python examples/california_mlp.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line, load_california_housing, mlp_apply, mlp_init,
    standardize, train_test_split, write_results,
)
from _methods import learning_rate_free  # noqa: E402
import _realdata_common as rc  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = rc.benchmark_parser(
      __doc__.splitlines()[0], quick_help="1 seed, 2 epochs", epochs=50, batch_size=256,
      lr=1e-4, peaks=[1e-3, 3e-3, 1e-2], update_every=8, weight_decay=1e-4,
  )
  p.add_argument("--model", choices=("mlp", "nam"), default="mlp")
  return p.parse_args(argv)


def groupings(params: list[dict]) -> dict[str, Any]:
  """(head): last layer vs rest; (bias): biases vs weights; (layer): per layer."""
  last = len(params) - 1
  return {
      "head": [{"w": g, "b": g} for g in ["body"] * last + ["head"]],
      "bias": [{"w": "weight", "b": "bias"} for _ in params],
      "layer": [{"w": f"layer{i}", "b": f"layer{i}"} for i in range(len(params))],
  }


def make_model(name: str) -> tuple[Callable, Callable, dict[str, Any], str]:
  """``(init(seed), predict(params, x), Hi-DLR groupings, description)``."""
  if name == "nam":
    import additive_model as am

    init = lambda seed: am.init_params(jax.random.key(seed), len(am.CALIFORNIA_FEATURES))
    hidden = " -> ".join(map(str, (1, *am.HIDDEN, 1)))
    return (
        init, am.predict, {"feature": am.labels(am.CALIFORNIA_FEATURES)},
        f"neural additive model (one ReLU MLP {hidden} per feature, plus a bias)",
    )
  sizes = (8, 64, 64, 1)
  init = lambda seed: mlp_init(jax.random.key(seed), sizes)
  predict = lambda p, x: mlp_apply(p, x)[:, 0]
  return init, predict, groupings(init(0)), f"ReLU MLP {' -> '.join(map(str, sizes))}"


def build_entries(args, steps: int, groups: dict[str, Any]) -> list[rc.Entry]:
  wd, lr = args.weight_decay, args.lr
  common = rc.hidlr_options(args, steps)
  hidlr = [
      rc.hidlr_entry(f"Hi-DLR ({name})", lr, labels, **common)
      for name, labels in groups.items()
  ]
  first = next(iter(groups))
  own = rc.hidlr_entry(
      f"Hi-DLR ({first}), own-batch probes", lr, groups[first],
      **common, probe="same",
  )
  full = rc.hidlr_entry(
      f"Hi-DLR ({first}), full fit", lr, groups[first],
      **common, fit="full",
  )
  large_probe = rc.hidlr_entry(
      f"Hi-DLR ({first}), {rc.LARGE_PROBE_BATCHES}x probe batch", lr, groups[first],
      **common, probe_batches=rc.LARGE_PROBE_BATCHES,
  )
  hiulr = rc.hidlr_entry("Hi-ULR (GeN)", lr, None, **common)
  schedules = [
      rc.scheduled_adamw(f"AdamW {kind}", kind, args.peaks, steps, weight_decay=wd)
      for kind in ("constant", "linear", "cosine")
  ]
  return [
      *hidlr, own, large_probe, full, hiulr,
      *(rc.Entry(m) for m in learning_rate_free(weight_decay=wd, names=rc.PEERS)),
      *schedules,
  ]


def summarise(history: Mapping[str, Any]) -> dict[str, float]:
  """Final and best test MSE and final train MSE of one run."""
  return {
      "test_mse": float(history["test_mse"][-1]),
      "best_test_mse": float(np.nanmin(history["test_mse"])),
      "train_mse": float(history["train_mse"][-1]),
  }


def make_task(args: argparse.Namespace) -> rc.Task:
  """The task of ``args`` (``--quick``: 2 epochs).

  Its groups are the model's first grouping's; ``info`` holds every
  grouping (``groups``), the model's ``description`` and the data's
  ``source``.
  """
  x, y, source = load_california_housing()
  (xtr, ytr), (xte, yte) = train_test_split(x, y, 0.2, seed=0)
  xtr, xte = standardize(xtr, xte)
  init, predict, groups, description = make_model(args.model)

  def loss_fn(p, x, y):
    return jnp.mean((predict(p, x) - y) ** 2)

  return rc.Task(
      loss_fn, lambda p, x, y: {"mse": loss_fn(p, x, y)}, init,
      (xtr.astype(np.float32), ytr.astype(np.float32)),
      (xte.astype(np.float32), yte.astype(np.float32)),
      epochs=2 if args.quick else args.epochs, batch_size=args.batch_size,
      labels=next(iter(groups.values())),
      columns=[("test_mse", "final test MSE"), ("best_test_mse", "best test MSE"),
               ("train_mse", "final train MSE")],
      larger_is_better=False, summarise=summarise,
      info={"groups": groups, "description": description, "source": source},
  )


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  seeds = [0] if args.quick else list(range(args.seeds))
  task = make_task(args)
  epochs, steps = task.epochs, task.steps
  xtr, xte = task.train[0], task.test[0]
  description, source = task.info["description"], task.info["source"]
  entries = build_entries(args, steps, task.info["groups"])
  entries = rc.only_methods(entries, args.methods)
  runs = rc.run_seeds(
      entries, seeds, task.run, task.summarise, task.score, task.larger_is_better
  )
  table = rc.seeds_table(runs, task.columns)
  print(table)
  name = f"california_{args.model}" + ("_quick" if args.quick else "")
  figure = rc.rate_figure(entries, runs, args.out, name)
  body = f"""
California housing ({source}): {len(xtr)} train / {len(xte)} test rows (fixed 80/20
split), 8 standardised features, target in units of $100,000, squared loss. A
{description}, {epochs} epochs of batch {args.batch_size} ({steps} steps).
{len(seeds)} seed(s) (initialisation and batch order); mean ± std over seeds; time per run
(all grid points together) on {jax.devices()[0].device_kind}, compilation included.

Hi-DLR groupings: for the MLP (head) last layer vs rest, (bias) biases vs weights, (layer)
one group per layer; for the additive model (feature) one group per feature network plus
one for the bias. Hi-DLR / Hi-ULR: AdamW direction (weight decay {args.weight_decay}), initial
rate {args.lr} (untuned; the top of the paper's grid for this data set), Phi =
{args.update_every}, probes on an independently drawn mini-batch unless marked
"own-batch" ("{rc.LARGE_PROBE_BATCHES}x probe batch": on {rc.LARGE_PROBE_BATCHES} such mini-batches joined); "full fit" also probes every pair of groups moved together and steps by
A^-1 b (the paper's eq. 2.4) when A is positive definite. AdamW schedules (no warm-up; linear and cosine decay to 0): peak rate from
the grid {args.peaks}, picked by mean final test MSE over seeds (favours the baselines).
Prodigy and D-Adaptation: rate 1, same weight decay.

{table}

{rc.fit_section(runs)}
"""
  write_results(
      args.out, name, command_line(__file__, argv),
      f"California housing: {args.model.upper()} with Hi-DLR", body, figure,
  )
  return runs


if __name__ == "__main__":
  main()
