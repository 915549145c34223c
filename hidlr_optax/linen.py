"""Flax Linen support: a ``TrainState`` that forwards ``value_fn`` to Hi-DLR.

``flax.training.train_state.TrainState.apply_gradients`` calls
``tx.update(grads, opt_state, params)`` with no extra arguments, so it cannot
drive :func:`hidlr_optax.scale_by_hidlr`, whose ``update`` needs
``value_fn``. :class:`TrainState` here is a drop-in subclass whose
``apply_gradients`` takes ``value_fn`` (and the optional ``value``) and passes
them on. Importing this module needs ``flax``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

__all__ = ["TrainState"]


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` for Hi-DLR optimizers.

  Create it with ``TrainState.create(apply_fn=..., params=..., tx=...)`` as
  usual; only :meth:`apply_gradients` differs. It also works with optimizers
  that need no extra arguments (then ``value_fn`` is simply not used).

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, hidlr_optax
    >>> from hidlr_optax.linen import TrainState
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = TrainState.create(apply_fn=model.apply, params=params,
    ...     tx=hidlr_optax.hidlr(optax.scale_by_adam(), 1e-2, hidlr_optax.labels.bias_vs_weight()))
    >>> loss = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
    >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params), value_fn=loss)
    >>> int(state.step)
    1
  """

  def apply_gradients(
      self,
      *,
      grads: Any,
      value_fn: Union[Callable[[Any], jax.Array], None] = None,
      value: Union[jax.Array, None] = None,
      refresh: Union[bool, jax.Array, None] = None,
      **kwargs,
  ) -> "TrainState":
    """Updates ``step``, ``params`` and ``opt_state``, forwarding ``value_fn``.

    Args:
      grads: gradients with the structure of ``self.params``.
      value_fn: ``params -> scalar loss`` (``params`` with the structure of
        ``self.params``), built inside the training step; for mini-batch
        training it should evaluate a different batch from the gradient's.
      value: ``value_fn(self.params)`` if already known (saves one forward
        on refresh steps).
      refresh: Hi-DLR's ``refresh`` argument: ``None`` for its own schedule,
        a bool for the caller's (see :func:`hidlr_optax.scale_by_hidlr`).
      **kwargs: other attributes to ``replace``, as in Flax.

    Returns:
      The updated state.
    """
    extra = {} if value_fn is None else {"value_fn": value_fn, "value": value, "refresh": refresh}
    params = self.params
    fp8 = OVERWRITE_WITH_GRADIENT in grads  # Flax's fp8 bookkeeping, as in Flax.
    if fp8:
      overwrite = grads[OVERWRITE_WITH_GRADIENT]
      grads, params = grads["params"], params["params"]
      if value_fn is not None:
        extra["value_fn"] = lambda p: value_fn(
            {"params": p, OVERWRITE_WITH_GRADIENT: self.params[OVERWRITE_WITH_GRADIENT]}
        )
    updates, opt_state = self.tx.update(grads, self.opt_state, params, **extra)
    new_params = optax.apply_updates(params, updates)
    if fp8:
      new_params = {"params": new_params, OVERWRITE_WITH_GRADIENT: overwrite}
    return self.replace(
        step=self.step + 1, params=new_params, opt_state=opt_state, **kwargs
    )
