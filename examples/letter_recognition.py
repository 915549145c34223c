"""Letter recognition (26 classes, 16 features) with a 4-group Hi-DLR, untuned.

The shape of a small tabular classification task: UCI's Letter Recognition
(Frey & Slate, 1991; 20,000 rows of 16 integer features measured on images of
capital letters, 26 classes), the first 16,000 rows for training and the last
4,000 for testing (the split of the original paper), features standardised on
the training rows. A ReLU MLP 16 -> 256 -> 256 -> 26, softmax cross-entropy,
batch 128, 3 epochs. Hi-DLR on the AdamW direction with 4 groups (the three
weight matrices and all biases together), initial rate 1e-3 and its defaults
otherwise, with the probe batch drawn three ways (a fresh batch, the
gradient's own batch, the second half of a batch split in two) and a 4x fresh
probe batch; against Hi-ULR (GeN), Prodigy, D-Adaptation, AdamW at each
constant rate of {3e-4, 1e-3, 3e-3, 1e-2} and AdamW with linear / cosine
decay over the same peak grid.

Data: the Debian package ``r-cran-mlbench`` ships the set as an R data file
(``/usr/lib/R/site-library/mlbench/data/LetterRecognition.rda``, 160 kB);
the ``rdata`` package reads it without R. Or ``--data-file``. Run from the
repository root::

  python examples/letter_recognition.py             # the benchmark (5 seeds)
  python examples/letter_recognition.py --quick     # a smoke run (1 seed, 1 epoch)
  python examples/letter_recognition.py --hidlr-kwargs '{"joint_check": false}' \\
      --suffix _joint_off                          # Hi-DLR rows with other options
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import rdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line, markdown_table, mlp_apply, mlp_init, standardize, write_results,
)
from _methods import learning_rate_free  # noqa: E402
from _training import diverged  # noqa: E402
import _realdata_common as rc  # noqa: E402

DATA_FILE = Path("/usr/lib/R/site-library/mlbench/data/LetterRecognition.rda")
DATA_PACKAGE = "r-cran-mlbench"
SIZES = (16, 256, 256, 26)
TRAIN_ROWS = 16_000
#: The rates of the constant AdamW rows, and the peak grid of the schedules.
PEAKS = (3e-4, 1e-3, 3e-3, 1e-2)
#: Hi-DLR's groups: the three weight matrices, and every bias in one group.
GROUPS = [{"w": f"w{i + 1}", "b": "bias"} for i in range(len(SIZES) - 1)]


# ----------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------


def load_letters(path: Path = DATA_FILE) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """Letter Recognition as ``(x (n, 16) float, y (n,) int in 0..25, features, classes)``.

  ``path`` is mlbench's ``LetterRecognition.rda``: a data frame with the
  factor ``lettr`` (the class) and the 16 feature columns, in UCI's row order,
  read with ``rdata`` (R itself is not used).
  """
  if not Path(path).exists():
    raise FileNotFoundError(
        f"Letter Recognition not found at {path}: `apt-get install {DATA_PACKAGE}`"
        " (its R data file; R itself is not used) or pass --data-file"
    )
  objects = rdata.read_rda(path, default_encoding="ascii")
  frame = objects.get("LetterRecognition")
  if frame is None:
    frame = next(iter(objects.values()))
  target = frame["lettr"]
  features = [str(name) for name in frame.columns if name != "lettr"]
  x = frame[features].to_numpy(np.float64)
  y = np.asarray(target.cat.codes, np.int64)  # -1 for a missing class
  if np.any(y < 0) or np.any(~np.isfinite(x)):
    raise ValueError(f"{path}: missing values")
  return x, y, features, [str(c) for c in target.cat.categories]


def split_rows(
    x: np.ndarray, y: np.ndarray, train_rows: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The first ``train_rows`` rows for training, the rest for testing, as
  float32 features standardised with the training rows' mean and std."""
  xtr, xte = standardize(x[:train_rows], x[train_rows:])
  return (
      (xtr.astype(np.float32), y[:train_rows].astype(np.int32)),
      (xte.astype(np.float32), y[train_rows:].astype(np.int32)),
  )


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = rc.benchmark_parser(
      __doc__.splitlines()[0], quick_help="1 seed, 1 epoch", epochs=3, batch_size=128,
      lr=1e-3, peaks=PEAKS, update_every=8, weight_decay=1e-2,
  )
  p.set_defaults(seeds=5)
  p.add_argument("--data-file", type=Path, default=DATA_FILE, help="LetterRecognition.rda")
  p.add_argument("--train-rows", type=int, default=TRAIN_ROWS, help="the rest is the test set")
  p.add_argument(
      "--suffix", default="", help="appended to the results files' name, e.g. _joint_off"
  )
  return p.parse_args(argv)


