"""Watching Hi-DLR train: a tqdm bar, plots, and optional TensorBoard logs.

The jitted training step returns the loss together with Hi-DLR's state
readouts (:func:`hidlr_optax.learning_rates`, :func:`hidlr_optax.fit_diagnostics`
and the refresh counter); the loop fetches them from the device only every
``--log-every`` steps, in one transfer, so logging does not stall the step
pipeline. It shows

* a tqdm progress bar with the loss and every group's learning rate;
* at the end, a matplotlib figure: the loss, the learning rates, and the fit
  diagnostics of every refresh (``R^2``, and the fitted optimum
  ``eta* = b / A`` against the rate in use, accepted refreshes filled);
* with ``--tensorboard DIR`` the same scalars as TensorBoard event files,
  written with ``tensorboardX`` (``pip install tensorboardX``); view them
  with ``tensorboard --logdir DIR``.

An MLP on scikit-learn's digits, one group per layer
(:func:`hidlr_optax.labels.by_submodule`), Adam directions, probes on the
next mini-batch.

Run ``python examples/monitoring.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import _common as C
import hidlr_optax

#: Hi-DLR's acceptance threshold on a refresh's R^2 (its default).
MIN_R2 = 0.95


def init_params(seed: int, sizes: Sequence[int] = (64, 64, 64, 10)) -> dict:
  """An MLP ``{'layer_0': ..., 'layer_1': ..., 'head': ...}``."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  names = [f"layer_{i}" for i in range(len(sizes) - 2)] + ["head"]
  return {
      name: {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
      for name, k, a, b in zip(names, keys, sizes[:-1], sizes[1:])
  }


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  for name in sorted(k for k in params if k != "head"):
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def readout(loss: jax.Array, opt_state: Any) -> dict:
  """What the loop logs: the loss and Hi-DLR's state, as device arrays."""
  return {
      "loss": loss,
      "rates": hidlr_optax.learning_rates(opt_state),
      "fits": {k: f._asdict() for k, f in hidlr_optax.fit_diagnostics(opt_state).items()},
      "refreshes": hidlr_optax.find_states(opt_state)[0].num_refreshes,
  }


def stack_history(records: list[dict]) -> dict:
  """Per-step readouts (host copies) -> one array per quantity, steps first."""
  return jax.tree.map(lambda *xs: np.stack(xs), *records)


def refresh_steps(history: dict) -> np.ndarray:
  """Indices of the steps whose update refreshed the rates."""
  refreshes = history["refreshes"]
  return np.flatnonzero(np.diff(refreshes, prepend=0) > 0)


class TensorBoardLog:
  """Writes the readouts as TensorBoard scalars with ``tensorboardX``."""

  def __init__(self, logdir: Path):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as e:
      raise SystemExit("--tensorboard needs tensorboardX: pip install tensorboardX") from e
    self.writer = SummaryWriter(str(logdir))

  def write(self, step: int, record: dict, refreshed: bool) -> None:
    self.writer.add_scalar("loss", record["loss"], step)
    for label, rate in record["rates"].items():
      self.writer.add_scalar(f"learning_rate/{label}", rate, step)
    if refreshed:
      for label, fit in record["fits"].items():
        for name, value in fit.items():
          self.writer.add_scalar(f"fit/{name}/{label}", value, step)

  def close(self) -> None:
    self.writer.close()


def train(
    steps: int,
    *,
    log_every: int = 10,
    update_every: int = 4,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    tensorboard: Optional[Path] = None,
) -> dict:
  """Trains with a progress bar (and TensorBoard logs); returns the history.

  Returns:
    Per-step NumPy arrays: ``loss``, ``rates`` (``{label: (steps,)}``),
    ``fits`` (``{label: {field: (steps,)}}``, the last refresh's diagnostics
    after each step) and ``refreshes`` (cumulative count).
  """
  data = C.load_digits(seed)[0]
  params = init_params(seed)
  tx = hidlr_optax.hidlr(
      optax.scale_by_adam(), learning_rate, hidlr_optax.labels.by_submodule(),
      update_every=update_every, min_r2=MIN_R2,
  )
  train_step = hidlr_optax.make_train_step(
      lambda p, batch: loss_fn(p, *batch), tx, readout=readout
  )
  opt_state = tx.init(params)
  log = TensorBoardLog(tensorboard) if tensorboard is not None else None
  records, pending, seen_refreshes = [], [], 0
  with tqdm(total=steps, desc="Hi-DLR", unit="step") as bar:
    for step in range(steps):
      batch = C.batch_at(data, step, batch_size, seed)
      probe = C.batch_at(data, step + 1, batch_size, seed)
      params, opt_state, record = train_step(params, opt_state, batch, probe)
      pending.append(record)
      if len(pending) == log_every or step == steps - 1:
        fetched = jax.device_get(pending)  # one transfer per log_every steps
        first = step + 1 - len(fetched)
        for i, rec in enumerate(fetched):
          refreshed = int(rec["refreshes"]) > seen_refreshes
          seen_refreshes = int(rec["refreshes"])
          if log is not None:
            log.write(first + i, rec, refreshed)
        last = fetched[-1]
        bar.set_postfix(
            loss=f"{float(last['loss']):.4f}",
            **{f"lr_{k}": f"{float(v):.2e}" for k, v in last["rates"].items()},
        )
        bar.update(len(fetched))
        records.extend(fetched)
        pending = []
  if log is not None:
    log.close()
  return stack_history(records)


def plot(history: dict, path: Path, min_r2: float = MIN_R2) -> Path:
  """Loss, learning rates and fit diagnostics in one figure, saved to ``path``.

  ``min_r2`` (Hi-DLR's acceptance threshold) is drawn for reference.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.arange(len(history["loss"]))
  at = refresh_steps(history)
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  axes[0].plot(steps, history["loss"], lw=1)
  axes[0].set(title="training loss (mini-batch)", xlabel="step", yscale="log")
  colors = {}
  for label, rates in history["rates"].items():
    (line,) = axes[1].plot(steps, rates, label=str(label))
    colors[label] = line.get_color()
  axes[1].set(title="learning rate per group", xlabel="step", yscale="log")
  axes[1].legend(fontsize=8)
  for label, fit in history["fits"].items():
    color = colors[label]
    axes[2].plot(at, 1 - fit["r_squared"][at], "o-", ms=3, color=color, label=str(label))
    optimum = fit["slope"][at] / fit["curvature"][at]
    accepted = fit["accepted"][at].astype(bool)
    axes[3].plot(steps, history["rates"][label], lw=1, color=color, label=f"{label}: rate")
    axes[3].scatter(at[accepted], optimum[accepted], s=14, color=color)
    axes[3].scatter(at[~accepted], optimum[~accepted], s=14, facecolors="none", edgecolors=color)
  axes[2].axhline(1 - min_r2, color="0.5", ls="--", lw=1, label="1 - min_r2")
  axes[2].set(title="1 - R² of each refresh's fit", xlabel="step", yscale="log")
  axes[2].legend(fontsize=8)
  axes[3].set(title="fitted optimum b/A (dots; filled: accepted)", xlabel="step", yscale="log")
  axes[3].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Trains, saves the figure, and returns the history and the figure's path."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="40 steps instead of 400")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument(
      "--out", type=Path, default=Path(tempfile.gettempdir()) / "hidlr_monitoring",
      help="folder for monitoring.png",
  )
  parser.add_argument("--tensorboard", type=Path, default=None, help="log folder (tensorboardX)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  steps = args.steps or (40 if args.quick else 400)
  history = train(
      steps, log_every=args.log_every, seed=args.seed, tensorboard=args.tensorboard
  )
  figure = plot(history, args.out / "monitoring.png")
  final = {k: f"{v[-1]:.3g}" for k, v in history["rates"].items()}
  print(f"final rates {final}; {len(refresh_steps(history))} refreshes; figure: {figure}")
  if args.tensorboard is not None:
    print(f"TensorBoard logs: tensorboard --logdir {args.tensorboard}")
  return dict(history=history, figure=figure)


if __name__ == "__main__":
  main()
