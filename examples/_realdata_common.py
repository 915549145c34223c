"""Shared pieces of the real-data benchmarks (reviews, Fashion-MNIST, California).

Each benchmark compares, over several seeds, AdamW with hand-set schedules,
the learning-rate-free optimizers Prodigy (Mishchenko & Defazio, 2024) and
D-Adaptation (Defazio & Mishchenko, 2023), and Hi-ULR / Hi-DLR (Xu, Bu, Zhang
& Barnett) on the same AdamW direction. A script describes its task as a
:class:`Task` (data, model, loss, budget), trained by
:func:`_training.train_minibatch`; this module builds the methods, runs them
over seeds with timing, and writes the table and the learning-rate figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax

from _common import RESULTS_DIR, Timer, markdown_table, plot_rates, save_figure
from _methods import Method, direction, schedule
from _training import train_minibatch

Labels = Any
Params = Any
RateCurve = Callable[[np.ndarray, float], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Entry:
  """A method of a benchmark with how it is trained and plotted.

  Attributes:
    method: the optimizer (see :class:`_methods.Method`).
    probe: the probe mode of :func:`hidlr_optax.make_train_step`, ``"batch"``,
      ``"split"`` or ``"same"`` (the others ignore their probes).
    probe_batches: with ``probe="batch"``, the probe batch is this many
      mini-batches, drawn independently of the gradient's.
    rates: for a hand-set schedule, ``(steps, peak) -> {group: rate}`` for
      the plot;
      Hi-DLR's rates come from training, learning-rate-free methods have none.
  """

  method: Method
  probe: str = "batch"
  probe_batches: int = 1
  rates: Optional[RateCurve] = None

  @property
  def name(self) -> str:
    return self.method.name


@dataclasses.dataclass(frozen=True)
class Task:
  """A real-data task: its data, model, loss and training budget.

  Attributes:
    loss_fn: ``(params, x, y) -> scalar``, the training loss.
    metrics_fn: ``(params, x, y) -> {name: scalar}`` on a whole split.
    init: ``seed -> params``, the initialisation of a seed.
    train: ``(x, y)`` training arrays.
    test: ``(x, y)`` test arrays.
    epochs: passes over the training set.
    batch_size: mini-batch size.
    labels: Hi-DLR's groups (a label pytree) of the task's main grouping.
    columns: ``(metric key, column title)`` of the results tables, the first
      being the score that picks grid points.
    larger_is_better: whether a larger score is better.
    summarise: ``history -> {metric: value}`` of one run, with every key of
      ``columns``.
    evaluate_initial: whether the metrics include the initial parameters
      (see :func:`_training.train_minibatch`).
    info: what the script's report says of the data and model beyond these
      (e.g. the data's source), by name.
  """

  loss_fn: Callable[..., jax.Array]
  metrics_fn: Callable[..., dict]
  init: Callable[[int], Params]
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  epochs: int
  batch_size: int
  labels: Labels
  columns: Sequence[tuple[str, str]]
  larger_is_better: bool
  summarise: Callable[[Mapping[str, Any]], dict[str, float]]
  evaluate_initial: bool = True
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def steps(self) -> int:
    """Training steps of a run."""
    return self.epochs * (len(self.train[0]) // self.batch_size)

  @property
  def score(self) -> str:
    """The metric that picks grid points (the first column's)."""
    return self.columns[0][0]

  def run(self, entry: Entry, seed: int) -> dict:
    """Trains ``entry`` from seed ``seed``'s initialisation and batch order."""
    return train_minibatch(
        self.loss_fn, self.metrics_fn, self.init(seed), entry.method, self.train, self.test,
        epochs=self.epochs, batch_size=self.batch_size, seed=seed, probe=entry.probe,
        probe_batches=entry.probe_batches, evaluate_initial=self.evaluate_initial,
    )


def benchmark_parser(
    description: str,
    *,
    quick_help: str,
    epochs: int,
    batch_size: int,
    lr: float,
    peaks: Sequence[float],
    update_every: int,
    weight_decay: float,
) -> argparse.ArgumentParser:
  """The flags every real-data benchmark shares, with the script's defaults.

  A script adds its own flags to the returned parser.
  """
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help=quick_help)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=epochs)
  p.add_argument("--batch-size", type=int, default=batch_size)
  p.add_argument("--lr", type=float, default=lr, help="Hi-DLR / Hi-ULR initial rate")
  p.add_argument(
      "--peaks", type=float, nargs="+", default=list(peaks),
      help="grid of peak rates of the AdamW schedules (picked by the mean test score)",
  )
  p.add_argument("--update-every", type=int, default=update_every, help="Hi-DLR's Phi")
  p.add_argument("--weight-decay", type=float, default=weight_decay)
  p.add_argument(
      "--joint-check", action=argparse.BooleanOptionalAction, default=True,
      help="Hi-DLR's joint check (scale_by_hidlr(joint_check=...))",
  )
  p.add_argument(
      "--hidlr-kwargs", type=json_object, default={}, metavar="JSON",
      help="further keyword arguments of scale_by_hidlr for every Hi-DLR / Hi-ULR row,"
      """ as a JSON object, e.g. '{"joint_check": false}' (they override the flags above)""",
  )
  p.add_argument("--methods", nargs="+", default=None, help="run only these method names")
  p.add_argument("--out", type=Path, default=RESULTS_DIR)
  return p


