"""Shared utilities of the example scripts.

Data loading, training loops (full-batch and mini-batch, with probes on a
fresh batch), the baseline optimizers, grid searches vectorised with
``jax.vmap``, result tables in markdown, and plotting helpers. Every script in
``examples/`` reproduces one experiment of Xu, Bu, Zhang & Barnett, *A
Hessian-informed hyperparameter optimization for differential learning rate*
(Hi-DLR).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from tqdm import tqdm

import hidlr_optax

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DATA_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

Params = Any
LossFn = Callable[..., jax.Array]
MakeTx = Callable[[Any], optax.GradientTransformationExtraArgs]


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
# Optimizers
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of a results table.

  Attributes:
    name: its name in tables and legends.
    make_tx: builds the optimizer from one grid point (``None`` without grid).
    grid: the hyperparameter grid (a pytree with a leading grid axis) or
      ``None``; grid points are trained together with ``jax.vmap``.
    eval_params: maps ``(opt_state, params)`` to the parameters to evaluate
      (schedule-free optimizers evaluate an average, not the iterate);
      ``None`` evaluates the iterate itself.
    hidlr: whether the method needs ``value_fn`` (Hi-DLR / Hi-ULR).
    describe: formats the hyperparameters of one grid point for the table.
    per_example: for Hi-DLR, give ``value_fn`` per-example losses (a vector
      over the probe batch: noise-aware fits, see
      :func:`hidlr_optax.scale_by_hidlr`) instead of their mean.
  """

  name: str
  make_tx: MakeTx
  grid: Any = None
  eval_params: Optional[Callable[[Any, Params], Params]] = None
  hidlr: bool = False
  describe: Callable[[Any], str] = lambda hp: ""
  per_example: bool = False


def per_example_losses(loss_fn: LossFn) -> LossFn:
  """``(params, x, y) -> (B,)``: ``loss_fn`` on each example alone.

  ``loss_fn`` is a mean over the batch's rows, so its value on one row is
  that row's loss (exact for losses that are means of per-row terms, as
  the benchmarks' are); the vector's mean is ``loss_fn(params, x, y)``.
  """
  def losses(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jax.vmap(lambda x1, y1: loss_fn(params, x1[None], y1[None]))(x, y)

  return losses


def _sf_eval(state, params):
  return contrib.schedule_free_eval_params(state, params)


def direction(base: str) -> optax.GradientTransformation:
  """The base direction ``d`` (not negated): ``"sgd"``, ``"adam"`` or ``"adamw"``.

  ``"adamw"`` adds optax's default decoupled weight decay ``1e-4 * w``.
  """
  if base == "sgd":
    return optax.identity()
  if base == "adam":
    return optax.scale_by_adam()
  if base == "adamw":
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))
  raise ValueError(f"unknown base {base!r}")


def learning_rate_free(base: str, quick: bool = False) -> list[Method]:
  """optax's learning-rate-free optimizers, each at its documented defaults.

  ``quick`` keeps only Prodigy (for the scripts' ``--quick`` runs, which
  exercise the code paths, not the comparison).

  Mechanic wraps the same base direction as Hi-DLR (with rate 1: Mechanic
  learns the scale). Schedule-free AdamW is not learning-rate free; it runs at
  optax's default rate 0.0025 and is evaluated at its averaged iterate.
  """
  methods = [
      Method("Prodigy", lambda _: contrib.prodigy()),
      Method("D-Adaptation AdamW", lambda _: contrib.dadapt_adamw()),
      Method("DoG", lambda _: contrib.dog()),
      Method(
          f"Mechanic ({base})",
          lambda _: contrib.mechanize(optax.chain(direction(base), optax.scale(-1.0))),
      ),
      Method("COCOB", lambda _: contrib.cocob()),
      Method(
          "Schedule-free AdamW",
          lambda _: contrib.schedule_free_adamw(),
          eval_params=_sf_eval,
      ),
  ]
  return methods[:1] if quick else methods


