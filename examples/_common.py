"""Shared utilities of the example scripts: data, models and reporting.

Command-line flags and results files, data loading, small networks, result
tables in markdown, timing and plotting helpers. The compared optimizers are
in ``_methods.py``, the training loops (on :func:`hidlr_optax.make_train_step`)
in ``_training.py``. Every script in ``examples/`` reproduces one experiment
of Xu, Bu, Zhang & Barnett, *A Hessian-informed hyperparameter optimization
for differential learning rate* (Hi-DLR).
"""

from __future__ import annotations

import argparse
import gzip
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DATA_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"



# ----------------------------------------------------------------------------
# Command line and output files
# ----------------------------------------------------------------------------


def parse_args(
    description: str, argv: Optional[Sequence[str]] = None, **extra: tuple[Any, str]
) -> argparse.Namespace:
  """Parses the shared flags ``--quick``, ``--out``, ``--seed``.

  ``extra`` adds flags: ``name=(default, help)`` gives ``--name`` of the
  default's type.
  """
  parser = argparse.ArgumentParser(description=description)
  for name, (default, help_text) in extra.items():
    parser.add_argument(
        f"--{name.replace('_', '-')}", type=type(default), default=default, help=help_text
    )
  parser.add_argument(
      "--quick", action="store_true", help="a small run that finishes in under a minute"
  )
  parser.add_argument(
      "--out", type=Path, default=RESULTS_DIR, help="folder for the .md and .png results"
  )
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  return parser.parse_args(argv)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
  """The exact command that reproduces this run, from the repository root."""
  args = list(sys.argv[1:] if argv is None else argv)
  rel = Path(script).resolve().relative_to(REPO_ROOT)
  return shlex.join(["python", str(rel), *args])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Formats rows as a GitHub markdown table (floats in 4 significant digits)."""

  def cell(x):
    if isinstance(x, (float, np.floating)):
      return "nan" if not np.isfinite(x) else f"{x:.4g}"
    return str(x)

  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(
    out_dir: Path, name: str, command: str, title: str, body: str, figure: Optional[Path]
) -> Path:
  """Writes ``<out_dir>/<name>.md``, starting with the command that produced it."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.md"
  parts = [f"Command: `{command}`", "", f"# {title}", "", body.strip(), ""]
  if figure is not None:
    parts += [f"![{title}]({figure.name})", ""]
  path.write_text("\n".join(parts))
  return path


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def california_housing_files() -> list[Path]:
  """Where the shipped CSV copy of California housing may be, in order."""
  name = "california_housing.csv.gz"
  return [DATA_DIR / name, SHARED_DATA_DIR / name]


def _california_from_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Builds scikit-learn's 8 features from the raw CSV (see data/README.md).

  The 207 rows without ``total_bedrooms`` are imputed, not dropped:
  ``total_bedrooms = total_rooms * m`` with ``m`` the median ratio of bedrooms
  to rooms over the complete rows, so all 20,640 rows stay, as in
  scikit-learn's copy.
  """
  with gzip.open(path, "rt") as f:
    header = f.readline().strip().split(",")
    rows = [line.rstrip("\n").split(",") for line in f]
  col = {name: i for i, name in enumerate(header)}

  def column(name):
    return np.array([float(r[col[name]]) if r[col[name]] else np.nan for r in rows])

  rooms, bedrooms = column("total_rooms"), column("total_bedrooms")
  households, population = column("households"), column("population")
  missing = np.isnan(bedrooms)
  bedrooms[missing] = rooms[missing] * np.median(bedrooms[~missing] / rooms[~missing])
  x = np.stack(
      [
          column("median_income"),
          column("housing_median_age"),
          rooms / households,
          bedrooms / households,
          population,
          population / households,
          column("latitude"),
          column("longitude"),
      ],
      axis=1,
  )
  return x, column("median_house_value") / 1e5


def load_california_housing() -> tuple[np.ndarray, np.ndarray, str]:
  """California housing as ``(X (20640, 8), y, source)``.

  Reads the CSV shipped in ``data/`` (or ``../shared/data``), converted to
  scikit-learn's 8 features, so that every machine trains on the same rows
  whether or not it can reach the internet, and the results files reproduce
  from a checkout. Only without a shipped copy does it ask scikit-learn's
  ``fetch_california_housing`` (which needs the internet or its cache).
  """
  for path in california_housing_files():
    if path.exists():
      x, y = _california_from_csv(path)
      return x, y, f"shipped CSV {path.relative_to(path.parents[1])} (207 total_bedrooms imputed)"
  try:
    from sklearn.datasets import fetch_california_housing

    data = fetch_california_housing()
  except Exception as e:  # offline and nothing shipped
    raise FileNotFoundError(
        "California housing: no shipped copy was found at"
        f" {california_housing_files()} and scikit-learn could not fetch it ({e})"
    ) from e
  return data.data, data.target, "scikit-learn fetch_california_housing"


def train_test_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Random split into ``(x_train, y_train), (x_test, y_test)``."""
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  return (x[train], y[train]), (x[test], y[test])


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Standardises both with the training set's mean and standard deviation."""
  mean, std = train.mean(0), train.std(0)
  std = np.where(std > 0, std, 1.0)
  return (train - mean) / std, (test - mean) / std