def build_entries(args: argparse.Namespace, steps: int) -> list[rc.Entry]:
  """The compared rows (``--hidlr-kwargs`` reaches every Hi-DLR / Hi-ULR row)."""
  wd, lr = args.weight_decay, args.lr
  common = rc.hidlr_options(args, steps)
  hidlr = [
      rc.hidlr_entry("Hi-DLR, fresh-batch probes", lr, GROUPS, **common, probe="batch"),
      rc.hidlr_entry("Hi-DLR, same-batch probes", lr, GROUPS, **common, probe="same"),
      rc.hidlr_entry("Hi-DLR, split batch", lr, GROUPS, **common, probe="split"),
      rc.hidlr_entry(
          f"Hi-DLR, {rc.LARGE_PROBE_BATCHES}x probe batch", lr, GROUPS, **common,
          probe_batches=rc.LARGE_PROBE_BATCHES,
      ),
      rc.hidlr_entry("Hi-ULR (GeN)", lr, None, **common),
  ]
  schedules = [
      rc.scheduled_adamw(f"AdamW {kind}", kind, args.peaks, steps, weight_decay=wd)
      for kind in ("constant", "linear", "cosine")
  ]
  peers = [rc.Entry(m) for m in learning_rate_free(weight_decay=wd, names=rc.PEERS)]
  return [*hidlr, *peers, *schedules]


def summarise(history: Mapping[str, Any]) -> dict[str, float]:
  """Final test accuracy, test and train loss, and whether the run diverged."""
  out = rc.classification_summary(history)
  out["diverged"] = float(diverged(np.asarray(history["train_loss"])))
  return out


COLUMNS = [("train_loss", "train loss"), ("test_loss", "test loss"),
           ("test_accuracy", "test accuracy")]


def _row(metrics: Sequence[dict]) -> list[str]:
  cells = [rc.mean_std([m[key] for m in metrics]) for key, _ in COLUMNS]
  return [*cells, f"{int(sum(m['diverged'] for m in metrics))} / {len(metrics)}"]


def results_table(runs: Mapping[str, rc.SeedRuns]) -> str:
  """One row per method: mean ± std over seeds, diverged seeds, time per run."""
  header = ["method", "grid pick", *(t for _, t in COLUMNS), "diverged", "s / run"]
  rows = [
      [name, r.setting or "-", *_row(r.metrics), f"{np.mean(r.seconds):.1f}"]
      for name, r in runs.items()
  ]
  return markdown_table(header, rows)


def grid_table(runs: Mapping[str, rc.SeedRuns]) -> str:
  """Every grid point of the AdamW rows (each constant rate: plain Adam's tuning)."""
  header = ["method", "rate", *(t for _, t in COLUMNS), "diverged"]
  rows = [
      [name, setting, *_row(metrics)]
      for name, r in runs.items() for setting, metrics in r.grid_points
  ]
  return markdown_table(header, rows)


def layer_sizes(num_classes: int) -> tuple[int, ...]:
  """The MLP's widths, its output as wide as the data's classes (at least 26)."""
  return (SIZES[0], *SIZES[1:-1], max(SIZES[-1], num_classes))