def uniform_grid(base: str, rates: Sequence[float], name: str = "ULR (best of grid)") -> Method:
  """The base optimizer with one constant learning rate, over a grid."""
  return Method(
      name,
      lambda lr: optax.chain(direction(base), optax.scale(-lr)),
      grid=jnp.asarray(rates, jnp.float32),
      describe=lambda lr: f"lr={float(lr):.3g}",
  )


def differential_grid(
    base: str, labels: Any, grid: Mapping[str, Sequence[float]], name: str = "DLR (best of grid)"
) -> Method:
  """Constant per-group learning rates over a grid (``{label: values}``).

  ``grid`` gives aligned 1-D arrays (one entry per grid point) for every
  label; use :func:`product_grid` for a full Cartesian product.
  """
  grid = {k: jnp.asarray(v, jnp.float32) for k, v in grid.items()}

  def make(rates):
    def by_group(label):
      return optax.chain(direction(base), optax.scale(-rates[label]))

    return optax.multi_transform({k: by_group(k) for k in rates}, labels)

  def describe(rates):
    return ", ".join(f"lr_{k}={float(v):.3g}" for k, v in rates.items())

  return Method(name, make, grid=grid, describe=describe)


def product_grid(**axes: Sequence[float]) -> dict[str, np.ndarray]:
  """Cartesian product of per-label value lists, flattened to aligned arrays."""
  mesh = np.meshgrid(*[np.asarray(v) for v in axes.values()], indexing="ij")
  return {k: m.ravel() for k, m in zip(axes, mesh)}


def hidlr_method(
    name: str, base: str, learning_rate: Any, labels: Any = None, **kwargs
) -> Method:
  """Hi-DLR (or Hi-ULR, GeN, with ``labels=None``) over ``base``."""
  return Method(
      name,
      lambda _: hidlr_optax.hidlr(direction(base), learning_rate, labels, **kwargs),
      hidlr=True,
  )


def hidlr_defaults(
    names: Sequence[str] = ("update_every", "smoothing", "min_r2", "accept", "max_growth", "joint_check"),
) -> str:
  """The core's current defaults of ``scale_by_hidlr``, for results files."""
  import inspect

  params = inspect.signature(hidlr_optax.scale_by_hidlr).parameters
  return ", ".join(f"{n}={params[n].default!r}" for n in names)


def grid_size(grid: Any) -> int:
  return int(jax.tree.leaves(grid)[0].shape[0])


def grid_point(grid: Any, i: int) -> Any:
  return jax.tree.map(lambda g: g[i], grid)


def _rates_of(state: Any) -> dict:
  states = hidlr_optax.find_states(state)
  return dict(states[0].learning_rates) if states else {}


# ----------------------------------------------------------------------------
# Full-batch training
# ----------------------------------------------------------------------------


def full_batch_run(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    method: Method,
    hp: Any,
    num_steps: int,
    eval_fn: Optional[Callable[[Params], jax.Array]] = None,
    record_params: bool = False,
) -> dict:
  """Runs ``num_steps`` full-batch steps with ``jax.lax.scan`` (jittable).

  Returns:
    ``loss`` and (with ``eval_fn``) ``test_loss`` at steps ``0..num_steps``
    (evaluated at ``method.eval_params``), ``lr`` = ``{label: rates (T,)}``
    for Hi-DLR methods, and ``params`` (steps ``0..T``) if ``record_params``.
  """
  tx = optax.with_extra_args_support(method.make_tx(hp))

  def measure(p, state, value=None):
    q = p if method.eval_params is None else method.eval_params(state, p)
    out = {"loss": loss_fn(q) if value is None or method.eval_params else value}
    if eval_fn is not None:
      out["test_loss"] = eval_fn(q)
    if record_params:
      out["params"] = p
    return out

  def step(carry, _):
    p, state = carry
    value, grads = jax.value_and_grad(loss_fn)(p)
    record = measure(p, state, value)
    updates, state = tx.update(grads, state, p, value_fn=loss_fn, value=value)
    p = optax.apply_updates(p, updates)
    record["lr"] = _rates_of(state)
    return (p, state), record

  state = tx.init(params)
  (p, state), records = jax.lax.scan(step, (params, state), None, length=num_steps)
  last = measure(p, state)
  lr = records.pop("lr")
  out = jax.tree.map(lambda r, x: jnp.concatenate([r, x[None]]), records, last)
  out["lr"] = lr
  return out