def json_object(text: str) -> dict[str, Any]:
  """Parses ``--hidlr-kwargs``: a JSON object (``{}`` for none)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
  return value


def hidlr_options(args: argparse.Namespace, steps: Optional[int] = None) -> dict[str, Any]:
  """The keyword arguments every Hi-DLR row of a benchmark shares.

  Weight decay, ``update_every`` and ``joint_check`` from their flags, then
  ``--hidlr-kwargs`` (which wins over them), for :func:`hidlr_entry`. In
  ``--hidlr-kwargs``, ``"schedule"`` may name a decay of the applied step
  over the run's ``steps`` (``"linear"`` or ``"cosine"``, to 0).
  """
  base = dict(
      weight_decay=args.weight_decay, update_every=args.update_every,
      joint_check=args.joint_check,
  )
  options = {**base, **getattr(args, "hidlr_kwargs", {})}
  if isinstance(options.get("schedule"), str):
    if steps is None:
      raise ValueError("a named Hi-DLR schedule needs the run's number of steps")
    options["schedule"] = schedule(options["schedule"], 1.0, steps)
  return options


def scheduled_adamw(
    name: str,
    kind: str,
    peaks: Sequence[float],
    steps: int,
    *,
    weight_decay: float,
    warmup_fraction: float = 0.0,
    group_scales: Optional[Mapping[str, float]] = None,
    labels: Labels = None,
) -> Entry:
  """AdamW under a schedule, over a grid of peak rates (trained vmapped).

  ``group_scales`` multiplies the schedule per group (LoRA+'s fixed ratio).
  """
  unit = schedule(kind, 1.0, steps, warmup_fraction)
  scales = {"all": 1.0} if group_scales is None else dict(group_scales)

  def make(peak):
    def by_group(scale: float) -> optax.GradientTransformation:
      return optax.chain(
          direction("adamw", weight_decay),
          optax.scale_by_learning_rate(lambda t: scale * peak * unit(t)),
      )

    if group_scales is None:
      return by_group(1.0)
    return optax.multi_transform({g: by_group(s) for g, s in scales.items()}, labels)

  def rates(t: np.ndarray, peak: float) -> dict[str, np.ndarray]:
    base = peak * np.asarray([float(unit(int(i))) for i in t])
    return {g: s * base for g, s in scales.items()}

  method = Method(
      name, make, grid=jnp.asarray(peaks, jnp.float32),
      describe=lambda peak: f"peak {float(peak):.2g}",
  )
  return Entry(method, rates=rates)


def hidlr_entry(
    name: str,
    learning_rate: float,
    labels: Labels,
    *,
    weight_decay: float,
    update_every: int,
    probe: str = "batch",
    probe_batches: int = 1,
    **kwargs,
) -> Entry:
  """Hi-DLR (``labels=None``: Hi-ULR) on the AdamW direction.

  ``kwargs`` go to :func:`hidlr_optax.scale_by_hidlr` (e.g. ``fit="full"``).
  """
  make = lambda _: hidlr_optax.hidlr(
      direction("adamw", weight_decay), learning_rate, labels,
      update_every=update_every, **kwargs,
  )
  return Entry(Method(name, make, hidlr=True), probe=probe, probe_batches=probe_batches)


#: The learning-rate-free peers of the real-data benchmarks, at their default
#: rate 1 with the AdamW rows' weight decay (:func:`_methods.learning_rate_free`).
PEERS = ("Prodigy", "D-Adaptation")

#: The "4x probe batch" rows: each fresh probe batch joins this many
#: mini-batches, so the probes' loss values are less noisy than the
#: gradient's (at this many times the probe forwards' cost).
LARGE_PROBE_BATCHES = 4


@dataclasses.dataclass
class SeedRuns:
  """Results of one method over seeds.

  Attributes:
    metrics: one ``{metric: value}`` per seed (at the chosen grid point).
    seconds: wall-clock seconds per seed (all grid points together).
    history: the first seed's training record (at the chosen grid point).
    setting: the chosen grid point, described (``""`` without a grid).
    peak: the chosen grid value (``None`` without a grid).
    grid_points: with a grid, every point as ``(setting, metrics per seed)``,
      in grid order (empty without a grid).
  """

  metrics: list[dict]
  seconds: list[float]
  history: dict
  setting: str = ""
  peak: Optional[float] = None
  grid_points: list[tuple[str, list[dict]]] = dataclasses.field(default_factory=list)


def run_seeds(
    entries: Sequence[Entry],
    seeds: Sequence[int],
    train: Callable[[Entry, int], dict],
    summarise: Callable[[dict], dict[str, float]],
    select_by: str,
    larger_is_better: bool = True,
) -> dict[str, SeedRuns]:
  """Trains every entry for every seed, timing each run.

  A grid method trains all its grid points at once (vmapped) for every seed;
  the grid point with the best mean ``select_by`` over seeds is reported,
  the same point for every seed.

  Args:
    entries: the methods.
    seeds: the seeds.
    train: ``(entry, seed) -> history`` (a :func:`_training.train_minibatch`
      record), e.g. :meth:`Task.run`.
    summarise: ``history -> {metric: value}`` for one grid point.
    select_by: the metric that picks a grid point.
    larger_is_better: whether a larger ``select_by`` is better.

  Returns:
    ``{method name: SeedRuns}``.
  """
  out = {}
  for entry in entries:
    histories, seconds = [], []
    for seed in seeds:
      with Timer() as timer:
        histories.append(train(entry, seed))
      seconds.append(timer.seconds)
    grid = entry.method.grid
    if grid is None:
      out[entry.name] = SeedRuns([summarise(h) for h in histories], seconds, histories[0])
      continue
    points = [
        [summarise(jax.tree.map(lambda x: x[i], h)) for h in histories]
        for i in range(len(grid))
    ]
    means = np.asarray([np.mean([m[select_by] for m in p]) for p in points])
    means = np.where(np.isfinite(means), means, -np.inf if larger_is_better else np.inf)
    best = int(np.argmax(means) if larger_is_better else np.argmin(means))
    out[entry.name] = SeedRuns(
        points[best], seconds, jax.tree.map(lambda x: x[best], histories[0]),
        entry.method.describe(grid[best]), float(grid[best]),
        [(entry.method.describe(g), p) for g, p in zip(grid, points)],
    )
  return out


def mean_std(values: Sequence[float], digits: int = 4) -> str:
  """``"mean ± std"`` over seeds (std with ddof 0; just the value for one seed)."""
  v = np.asarray(values, dtype=float)
  if v.size == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def seeds_table(runs: Mapping[str, SeedRuns], columns: Sequence[tuple[str, str]]) -> str:
  """Markdown table: one row per method, ``mean ± std`` of each metric.

  Args:
    runs: per method, its :class:`SeedRuns`.
    columns: ``(metric key, column title)`` pairs.
  """
  header = ["method", "grid pick", *(title for _, title in columns), "s / run"]
  rows = []
  for name, r in runs.items():
    cells = [mean_std([m[key] for m in r.metrics]) for key, _ in columns]
    rows.append([name, r.setting or "-", *cells, f"{np.mean(r.seconds):.1f}"])
  return markdown_table(header, rows)


def only_methods(entries: Sequence[Entry], names: Optional[Sequence[str]]) -> list:
  """The entries named in ``names`` (``--methods``), or all when it is empty."""
  return [e for e in entries if not names or e.name in names]


def classification_summary(history: Mapping[str, Any]) -> dict[str, float]:
  """Final test accuracy, test loss and training loss of one run."""
  return {k: float(history[k][-1]) for k in ("test_accuracy", "test_loss", "train_loss")}


#: The columns of a classification task (:func:`classification_summary`'s keys).
CLASSIFICATION_COLUMNS = (
    ("test_accuracy", "test accuracy"), ("test_loss", "test loss"), ("train_loss", "train loss"),
)


def classification_table(runs: Mapping[str, SeedRuns]) -> str:
  """:func:`seeds_table` with test accuracy, test loss and train loss."""
  return seeds_table(runs, CLASSIFICATION_COLUMNS)


def fit_table(runs: Mapping[str, SeedRuns]) -> str:
  """Hi-DLR diagnostics of the first seed: final rate and accepted refreshes."""
  rows = []
  for name, r in runs.items():
    if "num_accepted" not in r.history:
      continue
    total = r.history["num_refreshes"]
    for label, count in r.history["num_accepted"].items():
      rate = float(np.asarray(r.history["lr"][label])[-1])
      rows.append([name, label, f"{rate:.3g}", f"{int(count)} / {total}"])
  return markdown_table(["method", "group", "final rate", "accepted refreshes"], rows)


def fit_section(runs: Mapping[str, SeedRuns]) -> str:
  """The results files' paragraph on Hi-DLR's fits, with :func:`fit_table`."""
  return (
      "Hi-DLR fit diagnostics, seed 0: the rate at the end and how many refreshes passed the\n"
      "acceptance rule (b > 0, A > 0, R^2 >= 0.95) for each group.\n\n" + fit_table(runs)
  )


def rate_figure(entries: Sequence[Entry], runs: Mapping[str, SeedRuns], out_dir, name: str):
  """One panel per method with rates: Hi-DLR's measured, schedules' set (None: no such method)."""
  import matplotlib.pyplot as plt

  panels = []
  for entry in entries:
    run = runs[entry.name]
    steps = np.asarray(run.history["step_loss"]).shape[-1]
    if entry.method.hidlr:
      panels.append((entry.name, {str(k): v for k, v in run.history["lr"].items()}))
    elif entry.rates is not None:
      panels.append((f"{entry.name} ({run.setting})", entry.rates(np.arange(steps), run.peak)))
  if not panels:
    return None
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, (title, rates) in zip(axes.ravel(), panels):
    plot_rates(ax, rates, title)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  return save_figure(fig, out_dir, name)
