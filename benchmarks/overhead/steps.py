"""What the overhead benchmark measures: the optimizer variants, their train
steps, and a model with its batches that builds and runs them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

import hidlr_optax
from hidlr_optax import _probe
from benchmarks import _models

#: The groups K and refresh period Phi of the headline table (Hi-DLR's defaults).
HEADLINE_K, HEADLINE_PHI = 2, 8
#: Probe batchings by name: ``probe_batch_size`` values.
BATCHINGS = {"vmap": None, "chunk1": 1, "chunk2": 2, "chunk4": 4}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer configuration; ``k=None`` is the base optimizer."""

  k: Union[int, None] = None
  estimator: str = "probe"
  batching: Union[str, None] = "auto"
  update_every: int = HEADLINE_PHI
  grouping: str = "layers"
  joint_check: bool = True
  reuse_value: bool = False  # probe the gradient's batch and pass value=loss, grad=grads
  refresh: Union[bool, None] = None  # None: Hi-DLR's own schedule; a bool: the caller's
  bare_cond: bool = False  # not Hi-DLR: Adam, then only a lax.cond on the direction
  bare_probes: int = 0  # with bare_cond: forwards in the cond's loop (0: one forward)
  bare_recompute: bool = False  # with bare_cond: the branch recomputes Adam's direction

  @property
  def is_base(self) -> bool:
    return self.k is None

  @property
  def probe_batch_size(self):
    return "auto" if self.batching == "auto" else BATCHINGS[self.batching]

  def label(self) -> str:
    if self.is_base:
      return "adam"
    return f"K={self.k} {self.estimator} {self.batching}" + (" grad=" if self.reuse_value else "")


BASE = Variant()


class BareCondState(NamedTuple):
  count: jax.Array


def bare_cond(update_every: int, probes: int = 0) -> optax.GradientTransformationExtraArgs:
  """The conditional alone: ``-1e-3 d``, with forwards along ``d`` inside a
  ``lax.cond`` every ``update_every`` steps (their values only rescale that
  step). Not an optimizer. With ``probes=0``, one forward at ``w - d``: what
  a conditional that takes the direction as an operand costs on the steps
  where it does not fire. With ``probes=n``, ``n`` forwards at ``w - v d``
  and one more at a point set by their values, all in one
  ``jax.lax.fori_loop``: the forwards of a Hi-DLR refresh with chunks of one
  probe (``4K + 1`` probes, the joint check) without its fit, rule or
  per-group state, to take apart its compile time. ``update(...,
  refresh=<Python bool>)`` fires or not without the conditional, as
  Hi-DLR's caller's schedule does."""

  def forwards(params, updates, value_fn):
    at = lambda v: value_fn(jax.tree.map(lambda p, d: p - v * d, params, updates))
    if probes == 0:
      return at(1.0)
    scales = jnp.linspace(-2.0, 2.0, probes)

    def body(i, losses):
      v = jnp.where(i < probes, scales[jnp.minimum(i, probes - 1)], jnp.mean(losses) * 1e-9)
      return losses.at[i].set(at(v))

    return jax.lax.fori_loop(0, probes + 1, body, jnp.zeros(probes + 1))[-1]

  def update(updates, state, params=None, *, value_fn, refresh=None, **extra_args):
    del extra_args
    fire = lambda: 1 + 0 * forwards(params, updates, value_fn)
    if refresh is None:
      factor = jax.lax.cond(state.count % update_every == 0, fire, lambda: jnp.ones(()))
    else:
      factor = fire() if refresh else jnp.ones(())
    return (jax.tree.map(lambda d: -1e-3 * factor * d, updates),
            BareCondState(optax.safe_increment(state.count)))

  return optax.GradientTransformationExtraArgs(
      lambda params: BareCondState(jnp.zeros((), jnp.int32)), update)


def bare_cond_recomputing(update_every: int) -> optax.GradientTransformationExtraArgs:
  """Like ``chain(scale_by_adam(), bare_cond(update_every))``, but the branch
  recomputes Adam's direction from the gradient and Adam's old state instead
  of taking the direction as an operand, and Adam's update is ordered after
  the conditional (its old state minus ``0 * factor``, exact for the finite
  ``factor >= 0`` here), so that XLA can update the donated state in place
  rather than copy it. Not an optimizer: it measures what taking the
  direction out of the conditional's operands would save and cost."""
  adam = optax.scale_by_adam()

  def init(params):
    return adam.init(params), BareCondState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, value_fn, **extra_args):
    del extra_args
    adam_state, cond_state = state

    def fire():
      direction, _ = adam.update(updates, adam_state, params)
      return 1 + 0 * value_fn(jax.tree.map(lambda p, d: p - d, params, direction))

    factor = jax.lax.cond(cond_state.count % update_every == 0, fire, lambda: jnp.ones(()))
    after = jax.tree.map(
        lambda x: x - 0 * factor.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        adam_state)
    direction, adam_state = adam.update(updates, after, params)
    return (jax.tree.map(lambda d: -1e-3 * factor * d, direction),
            (adam_state, BareCondState(optax.safe_increment(cond_state.count))))

  return optax.GradientTransformationExtraArgs(init, update)


