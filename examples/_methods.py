"""The optimizers the examples compare, one builder each.

A :class:`Method` is one row of a results table: how to build its optimizer
from a grid point, and how to evaluate it. The base direction of every row
comes from :func:`direction`, the learning-rate-free peers from
:func:`learning_rate_free`, and schedules from :func:`schedule`, so that
every example and benchmark configures a method the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

import hidlr_optax

Params = Any
MakeTx = Callable[[Any], optax.GradientTransformation]


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
  """

  name: str
  make_tx: MakeTx
  grid: Any = None
  eval_params: Optional[Callable[[Any, Params], Params]] = None
  hidlr: bool = False
  describe: Callable[[Any], str] = lambda hp: ""


def schedule_free_eval(state: Any, params: Params) -> Params:
  """Schedule-free AdamW's evaluation point ``x`` (its averaged iterate)."""
  return contrib.schedule_free_eval_params(state, params)


def direction(base: str, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """The base direction ``d`` (not negated): ``"sgd"``, ``"adam"`` or ``"adamw"``.

  ``"adamw"`` is ``m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` (optax's
  default decoupled weight decay ``1e-4`` unless given).
  """
  if base == "sgd":
    return optax.identity()
  if base == "adam":
    return optax.scale_by_adam()
  if base == "adamw":
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))
  raise ValueError(f"unknown base {base!r}")


#: The learning-rate-free peers of :func:`learning_rate_free`, by name.
PEERS = ("Prodigy", "D-Adaptation", "DoG", "Mechanic", "COCOB", "Schedule-free AdamW")


def learning_rate_free(
    base: str = "adamw",
    weight_decay: Optional[float] = None,
    names: Sequence[str] = PEERS,
) -> list[Method]:
  """optax's learning-rate-free optimizers, each at its documented defaults.

  Args:
    base: the direction Mechanic wraps (with rate 1: Mechanic learns the
      scale), as for :func:`direction`.
    weight_decay: given, every peer that takes one gets it (the real-data
      benchmarks' AdamW decay); ``None`` leaves each at its own default.
    names: which of :data:`PEERS`, in that order.

  Schedule-free AdamW is not learning-rate free; it runs at optax's default
  rate 0.0025 and is evaluated at its averaged iterate.
  """
  unknown = set(names) - set(PEERS)
  if unknown:
    raise ValueError(f"unknown peers {sorted(unknown)}; known: {PEERS}")
  decay = {} if weight_decay is None else {"weight_decay": weight_decay}
  builders = {
      "Prodigy": lambda: Method("Prodigy", lambda _: contrib.prodigy(**decay)),
      "D-Adaptation": lambda: Method(
          "D-Adaptation", lambda _: contrib.dadapt_adamw(**decay)
      ),
      "DoG": lambda: Method("DoG", lambda _: contrib.dog(**decay)),
      "Mechanic": lambda: Method(
          f"Mechanic ({base})",
          lambda _: contrib.mechanize(
              optax.chain(direction(base, **decay), optax.scale(-1.0))
          ),
      ),
      "COCOB": lambda: Method("COCOB", lambda _: contrib.cocob(**decay)),
      "Schedule-free AdamW": lambda: Method(
          "Schedule-free AdamW", lambda _: contrib.schedule_free_adamw(**decay),
          eval_params=schedule_free_eval,
      ),
  }
  return [builders[name]() for name in PEERS if name in names]


def schedule(
    kind: str, peak: float, steps: int, warmup_fraction: float = 0.0
) -> optax.Schedule:
  """``"constant"``, ``"linear"`` (to 0) or ``"cosine"`` (to 0), after a linear warm-up."""
  warmup = int(round(warmup_fraction * steps))
  decay_steps = max(steps - warmup, 1)
  main = {
      "constant": lambda: optax.constant_schedule(peak),
      "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
      "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
  }[kind]()
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


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
  """Hi-DLR (or Hi-ULR, GeN, with ``labels=None``) over ``direction(base)``."""
  return Method(
      name,
      lambda _: hidlr_optax.hidlr(direction(base), learning_rate, labels, **kwargs),
      hidlr=True,
  )


def hidlr_defaults(
    names: Sequence[str] = ("update_every", "smoothing", "min_r2", "accept", "max_growth", "joint_check"),
) -> str:
  """The core's current defaults of ``scale_by_hidlr``, for results files."""
  params = inspect.signature(hidlr_optax.scale_by_hidlr).parameters
  return ", ".join(f"{n}={params[n].default!r}" for n in names if n in params)


def grid_size(grid: Any) -> int:
  return int(jax.tree.leaves(grid)[0].shape[0])


def grid_point(grid: Any, i: int) -> Any:
  return jax.tree.map(lambda g: g[i], grid)
