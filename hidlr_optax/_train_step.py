"""Ready-made jitted training steps with the probe batch kept apart.

Hi-DLR's ``update`` needs ``value_fn``, built inside the training step. The
safe default is to probe on a *different* batch from the gradient's: on the
gradient's own batch ``b = G . d`` is biased upwards and the rates overshoot.
:func:`make_train_step` (plain JAX) and :func:`make_nnx_train_step`
(``flax.nnx``) build that step once, so that it need not be written by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import numpy as np
import optax

#: The probe modes of the builders: ``"batch"`` (a separate probe batch),
#: ``"split"`` (the second half of the batch) and ``"same"`` (the gradient's
#: batch, for full-batch problems).
PROBE_MODES = ("batch", "split", "same")


def _check_probe(probe: str) -> None:
  if probe not in PROBE_MODES:
    raise ValueError(f"probe must be one of {PROBE_MODES}, got {probe!r}")


def _split(batch: Any) -> tuple[Any, Any]:
  """Splits every leaf of ``batch`` along axis 0: ``(first half, the rest)``."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes or min(sizes) < 2:
    raise ValueError(
        'probe="split" needs a batch whose leaves share a leading axis of'
        f" length >= 2, got leading sizes {sorted(sizes, key=str)}"
    )
  half = sizes.pop() // 2
  return jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)


def _batches(probe: str, batch: Any, probe_batch: Any) -> tuple[Any, Any]:
  """The gradient's batch and the probe batch of one step."""
  if probe == "batch":
    if probe_batch is None:
      raise ValueError('probe="batch": pass the probe batch, step(..., batch, probe_batch)')
    return batch, probe_batch
  if probe_batch is not None:
    raise ValueError(f'probe="{probe}" takes no probe batch: step(..., batch)')
  return _split(batch) if probe == "split" else (batch, batch)


def _update_kwargs(
    probe: str, loss: jax.Array, grads: Any, refresh: Union[bool, None]
) -> dict[str, Any]:
  """``value=`` and ``grad=`` when the probes see the gradient's batch (one
  forward fewer; one gradient fewer for the secant estimator); the caller's
  ``refresh``."""
  kwargs: dict[str, Any] = {"value": loss, "grad": grads} if probe == "same" else {}
  if refresh is not None:
    kwargs["refresh"] = refresh
  return kwargs