def optimizer(model: _models.Model, v: Variant) -> optax.GradientTransformation:
  """The base Adam, or Hi-DLR over Adam's direction, at learning rate 1e-3."""
  if v.is_base:
    return optax.adam(1e-3)
  if v.bare_cond and v.bare_recompute:
    return bare_cond_recomputing(v.update_every)
  if v.bare_cond:
    return optax.chain(optax.scale_by_adam(), bare_cond(v.update_every, v.bare_probes))
  return hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-3, _models.group_labels(model, v.k, v.grouping),
      update_every=v.update_every, estimator=estimator(v), joint_check=v.joint_check,
  )


def estimator(v: Variant) -> Union[str, hidlr_optax.ProbeEstimator]:
  """The variant's estimator; the probe estimator with its batching (by
  name at the default batching, which cores before estimator objects read)."""
  if v.estimator != "probe" or v.batching == "auto":
    return v.estimator
  return hidlr_optax.ProbeEstimator(batch_size=v.probe_batch_size)


def train_step(model: _models.Model, tx, v: Variant) -> Callable:
  """A fresh (un-jitted) train step ``(params, state, frozen, batch, probe_batch)``."""

  def step(params, opt_state, frozen, batch, probe_batch):
    loss, grads = jax.value_and_grad(model.loss)(params, frozen, batch)
    if v.is_base:
      extra = {}
    elif v.reuse_value:
      extra = {"value_fn": lambda p: model.loss(p, frozen, batch), "value": loss, "grad": grads}
    else:
      extra = {"value_fn": lambda p: model.loss(p, frozen, probe_batch)}
    if not v.is_base:
      extra["refresh"] = v.refresh
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def with_count(opt_state: Any, count: int) -> Any:
  """Sets the Hi-DLR step counter (``count % Phi == 0`` refreshes)."""
  is_state = lambda x: isinstance(x, (hidlr_optax.ScaleByHiDLRState, BareCondState))
  return jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(count, jnp.int32)) if is_state(s) else s,
      opt_state, is_leaf=is_state,
  )


@dataclasses.dataclass
class Bench:
  """A model with its batches, ready to build and time steps."""

  model: _models.Model
  batch: Any
  probe_batch: Any
  cache: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, model: _models.Model) -> "Bench":
    k1, k2 = jax.random.split(jax.random.key(42))
    return cls(model, model.make_batch(k1), model.make_batch(k2))

  def args(self, opt_state):
    return (self.model.params, opt_state, self.model.frozen, self.batch, self.probe_batch)

  def lower(self, v: Variant, donate: bool = False):
    """``(lowered step, tx)``, traced and lowered afresh; ``donate`` donates
    params and state."""
    tx = optimizer(self.model, v)
    fn = jax.jit(train_step(self.model, tx, v), donate_argnums=(0, 1) if donate else ())
    return fn.lower(*self.args(tx.init(self.model.params))), tx

  def compile(self, v: Variant, donate: bool = False):
    """``(compiled step, tx)``, traced and compiled afresh."""
    lowered, tx = self.lower(v, donate)
    return lowered.compile(), tx

  def compiled(self, v: Variant):
    """Like :meth:`compile` (no donation), cached per variant."""
    if v not in self.cache:
      self.cache[v] = self.compile(v)
    return self.cache[v]

  def step_call(self, v: Variant, count: int = 0) -> Callable[[], Any]:
    """A thunk running one step from fixed inputs (state counter ``count``)."""
    step, tx = self.compiled(v)
    args = self.args(with_count(tx.init(self.model.params), count))
    return lambda: step(*args)

  def block_call(self, v: Variant, steps: int) -> Callable[[], Any]:
    """A thunk running ``steps`` consecutive steps from a refresh step; with
    ``v.refresh`` set, the caller's schedule: the ``refresh=True`` program
    first, then the ``refresh=False`` one."""
    if v.refresh is None:
      programs = [self.compiled(v)[0]] * steps
    else:
      programs = [self.compiled(dataclasses.replace(v, refresh=i == 0))[0]
                  for i in range(steps)]
    state0 = self.compiled(v)[1].init(self.model.params)
    m = self.model

    def run():
      params, state = m.params, state0
      for step in programs:
        params, state, loss = step(params, state, m.frozen, self.batch, self.probe_batch)
      return params, state, loss

    return run

  def forward_call(self) -> Callable[[], Any]:
    f = jax.jit(self.model.loss)
    return lambda: f(self.model.params, self.model.frozen, self.probe_batch)



def auto_batching() -> str:
  """What the probe estimator's ``batch_size="auto"`` resolves to here, as a batching name."""
  size = _probe.resolve_batch_size("auto")
  return next(name for name, value in BATCHINGS.items() if value == size)

