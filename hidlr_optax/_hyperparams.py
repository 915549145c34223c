"""Finding and setting hyperparameters injected by ``optax.inject_hyperparams``.

``optax.inject_hyperparams`` keeps numeric hyperparameters as arrays in its
state, so that they change between steps without recompiling the step, but
only if the new value has the old one's type: ``jnp.asarray(0.5)`` is weakly
typed where the state holds a strong float32, and a step given it compiles
again. Inside ``optax.chain``, ``MultiSteps`` or an ``nnx.Optimizer`` the
state is also nested out of sight. :func:`set_hyperparams` finds every
injected state and sets values of the right type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hidlr_optax._state import ScaleByHiDLRState

# InjectHyperparamsState is optax's deprecated alias of the older layout.
_INJECTED = tuple(
    t for t in (
        getattr(optax, "InjectStatefulHyperparamsState", None),
        getattr(optax, "InjectHyperparamsState", None),
    ) if t is not None
)


def _is_injected(x: Any) -> bool:
  return isinstance(x, _INJECTED)


def _is_variable(x: Any) -> bool:
  """A framework container (a ``flax.nnx`` variable) holding an array."""
  return not isinstance(x, (jax.Array, np.ndarray)) and hasattr(x, "get_value")


def _unwrap(x: Any) -> Any:
  return x.get_value() if _is_variable(x) else x


def _injected_states(opt_state: Any) -> Iterator[Any]:
  """Every injected state in ``opt_state``, outer ones before those inside."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=_is_injected):
    if _is_injected(leaf):
      yield leaf
      yield from _injected_states(leaf.inner_state)


def find_hyperparams(opt_state: Any) -> list[dict[str, jax.Array]]:
  """Returns the injected hyperparameters of every ``inject_hyperparams`` state.

  Args:
    opt_state: any optimizer state (``optax.chain``, ``MultiSteps``,
      :func:`hidlr_optax.multi_steps`, ``flax.nnx.Optimizer.opt_state``).

  Returns:
    One ``{name: value}`` per injected state, in the order of the state's
    leaves (an outer state before those nested in it); ``flax.nnx``
    variables are unwrapped to their arrays.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> tx = optax.chain(optax.scale_by_adam(), optax.inject_hyperparams(
    ...     hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)(smoothing=0.9))
    >>> [h['smoothing'] for h in hidlr_optax.find_hyperparams(tx.init(jnp.zeros(3)))]
    [Array(0.9, dtype=float32)]
  """
  return [
      {name: _unwrap(value) for name, value in state.hyperparams.items()}
      for state in _injected_states(opt_state)
  ]


def _typed_like(old: Any, value: Any, name: str) -> Any:
  """``value`` with ``old``'s dtype, shape (broadcast), weak type, sharding
  and container, so that a step compiled for ``old`` takes it as it is."""
  if _is_variable(old):
    return old.replace(_typed_like(old.get_value(), value, name))
  if isinstance(old, (bool, int, float)):  # a Python scalar put there by hand
    return type(old)(value)
  dtype, shape = getattr(old, "dtype", None) or np.result_type(old), np.shape(old)
  new = jnp.asarray(value, dtype=dtype)
  if new.shape != shape:
    try:
      new = jnp.broadcast_to(new, shape)
    except ValueError:
      raise ValueError(
          f"set_hyperparams: {name!r} has shape {shape} in the state, the new"
          f" value has shape {new.shape}"
      ) from None
  concrete = isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer)
  if concrete and old.weak_type and new.ndim == 0:
    weak = jnp.asarray(new.item())  # a Python scalar: weakly typed
    new = weak if weak.dtype == dtype else new
  if concrete and old.committed:
    new = jax.device_put(new, old.sharding)
  return new


def _has_hidlr_directly(state: Any) -> bool:
  """Whether an injected state wraps ``scale_by_hidlr`` or ``hidlr`` itself."""
  inner = state.inner_state
  parts = inner if isinstance(inner, tuple) and not hasattr(inner, "_fields") else (inner,)
  return any(isinstance(p, ScaleByHiDLRState) for p in parts)


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
  """Sets injected hyperparameters wherever they are in ``opt_state``.

  Every ``optax.inject_hyperparams`` state (nested in ``optax.chain``,
  ``MultiSteps``, :func:`hidlr_optax.multi_steps`, ``optax.partition`` or a
  ``flax.nnx.Optimizer``'s state) that has one of the named hyperparameters
  gets the new value, built with the old value's dtype, shape, weak type and
  sharding (and ``nnx`` variable type), so that the jitted step does not
  compile again. Nothing is changed in place. The ``learning_rate`` of an
  injected ``scale_by_hidlr`` or ``hidlr`` is its initial rate, which only
  ``init`` reads: it is left as it is (and alone, an error).

  Args:
    opt_state: the optimizer state.
    **values: ``name=value`` for each hyperparameter to set.

  Returns:
    A new state with the values set. With ``flax.nnx``, assign it back:
    ``optimizer.opt_state = set_hyperparams(optimizer.opt_state, ...)``.

  Raises:
    ValueError: if ``opt_state`` holds no injected state or none has one of
      the names (the message lists the names there are), if a name is
      scheduled (``inject_hyperparams`` overwrites it at every update), if
      ``learning_rate`` is found only on Hi-DLR, or if a value's shape does
      not fit.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> tx = optax.chain(optax.scale_by_adam(), optax.inject_hyperparams(
    ...     hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)(smoothing=0.9))
    >>> state = hidlr_optax.set_hyperparams(tx.init(jnp.zeros(3)), smoothing=0.5)
    >>> [h['smoothing'] for h in hidlr_optax.find_hyperparams(state)]
    [Array(0.5, dtype=float32)]
  """
  found: set[str] = set()
  available: set[str] = set()
  initial_only: set[str] = set()

  def set_in(tree: Any) -> Any:
    def visit(x: Any) -> Any:
      if not _is_injected(x):
        return x
      hyperparams = dict(x.hyperparams)
      available.update(hyperparams)
      scheduled = getattr(x, "hyperparams_states", {})
      for name, value in values.items():
        if name not in hyperparams:
          continue
        if name in scheduled:
          raise ValueError(
              f"set_hyperparams: {name!r} is given to inject_hyperparams as a"
              " schedule, which sets it again at every update"
          )
        if name == "learning_rate" and _has_hidlr_directly(x):
          initial_only.add(name)  # Hi-DLR's initial rate: left as it is
          continue
        hyperparams[name] = _typed_like(hyperparams[name], value, name)
        found.add(name)
      return x._replace(hyperparams=hyperparams, inner_state=set_in(x.inner_state))

    return jax.tree.map(visit, tree, is_leaf=_is_injected)

  new_state = set_in(opt_state)
  missing = [name for name in values if name not in found]
  if any(name in initial_only for name in missing):
    raise ValueError(
        "set_hyperparams: the learning_rate of scale_by_hidlr / hidlr is the"
        " initial rate, read only by init; afterwards the rates live in the"
        " Hi-DLR state and are set by its fits"
    )
  if missing:
    where = (
        f"the injected ones are {sorted(available)}" if available
        else "it holds no optax.inject_hyperparams state (wrap the"
        " transformation: optax.inject_hyperparams(hidlr_optax.scale_by_hidlr,"
        " static_args=hidlr_optax.STATIC_ARGS)(...))"
    )
    raise ValueError(
        f"set_hyperparams: no injected hyperparameter {missing[0]!r} in"
        f" opt_state; {where}. Static arguments (hidlr_optax.STATIC_ARGS) and"
        " booleans are not in the state: change them by building a new optimizer."
    )
  return new_state