def make_task(args: argparse.Namespace) -> rc.Task:
  """The task of ``args`` (``--quick``: 1 epoch); ``info`` holds the data
  file's number of ``rows``, the ``features``' and the ``classes``' names."""
  x, y, features, classes = load_letters(args.data_file)
  if len(features) != SIZES[0]:
    raise ValueError(f"{args.data_file}: {len(features)} features, {SIZES[0]} expected")
  train, test = split_rows(x, y, args.train_rows)
  sizes = layer_sizes(len(classes))

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y).mean()

  def metrics_fn(p, x, y):
    logits = mlp_apply(p, x)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
    }

  return rc.Task(
      loss_fn, metrics_fn, lambda seed: mlp_init(jax.random.key(seed), sizes), train, test,
      epochs=1 if args.quick else args.epochs, batch_size=args.batch_size, labels=GROUPS,
      columns=[("test_accuracy", "test accuracy"), *COLUMNS[:2]], larger_is_better=True,
      summarise=summarise, info={"rows": len(x), "features": features, "classes": classes},
  )


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  seeds = [0] if args.quick else list(range(args.seeds))
  task = make_task(args)
  rows, features, classes = (task.info[k] for k in ("rows", "features", "classes"))
  train, test, epochs, steps = task.train, task.test, task.epochs, task.steps
  sizes = layer_sizes(len(classes))
  entries = rc.only_methods(build_entries(args, steps), args.methods)
  runs = rc.run_seeds(entries, seeds, task.run, summarise, task.score)
  table, grid = results_table(runs), grid_table(runs)
  print(table)
  name = "letter_recognition" + args.suffix + ("_quick" if args.quick else "")
  figure = rc.rate_figure(entries, runs, args.out, name)
  options = {**rc.hidlr_options(args, steps), **args.hidlr_kwargs}  # as given
  extra = (
      f" Further Hi-DLR options from --hidlr-kwargs: `{args.hidlr_kwargs}`."
      if args.hidlr_kwargs else ""
  )
  half = args.batch_size // 2
  body = f"""
UCI Letter Recognition (Frey & Slate, 1991), read from the Debian package
{DATA_PACKAGE}'s `{args.data_file.name}` (R data file, no R needed): {rows} rows, {len(features)}
integer features, {len(classes)} classes; the first {len(train[0])} rows train, the last {len(test[0])} test
(the original paper's split), features standardised on the training rows. A ReLU MLP
{' -> '.join(map(str, sizes))}, softmax cross-entropy, {epochs} epoch(s) of batch {args.batch_size}
({steps} steps). {len(seeds)} seed(s) (initialisation and batch order); mean ± std over seeds
(std over seeds, ddof 0); "diverged": seeds whose final full-train loss is not finite or
above the initial one. Time per run (all grid points together) on
{jax.devices()[0].device_kind}, compilation included.

Hi-DLR: 4 groups (the three weight matrices w1, w2, w3; all biases together), AdamW
direction (weight decay {args.weight_decay}, on every parameter), initial rate {args.lr}
(untuned), Phi = {args.update_every}, scale_by_hidlr's defaults otherwise
(`{options}`).{extra} Probe batches: "fresh" (probe mode "batch") a
mini-batch of {args.batch_size} drawn independently of the gradient's; "same" the gradient's own
batch; "split" each batch of {args.batch_size} cut in two, the gradient on the first {half} rows and
the probes on the other {args.batch_size - half} (so the gradient sees half the rows of the others);
"{rc.LARGE_PROBE_BATCHES}x probe batch" {rc.LARGE_PROBE_BATCHES} fresh mini-batches joined. Hi-ULR (GeN): one group, fresh
probes. Prodigy and D-Adaptation: rate 1, same weight decay. AdamW (same direction and
weight decay), constant or decaying linearly / by a cosine to 0, no warm-up: rate or
peak from {list(args.peaks)}, the grid point picked by mean final test accuracy over
seeds (favours the baselines); the second table has every grid point.

{table}

Every grid point of the AdamW rows (constant: Adam at each rate of the grid, untuned
Hi-DLR's comparison).

{grid}

{rc.fit_section(runs)}
"""
  write_results(
      args.out, name, command_line(__file__, argv),
      "Letter recognition: 4-group Hi-DLR against tuned AdamW", body, figure,
  )
  return runs


if __name__ == "__main__":
  main()