def train_full_batch(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    method: Method,
    num_steps: int,
    eval_fn: Optional[Callable[[Params], jax.Array]] = None,
    record_params: bool = False,
    chunk: int = 32,
) -> dict:
  """Trains ``method`` (all its grid points, vmapped in chunks) full-batch.

  Returns:
    :func:`full_batch_run`'s record, with a leading grid axis when the method
    has a grid, as NumPy arrays.
  """
  run = lambda hp: full_batch_run(
      loss_fn, params, method, hp, num_steps, eval_fn, record_params
  )
  if method.grid is None:
    return jax.device_get(jax.jit(run)(None))
  n = grid_size(method.grid)
  size = min(chunk, n)
  batched = jax.jit(jax.vmap(run))
  pieces = []
  for start in tqdm(range(0, n, size), desc=method.name, leave=False, disable=n <= size):
    idx = np.minimum(np.arange(start, start + size), n - 1)  # pad the last chunk
    pieces.append(jax.device_get(batched(jax.tree.map(lambda g: g[idx], method.grid))))
  out = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
  return jax.tree.map(lambda x: x[:n], out)


# ----------------------------------------------------------------------------
# Mini-batch training
# ----------------------------------------------------------------------------


#: Where Hi-DLR's probes look in :func:`minibatch_epoch` (its ``probe``).
PROBE_MODES = ("fresh", "same", "split")


def _batches(x: jax.Array, perm: jax.Array, batch_size: int) -> jax.Array:
  num = perm.shape[0] // batch_size
  return x[perm[: num * batch_size]].reshape(num, batch_size, *x.shape[1:])


def minibatch_epoch(
    loss_fn: LossFn,
    method: Method,
    hp: Any,
    params: Params,
    state: Any,
    data: tuple[jax.Array, jax.Array],
    perms: jax.Array,
    batch_size: int,
    probe: str,
) -> tuple[Params, Any, dict]:
  """One epoch of mini-batch steps, scanned (jittable, vmappable over ``hp``).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``.
    method: the optimizer.
    hp: its grid point (``None`` without a grid).
    params: current parameters.
    state: current optimizer state.
    data: ``(x, y)`` training arrays.
    perms: ``(1 + m, n)`` permutations: the gradient batches' order, then
      ``m`` independent orders whose batches are joined into each probe
      batch (``m`` mini-batches per probe batch).
    batch_size: mini-batch size (the last partial batch is dropped).
    probe: ``"fresh"``: Hi-DLR's ``value_fn`` evaluates a batch drawn
      independently of the gradient's batch (ALGORITHM.md section 6);
      ``"same"``: the gradient's own batch; ``"split"``: each mini-batch is
      cut in two, the gradient taken on its first half (``batch_size // 2``
      rows) and the probes on the rest, so the probes cost no rows beyond
      the batch but the gradient sees half of them.

  With ``method.per_example``, Hi-DLR's ``value_fn`` returns the probe
  batch's per-example losses (:func:`per_example_losses`); with
  ``probe="same"`` the losses at ``w`` are then evaluated with the probes
  (each example's change is measured from its own loss).

  Returns:
    New parameters, state and per-step records ``loss`` (the batch loss; of
    the gradient's half with ``probe="split"``) and ``lr`` (Hi-DLR rates,
    ``{}`` otherwise).
  """
  if probe not in PROBE_MODES:
    raise ValueError(f"probe must be one of {PROBE_MODES}, got {probe!r}")
  tx = optax.with_extra_args_support(method.make_tx(hp))
  x, y = data
  xs, ys = _batches(x, perms[0], batch_size), _batches(y, perms[0], batch_size)
  probe_batches = lambda a: jnp.concatenate(
      [_batches(a, perm, batch_size) for perm in perms[1:]], axis=1
  )
  px, py = probe_batches(x), probe_batches(y)
  probe_loss = per_example_losses(loss_fn) if method.per_example else loss_fn

  def step(carry, batch):
    p, s = carry
    xb, yb, xp, yp = batch
    if probe == "split":
      half = xb.shape[0] // 2
      xb, yb, xp, yp = xb[:half], yb[:half], xb[half:], yb[half:]
    value, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
    if probe == "same":
      extra = dict(value_fn=lambda q: probe_loss(q, xb, yb))
      if not method.per_example:
        extra["value"] = value
    else:
      extra = dict(value_fn=lambda q: probe_loss(q, xp, yp))
    updates, s = tx.update(grads, s, p, **extra)
    p = optax.apply_updates(p, updates)
    return (p, s), {"loss": value, "lr": _rates_of(s)}

  (params, state), records = jax.lax.scan(step, (params, state), (xs, ys, px, py))
  return params, state, records