# ----------------------------------------------------------------------------
# Timing and plots
# ----------------------------------------------------------------------------


class Timer:
  """Context manager measuring wall time in seconds (``.seconds``)."""

  def __enter__(self):
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._start


def method_colors(names: Sequence[str]) -> dict[str, Any]:
  """Fixed colours: Hi-DLR red, Hi-ULR blue, grids grey/black, others tab10."""
  import matplotlib.pyplot as plt

  tab10 = plt.get_cmap("tab10").colors
  others = [tab10[i] for i in (1, 2, 4, 5, 6, 8, 9)]  # no blue, red or grey
  fixed = {"Hi-DLR": "tab:red", "Hi-ULR": "tab:blue", "ULR": "0.45", "DLR": "black"}
  colors, k = {}, 0
  for name in names:
    prefix = next((p for p in fixed if name.startswith(p)), None)
    if prefix is not None and fixed[prefix] not in colors.values():
      colors[name] = fixed[prefix]
    else:
      colors[name] = others[k % len(others)]
      k += 1
  return colors


def plot_curves(
    ax, curves: Mapping[str, np.ndarray], title: str, xlabel: str, log: bool = True,
    x: Optional[np.ndarray] = None, skip: int = 0,
) -> None:
  """Plots one curve per method (Hi-DLR methods thicker)."""
  colors = method_colors(list(curves))
  for name, y in curves.items():
    y = np.asarray(y, dtype=float)
    xs = np.arange(len(y)) if x is None else x
    width = 2.2 if name.startswith("Hi-") else 1.2
    ax.plot(xs[skip:], y[skip:], label=name, color=colors[name], lw=width)
  if log:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel(xlabel)


def plot_rates(ax, rates: Mapping[str, np.ndarray], title: str, xlabel: str = "step") -> None:
  """Plots learning rates (one curve per label), log scale."""
  for label, r in rates.items():
    ax.plot(np.asarray(r), label=str(label))
  ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.legend(fontsize=7, ncol=1 + len(rates) // 8)


def save_figure(fig, out_dir: Path, name: str) -> Path:
  """Saves ``fig`` as ``<out_dir>/<name>.png`` and closes it."""
  import matplotlib.pyplot as plt

  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.png"
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path



# ----------------------------------------------------------------------------
# A small real data set and a deterministic mini-batch stream (framework,
# monitoring, checkpoint and sharding examples)
# ----------------------------------------------------------------------------


def load_digits(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline.

  Returns:
    ``(x_train, y_train), (x_test, y_test)``: standardised float32 pixels of
    shape ``(n, 64)`` and int32 labels.
  """
  from sklearn.datasets import load_digits as sklearn_digits

  data = sklearn_digits()
  (xtr, ytr), (xte, yte) = train_test_split(data.data, data.target, test_fraction, seed)
  xtr, xte = standardize(xtr, xte)
  return (
      (xtr.astype(np.float32), ytr.astype(np.int32)),
      (xte.astype(np.float32), yte.astype(np.int32)),
  )


def batch_at(
    data: tuple[np.ndarray, np.ndarray], step: int, batch_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Mini-batch number ``step`` of a reproducible stream over ``data``.

  Each epoch is a fresh permutation drawn from ``(seed, epoch)``, so batch
  ``step`` is the same whenever it is asked for (training resumed from a
  checkpoint sees the batches an uninterrupted run sees). Use
  ``batch_at(data, step + 1, ...)`` as the probe batch of Hi-DLR's
  ``value_fn``: a batch other than the gradient's.
  """
  x, y = data
  per_epoch = len(x) // batch_size
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(len(x))
  idx = perm[i * batch_size : (i + 1) * batch_size]
  return x[idx], y[idx]


# ----------------------------------------------------------------------------
# Small networks
# ----------------------------------------------------------------------------


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict]:
  """He-initialised dense layers ``sizes[0] -> ... -> sizes[-1]``."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      {
          "w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m),
          "b": jnp.zeros((n,)),
      }
      for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def mlp_apply(layers: Sequence[dict], x: jax.Array) -> jax.Array:
  """ReLU MLP; no activation after the last layer."""
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ layers[-1]["w"] + layers[-1]["b"]


# ----------------------------------------------------------------------------
# Result tables
# ----------------------------------------------------------------------------


def minibatch_rows(results: Mapping[str, dict], metrics: Sequence[str]) -> tuple[list, list]:
  """Header and rows of a mini-batch results table (final and best test values)."""
  header = ["method", "setting", "final train loss"]
  header += [f"final test {m}" for m in metrics] + ["best test loss", "seconds"]
  rows = []
  for name, r in results.items():
    row = [name, r["setting"], float(r["train_loss"][-1])]
    row += [float(r[f"test_{m}"][-1]) for m in metrics]
    row += [float(np.nanmin(r["test_loss"])), r["seconds"]]
    rows.append(row)
  return header, rows


def grid_rows(results: Mapping[str, dict], key: str) -> list[list]:
  """One row per grid point of every grid method: its last ``key`` value."""
  rows = []
  for name, r in results.items():
    if "grid" in r:
      values = np.asarray(r["grid"][key])[:, -1]
      rows += [[name, s, float(v)] for s, v in zip(r["grid_settings"], values)]
  return rows
