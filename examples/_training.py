"""The examples' training loops, on the package's public training step.

Every step is :func:`hidlr_optax.make_train_step`'s, scanned over an epoch
(mini-batch) or a run (full batch) with ``jax.lax.scan`` and vmapped over a
method's grid points: the examples train the way a user of the package
does, with its probe modes (``"batch"``, ``"split"``, ``"same"``). Methods
other than Hi-DLR take the same step; ``optax.with_extra_args_support``
lets them ignore ``value_fn``. A method without a grid builds its optimizer
once, outside any trace (as a user does); a grid method builds one per grid
point inside the vmapped function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hidlr_optax

from _common import Timer
from _methods import Method, grid_point, grid_size

Params = Any
LossFn = Callable[..., jax.Array]


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation, probe: str) -> Callable:
  """The package's jitted step for ``loss_fn(params, *batch)`` and ``tx``.

  Returns:
    :func:`hidlr_optax.make_train_step`'s ``step(params, opt_state, batch[,
    probe_batch])``, a batch being a tuple of arrays such as ``(x, y)``
    (``()`` for a full-batch ``loss_fn(params)``).
  """
  tx = optax.with_extra_args_support(tx)
  return hidlr_optax.make_train_step(lambda p, batch: loss_fn(p, *batch), tx, probe=probe)


def optimizers(method: Method) -> Callable[[Any], optax.GradientTransformation]:
  """``hp -> tx``: the method's optimizer at a grid point; without a grid,
  the one optimizer, built here, outside any trace."""
  if method.grid is not None:
    return method.make_tx
  tx = method.make_tx(None)
  return lambda _: tx


def rates_of(state: Any) -> dict:
  """Hi-DLR's current rates in ``state`` (``{}`` for other optimizers)."""
  states = hidlr_optax.find_states(state)
  return dict(states[0].learning_rates) if states else {}


# ----------------------------------------------------------------------------
# Full-batch training
# ----------------------------------------------------------------------------


def full_batch_run(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    method: Method,
    tx: optax.GradientTransformation,
    num_steps: int,
    eval_fn: Optional[Callable[[Params], jax.Array]] = None,
    record_params: bool = False,
) -> dict:
  """Runs ``num_steps`` full-batch steps of ``tx`` with ``jax.lax.scan`` (jittable).

  ``tx`` is ``method``'s optimizer (at a grid point). The probes see the
  full batch (``probe="same"``, the loss passed as ``value=``).

  Returns:
    ``loss`` and (with ``eval_fn``) ``test_loss`` at steps ``0..num_steps``
    (evaluated at ``method.eval_params``), ``lr`` = ``{label: rates (T,)}``
    for Hi-DLR methods, and ``params`` (steps ``0..T``) if ``record_params``.
  """
  step = train_step(loss_fn, tx, "same")  # batch (): loss_fn(p)

  def measure(p, state, value=None):
    q = p if method.eval_params is None else method.eval_params(state, p)
    out = {"loss": loss_fn(q) if value is None or method.eval_params else value}
    if eval_fn is not None:
      out["test_loss"] = eval_fn(q)
    if record_params:
      out["params"] = p
    return out

  def body(carry, _):
    p, state = carry
    new_p, new_state, value = step(p, state, ())
    record = measure(p, state, value)
    record["lr"] = rates_of(new_state)
    return (new_p, new_state), record

  state = tx.init(params)
  (p, state), records = jax.lax.scan(body, (params, state), None, length=num_steps)
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
  tx_at = optimizers(method)
  run = lambda hp: full_batch_run(
      loss_fn, params, method, tx_at(hp), num_steps, eval_fn, record_params
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


def _batches(x: jax.Array, perm: jax.Array, batch_size: int) -> jax.Array:
  num = perm.shape[0] // batch_size
  return x[perm[: num * batch_size]].reshape(num, batch_size, *x.shape[1:])


def minibatch_epoch(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Params,
    state: Any,
    data: tuple[jax.Array, jax.Array],
    perms: jax.Array,
    batch_size: int,
    probe: str,
) -> tuple[Params, Any, dict]:
  """One epoch of :func:`hidlr_optax.make_train_step` steps, scanned.

  Jittable, and vmappable over ``hp``.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``.
    tx: the optimizer.
    params: current parameters.
    state: current optimizer state.
    data: ``(x, y)`` training arrays.
    perms: ``(1 + m, n)`` permutations: the gradient batches' order, then
      ``m`` independent orders whose batches are joined into each probe
      batch (``m`` mini-batches per probe batch; used with ``"batch"``).
    batch_size: mini-batch size (the last partial batch is dropped).
    probe: the step's probe mode (:func:`hidlr_optax.make_train_step`'s):
      ``"batch"``, a probe batch drawn independently of the gradient's;
      ``"split"``, each mini-batch cut in two, the gradient on its first half
      (``batch_size // 2`` rows) and the probes on the rest; ``"same"``, the
      gradient's own batch.

  Returns:
    New parameters, state and per-step records ``loss`` (the batch loss; of
    the gradient's half with ``probe="split"``) and ``lr`` (Hi-DLR rates,
    ``{}`` otherwise).
  """
  step = train_step(loss_fn, tx, probe)
  x, y = data
  batches = (_batches(x, perms[0], batch_size), _batches(y, perms[0], batch_size))
  if probe == "batch":
    joined = lambda a: jnp.concatenate([_batches(a, p, batch_size) for p in perms[1:]], axis=1)
    probes = (joined(x), joined(y))
  else:
    probes = None

  def body(carry, batch):
    p, s = carry
    grad_batch, probe_batch = batch
    p, s, loss = step(p, s, grad_batch, probe_batch)
    return (p, s), {"loss": loss, "lr": rates_of(s)}

  (params, state), records = jax.lax.scan(body, (params, state), (batches, probes))
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
    probe: str = "batch",
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
    probe_batches: with ``probe="batch"``, how many mini-batches, each in an
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
    final state.
  """

  tx_at = optimizers(method)

  def epoch(hp, p, s, data, perms):
    return minibatch_epoch(loss_fn, tx_at(hp), p, s, data, perms, batch_size, probe)

  def evaluate(hp, p, s, tr, te):
    q = p if method.eval_params is None else method.eval_params(s, p)
    return {
        **{f"train_{k}": v for k, v in metrics_fn(q, *tr).items()},
        **{f"test_{k}": v for k, v in metrics_fn(q, *te).items()},
    }

  init = lambda hp, p: tx_at(hp).init(p)
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
  to its probe mode (default ``"batch"``).

  Returns:
    ``{name: record}`` with ``setting`` and ``seconds`` added; a grid method's
    record also has ``grid`` (every point's record) and ``grid_settings``.
  """
  out = {}
  for m in tqdm(methods, desc="methods"):
    with Timer() as timer:
      rec = train_minibatch(
          loss_fn, metrics_fn, params, m, train, test, epochs=epochs,
          batch_size=batch_size, seed=seed, probe=(probes or {}).get(m.name, "batch"),
      )
    setting = ""
    if m.grid is not None:
      i = pick_best(rec, select_by)
      settings = [m.describe(grid_point(m.grid, j)) for j in range(grid_size(m.grid))]
      rec, setting = {**select(rec, i), "grid": rec, "grid_settings": settings}, settings[i]
    rec["setting"], rec["seconds"] = setting, timer.seconds
    out[m.name] = rec
  return out