def train_minibatch(
    loss_fn: LossFn,
    metrics_fn: Callable[[Params, jax.Array, jax.Array], dict],
    params: Params,
    method: Method,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    probe: str = "fresh",
    probe_batches: int = 1,
    evaluate_initial: bool = True,
) -> dict:
  """Trains ``method`` (all grid points vmapped) for ``epochs`` epochs.

  Every grid point and every method sees the same batches (same ``seed``).
  The data enter the compiled epoch as arguments, not as constants, so large
  datasets (e.g. cached transformer features) compile as fast as small ones.

  Args:
    loss_fn: ``(params, x, y) -> scalar``.
    metrics_fn: ``(params, x, y) -> {name: scalar}`` on a whole split.
    params: initial parameters.
    method: the optimizer (a grid method trains every point at once).
    train: ``(x, y)`` training arrays.
    test: ``(x, y)`` test arrays.
    epochs: passes over the training set.
    batch_size: mini-batch size (a last partial batch is dropped).
    seed: seed of the batch order.
    probe: where Hi-DLR's probes look (see :func:`minibatch_epoch`).
    probe_batches: with ``probe="fresh"``, how many mini-batches, each in an
      order of its own, make up one probe batch.
    evaluate_initial: whether to evaluate ``metrics_fn`` on the initial
      parameters too. An evaluation on both splits can cost as much as an
      epoch of training (a transformer on cached features), and the initial
      one is the same for every method of a seed; without it the metrics
      start after the first epoch.

  Returns:
    ``step_loss`` (mini-batch losses, ``(..., steps)``), ``lr`` (``{label:
    (..., steps)}``, empty for methods other than Hi-DLR), and for every key
    ``m`` of ``metrics_fn``: ``train_m`` and ``test_m`` after each epoch,
    epoch 0 being the initial parameters (with ``evaluate_initial``); NumPy
    arrays with a leading grid axis when the method has a grid. For Hi-DLR
    also ``num_accepted`` (``{label: count}``) and ``num_refreshes`` from the
    final state, and with ``method.per_example`` ``num_noisy`` (``{label:
    count}`` of noise-dominated refreshes).
  """

  def epoch(hp, p, s, data, perms):
    return minibatch_epoch(loss_fn, method, hp, p, s, data, perms, batch_size, probe)

  def evaluate(hp, p, s, tr, te):
    q = p if method.eval_params is None else method.eval_params(s, p)
    return {
        **{f"train_{k}": v for k, v in metrics_fn(q, *tr).items()},
        **{f"test_{k}": v for k, v in metrics_fn(q, *te).items()},
    }

  init = lambda hp, p: method.make_tx(hp).init(p)
  grid = method.grid
  p = params
  if grid is None:
    init, epoch, evaluate = jax.jit(init), jax.jit(epoch), jax.jit(evaluate)
  else:
    init = jax.jit(jax.vmap(init, in_axes=(0, None)))
    epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, None, None)))
    evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None, None)))
    p = jax.tree.map(lambda x: jnp.broadcast_to(x, (grid_size(grid),) + x.shape), params)
  train = tuple(jnp.asarray(a) for a in train)
  test = tuple(jnp.asarray(a) for a in test)
  s = init(grid, params)
  key = jax.random.key(seed)
  n = train[0].shape[0]
  evals = [jax.device_get(evaluate(grid, p, s, train, test))] if evaluate_initial else []
  steps = []
  for _ in tqdm(range(epochs), desc=method.name, leave=False):
    key, k1, k2 = jax.random.split(key, 3)
    probe_keys = [k2, *(jax.random.fold_in(k2, j) for j in range(1, probe_batches))]
    perms = jnp.stack([jax.random.permutation(k, n) for k in (k1, *probe_keys)])
    p, s, rec = epoch(grid, p, s, train, perms)
    steps.append(jax.device_get(rec))
    evals.append(jax.device_get(evaluate(grid, p, s, train, test)))
  axis = 0 if grid is None else 1
  out = jax.tree.map(lambda *xs: np.stack(xs, axis=axis), *evals)
  rec = jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *steps)
  out["step_loss"], out["lr"] = rec["loss"], rec["lr"]
  states = hidlr_optax.find_states(s)
  if states:
    out["num_accepted"] = jax.device_get(states[0].num_accepted)
    out["num_refreshes"] = jax.device_get(states[0].num_refreshes)
    if method.per_example:
      out["num_noisy"] = jax.device_get(states[0].num_noisy)
  return out


