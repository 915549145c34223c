"""Gradient accumulation over micro-steps that probes once per real step.

``optax.MultiSteps(tx, k)`` calls ``tx.update`` on *every* micro-step, with the
gradients accumulated so far, and keeps the result only on the last one. For
Hi-DLR the state's count moves only when a result is kept, so a refresh step's
probes run on all ``k`` micro-steps of it: ``k`` times the loss evaluations
(40 ``value_fn`` calls instead of 10 at ``k = 4``), all but the last wasted.
:func:`multi_steps` wraps ``optax.MultiSteps`` so that the inner update, the
base optimizer's and the probes, runs only on the last micro-step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

# The extra argument by which the wrapper tells the gated inner update whether
# this micro-step is the last; the gate removes it before the inner update.
_LAST_MICRO_STEP = "_hidlr_optax_last_micro_step"

EveryK = Union[int, Callable[[jax.Array], Any]]


def _on_last_micro_step(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose update runs only when the extra argument says so.

  On other micro-steps it returns zero updates and the state unchanged, in a
  ``jax.lax.cond``, so that nothing of ``tx.update`` (``value_fn`` included)
  is evaluated there.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    last = extra_args.pop(_LAST_MICRO_STEP)
    run = lambda: tx.update(updates, state, params, **extra_args)
    out_updates, out_state = jax.eval_shape(run)

    def hold():
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_updates)
      kept = jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), state, out_state)
      return zeros, kept

    return jax.lax.cond(last, run, hold)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def multi_steps(
    tx: optax.GradientTransformation,
    every_k_schedule: EveryK,
    *,
    use_grad_mean: bool = True,
    should_skip_update_fn: Union[Callable[..., Any], None] = None,
    accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` whose inner update (and probes) runs once per real step.

  Accumulates the gradients of ``k`` micro-steps as ``optax.MultiSteps``
  does (same arguments, same ``optax.MultiStepsState``, zero updates on the
  first ``k - 1`` micro-steps), but calls ``tx.update`` only on the last
  micro-step of each real step, inside a ``jax.lax.cond``. So a Hi-DLR
  refresh evaluates ``value_fn`` as often as without accumulation, and the
  base optimizer's update too runs once per real step. Pass ``value_fn``
  (and any other extra argument) on every micro-step: it is traced each time
  but evaluated only on the last one, whose probe batch is the one used.

  Args:
    tx: the optimizer, e.g. ``hidlr_optax.hidlr(optax.scale_by_adam(), ...)``.
    every_k_schedule: the number of micro-steps per real step, an int or a
      function of the real-step count (as for ``optax.MultiSteps``).
    use_grad_mean: average the micro-steps' gradients (else sum them).
    should_skip_update_fn: as for ``optax.MultiSteps``: a rejected
      micro-step leaves the state as it was.
    accumulator_dtype: dtype of the accumulated gradients.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    ``optax.MultiStepsState`` (``hidlr_optax.find_states`` and the other
    accessors find the Hi-DLR state in it); ``update`` takes ``tx``'s extra
    arguments (``value_fn=``, ``value=``, ``refresh=``). A real step has
    ended when ``state.mini_step == 0``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, hidlr_optax
    >>> loss = lambda p, x: jnp.sum((p - x) ** 2)
    >>> tx = hidlr_optax.multi_steps(hidlr_optax.gen(optax.identity(), 0.1), 4)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for i in range(8):  # two real steps of 4 micro-steps
    ...   x = jnp.full(3, float(i))
    ...   grads = jax.grad(loss)(params, x)
    ...   updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, x))
    ...   params = optax.apply_updates(params, updates)
    >>> int(state.gradient_step), int(hidlr_optax.find_states(state)[0].count)
    (2, 2)
  """
  accumulate = optax.MultiSteps(
      _on_last_micro_step(tx), every_k_schedule,
      use_grad_mean=use_grad_mean, should_skip_update_fn=should_skip_update_fn,
      accumulator_dtype=accumulator_dtype,
  )
  every_k = every_k_schedule if callable(every_k_schedule) else lambda step: every_k_schedule

  def update_fn(updates, state, params=None, **extra_args):
    last = state.mini_step == every_k(state.gradient_step) - 1
    return accumulate.update(updates, state, params, **{_LAST_MICRO_STEP: last}, **extra_args)

  return optax.GradientTransformationExtraArgs(accumulate.init, update_fn)