def make_train_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    *,
    probe: str = "batch",
    readout: Optional[Callable[[jax.Array, Any], Any]] = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Builds the jitted Hi-DLR training step of a plain JAX model.

  The gradient is that of ``loss_fn(params, batch)``; ``value_fn`` evaluates
  ``loss_fn`` on the probe batch. ``tx`` is any optimizer whose ``update``
  takes ``value_fn`` (:func:`hidlr_optax.hidlr`, :func:`hidlr_optax.gen`,
  :func:`hidlr_optax.multi_steps` of them, ``optax.chain`` holding
  :func:`hidlr_optax.scale_by_hidlr`). Warm-up and decay belong to ``tx``
  (``scale_by_hidlr``'s ``schedule=``): the step only feeds it.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``; a batch is any pytree.
    tx: the optimizer.
    probe: where the probes evaluate the loss. ``"batch"`` (the default,
      the safe choice): on a separate probe batch, ``step(params, opt_state,
      batch, probe_batch)``. ``"split"``: when there is no second batch,
      ``step(params, opt_state, batch)`` takes the gradient from the first
      half of ``batch`` along axis 0 (``n // 2`` rows) and probes on the
      rest. ``"same"``: on the gradient's batch, passing the loss as
      ``value=`` (one forward fewer): for full-batch problems, for the
      recipe (``tx`` built with ``total_steps=``: the lift of own-batch fits,
      a linear decay and the loss guard), or with
      ``probe_direction="previous"`` (fits unbiased on the gradient's
      batch); otherwise own-batch rates overshoot on mini-batches.
    readout: ``(loss, new opt_state) -> pytree``, evaluated inside the
      jitted step, whose result the step returns in place of the loss:
      e.g. the loss with :func:`hidlr_optax.learning_rates` and
      :func:`hidlr_optax.fit_diagnostics` of the state, kept on the device
      until the caller fetches them.

  Returns:
    ``step(params, opt_state, batch[, probe_batch], *, refresh=None) ->
    (params, opt_state, loss)``, jitted, ``loss`` being the loss on the
    gradient's batch before the update (``readout(loss, opt_state)`` with
    ``readout``). ``refresh`` is static: ``None``
    leaves the refresh steps to Hi-DLR; a Python bool is the caller's
    schedule (e.g. ``refresh=step % 8 == 0``), compiling one program with
    the probes and one without.

  Raises:
    ValueError: for an unknown ``probe`` (at once); for a missing or
      unexpected probe batch, or a batch that cannot be split (when traced).

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> loss_fn = lambda p, batch: jnp.mean((batch @ p['w'] - 1.0) ** 2)
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-2)
    >>> step = hidlr_optax.make_train_step(loss_fn, tx)
    >>> params = {'w': jnp.zeros(3)}
    >>> opt_state = tx.init(params)
    >>> for i in range(20):
    ...   batch, probe_batch = jnp.full((8, 3), 1.0 + i % 3), jnp.full((8, 3), 2.0)
    ...   params, opt_state, loss = step(params, opt_state, batch, probe_batch)
    >>> bool(loss < 0.1)
    True
  """
  _check_probe(probe)

  def step(params, opt_state, batch, probe_batch=None, *, refresh=None):
    grad_batch, probe_batch = _batches(probe, batch, probe_batch)
    loss, grads = jax.value_and_grad(loss_fn)(params, grad_batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, probe_batch),
        **_update_kwargs(probe, loss, grads, refresh),
    )
    out = loss if readout is None else readout(loss, opt_state)
    return optax.apply_updates(params, updates), opt_state, out

  return jax.jit(step, static_argnames="refresh")


def make_nnx_train_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    probe: str = "batch",
) -> Callable[..., jax.Array]:
  """Builds the jitted Hi-DLR training step of a ``flax.nnx`` model.

  For an ``nnx.Optimizer(model, tx, wrt=...)`` whose ``tx`` takes
  ``value_fn``: the gradient is that of ``loss_fn(model, batch)`` with
  respect to the optimizer's ``wrt`` variables; ``value_fn`` merges the
  probed parameters back into the model (``nnx.split`` into graph,
  parameters and the rest, ``nnx.merge``) and evaluates ``loss_fn`` on the
  probe batch. Layers that update their state in ``loss_fn`` (``BatchNorm``
  in training mode) work: the rest is merged as arrays, and what the probes'
  forwards write is dropped. Needs ``flax``.

  Args:
    loss_fn: ``(model, batch) -> scalar loss``.
    probe: ``"batch"``, ``"split"`` or ``"same"``, as for
      :func:`make_train_step`.

  Returns:
    ``step(model, optimizer, batch[, probe_batch], *, refresh=None) -> loss``,
    an ``nnx.jit`` function that updates ``model`` and ``optimizer`` in
    place; ``refresh`` as for :func:`make_train_step`.

  Raises:
    ValueError: as for :func:`make_train_step`.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, hidlr_optax.gen(optax.scale_by_adam(), 1e-2), wrt=nnx.Param)
    >>> loss_fn = lambda model, batch: jnp.mean((model(batch[0]) - batch[1]) ** 2)
    >>> step = hidlr_optax.make_nnx_train_step(loss_fn, probe="split")
    >>> x = jnp.linspace(-1.0, 1.0, 48).reshape(16, 3)
    >>> losses = [float(step(model, optimizer, (x, x.sum(1, keepdims=True)))) for _ in range(30)]
    >>> bool(losses[-1] < losses[0] / 4)
    True
  """
  _check_probe(probe)
  from flax import nnx  # flax is optional: imported only here

  def step(model, optimizer, batch, probe_batch=None, *, refresh=None):
    grad_batch, probe_batch = _batches(probe, batch, probe_batch)
    graphdef, _, rest = nnx.split(model, optimizer.wrt, ...)
    # Arrays, not variables: merged inside the probes' own traces, a layer
    # that updates its state (BatchNorm in training) may do so there.
    rest = nnx.as_pure(rest)
    value_fn = lambda params: loss_fn(nnx.merge(graphdef, params, rest), probe_batch)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))
    loss, grads = grad_fn(model, grad_batch)
    optimizer.update(model, grads, value_fn=value_fn, **_update_kwargs(probe, loss, grads, refresh))
    return loss

  return nnx.jit(step, static_argnames="refresh")