def diverged(train_loss: np.ndarray) -> bool:
  """Whether a run diverged: its final training loss is not finite or is above
  its initial one (``train_loss[0]``, recorded before the first step: a
  history of :func:`train_minibatch` needs ``evaluate_initial=True``)."""
  return bool(not np.isfinite(train_loss[-1]) or train_loss[-1] > train_loss[0])


def pick_best(history: dict, key: str, index: int = -1) -> int:
  """Index of the grid point with the lowest finite ``history[key][:, index]``."""
  values = np.asarray(history[key])[:, index]
  values = np.where(np.isfinite(values), values, np.inf)
  return int(np.argmin(values))


def select(history: dict, i: int) -> dict:
  """The record of grid point ``i``."""
  return jax.tree.map(lambda x: x[i], history)


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


def run_minibatch_methods(
    methods: Sequence[Method],
    loss_fn: LossFn,
    metrics_fn: Callable,
    params: Params,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    select_by: str = "test_loss",
    probes: Optional[Mapping[str, str]] = None,
) -> dict[str, dict]:
  """Trains every method; a grid method is reduced to its best point.

  Grid points are picked by the last value of ``select_by`` (the paper picks
  baselines on test data; Hi-DLR has no grid). ``probes`` maps a method name
  to ``"same"`` to probe on the gradient's batch (default ``"fresh"``).

  Returns:
    ``{name: record}`` with ``setting`` and ``seconds`` added; a grid method's
    record also has ``grid`` (every point's record) and ``grid_settings``.
  """
  out = {}
  for m in tqdm(methods, desc="methods"):
    with Timer() as timer:
      rec = train_minibatch(
          loss_fn, metrics_fn, params, m, train, test, epochs=epochs,
          batch_size=batch_size, seed=seed, probe=(probes or {}).get(m.name, "fresh"),
      )
    setting = ""
    if m.grid is not None:
      i = pick_best(rec, select_by)
      settings = [m.describe(grid_point(m.grid, j)) for j in range(grid_size(m.grid))]
      rec, setting = {**select(rec, i), "grid": rec, "grid_settings": settings}, settings[i]
    rec["setting"], rec["seconds"] = setting, timer.seconds
    out[m.name] = rec
  return out


def grid_rows(results: Mapping[str, dict], key: str) -> list[list]:
  """One row per grid point of every grid method: its last ``key`` value."""
  rows = []
  for name, r in results.items():
    if "grid" in r:
      values = np.asarray(r["grid"][key])[:, -1]
      rows += [[name, s, float(v)] for s, v in zip(r["grid_settings"], values)]
  return rows
