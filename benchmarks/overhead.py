r"""Speed, compile time and memory of Hi-DLR against its base optimizer.

Every time here is a ratio measured in one process, with the variants'
repetitions interleaved (round-robin, rotating the order) and medians taken,
because the machines are shared and noisy. A *speed ratio* is
``median_r(t_base[r] / t_variant[r])`` over the paired repetitions ``r``
(1.0 = as fast as the base step; the paper's "relative speed").

The train step is ``jax.value_and_grad`` + ``tx.update`` + ``apply_updates``,
jitted whole. The base optimizer is ``optax.adam``; Hi-DLR is
``hidlr_optax.hidlr(optax.scale_by_adam(), ...)`` with ``value_fn`` on a
*different* batch (the recommended use, ALGORITHM.md section 6), so a refresh
evaluates ``4K`` probes plus the origin ``L0``. Refresh and non-refresh steps
are selected through the state's ``count``.

Cost model (paper, Appendix C): base ``F + B + C``; Hi-DLR
``(1 + 4K/Phi) F + B + C``, so with ``B ~ 2F`` the relative speed is at least
``1 / (1 + 4K/(3 Phi))`` and with PEFT's ``B ~ F`` at least
``1 / (1 + 2K/Phi)``; the paper measured 0.81 at ``K = 2, Phi = 8``
(ViT-base, Table 4: 8.5 / 10.5 minutes per epoch).

Usage::

  nice -n 10 python -m benchmarks.overhead            # full CPU run (~30 min on 2 cores)
  python -m benchmarks.overhead --quick --out /tmp/o.md  # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax
from benchmarks import _models

PAPER_MEASURED = {(2, 8): 0.81}  # paper Table 4 (ViT-base, A100): 8.5 / 10.5
HEADLINE_K, HEADLINE_PHI = 2, 8
BATCHINGS = {"vmap": None, "chunk1": 1, "chunk2": 2, "chunk4": 4}


# --------------------------------------------------------------------------
# Steps.


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer configuration; ``k=None`` is the base optimizer."""

  k: Union[int, None] = None
  estimator: str = "probe"
  batching: Union[str, None] = "auto"
  update_every: int = HEADLINE_PHI
  grouping: str = "layers"
  joint_check: bool = True
  reuse_value: bool = False  # probe the gradient's batch and pass value=loss
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
    return f"K={self.k} {self.estimator} {self.batching}"


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
      update_every=v.update_every, estimator=v.estimator,
      probe_batch_size=v.probe_batch_size, joint_check=v.joint_check,
  )


def train_step(model: _models.Model, tx, v: Variant) -> Callable:
  """A fresh (un-jitted) train step ``(params, state, frozen, batch, probe_batch)``."""

  def step(params, opt_state, frozen, batch, probe_batch):
    loss, grads = jax.value_and_grad(model.loss)(params, frozen, batch)
    if v.is_base:
      extra = {}
    elif v.reuse_value:
      extra = {"value_fn": lambda p: model.loss(p, frozen, batch), "value": loss}
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


# --------------------------------------------------------------------------
# Timing.


CLOCK = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCK["wall"]


def interleaved(thunks: dict[str, Callable[[], Any]], reps: int) -> dict[str, np.ndarray]:
  """Times every thunk ``reps`` times, round-robin with a rotating order.

  ``clock`` is wall time, or with ``--clock process`` this process's CPU time
  (all threads), which other processes' load on a shared CPU disturbs less.
  """
  for thunk in thunks.values():
    for _ in range(2):
      jax.block_until_ready(thunk())
  names = list(thunks)
  times = {n: [] for n in names}
  for r in range(reps):
    shift = r % len(names)
    for n in names[shift:] + names[:shift]:
      t0 = clock()
      jax.block_until_ready(thunks[n]())
      times[n].append(clock() - t0)
  return {n: np.asarray(t) for n, t in times.items()}


def speed(times: dict[str, np.ndarray], name: str, base: str = "base") -> float:
  """Median over paired repetitions of ``t_base / t_name``."""
  return float(np.median(times[base] / times[name]))


def ms(t: np.ndarray) -> float:
  return float(np.median(t) * 1e3)


def bound_full(k: int, phi: int) -> float:
  """Paper's lower bound on the relative speed, full training (B ~ 2F)."""
  return 1 / (1 + 4 * k / (3 * phi))


def bound_peft(k: int, phi: int) -> float:
  """Paper's lower bound on the relative speed, PEFT (B ~ F)."""
  return 1 / (1 + 2 * k / phi)


def amortised(non_refresh: float, refresh: float, phi: int) -> float:
  """Speed ratio over ``Phi`` steps from per-step speed ratios."""
  return phi / ((phi - 1) / non_refresh + 1 / refresh)


# --------------------------------------------------------------------------
# Tables.


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def headline(bench: Bench, reps: int, phi: int = HEADLINE_PHI) -> tuple[str, dict]:
  """K = 2, Phi = 8, defaults: base, non-refresh, refresh, amortised, forward."""
  v = Variant(k=HEADLINE_K, update_every=phi)
  inter = dataclasses.replace(v, grouping="interleaved")
  no_joint = dataclasses.replace(v, joint_check=False)
  reuse = dataclasses.replace(v, reuse_value=True)
  caller = dataclasses.replace(v, refresh=False)
  vmapped = dataclasses.replace(v, batching="vmap")
  # 4 forwards (``bare_probes`` + 1) every Phi steps, no conditional: the
  # first group's probes alone, whose every forward runs the whole model.
  body_probes_only = dataclasses.replace(v, bare_cond=True, bare_probes=3, refresh=False)
  thunks = {
      "base": bench.step_call(BASE),
      "non-refresh": bench.step_call(v, count=1),
      "non-refresh, refresh=False": bench.step_call(caller),
      "bare cond, not firing": bench.step_call(dataclasses.replace(v, bare_cond=True), count=1),
      "bare cond recomputing, not firing": bench.step_call(
          dataclasses.replace(v, bare_cond=True, bare_recompute=True), count=1),
      "non-refresh, vmap": bench.step_call(vmapped, count=1),
      "refresh": bench.step_call(v, count=0),
      "refresh, vmap": bench.step_call(vmapped, count=0),
      "refresh, refresh=True": bench.step_call(dataclasses.replace(v, refresh=True)),
      "refresh, joint_check=False": bench.step_call(no_joint, count=0),
      "refresh, value= reused": bench.step_call(reuse, count=0),
      "base x Phi": bench.block_call(BASE, phi),
      "Hi-DLR x Phi": bench.block_call(v, phi),
      "Hi-DLR x Phi, caller's schedule": bench.block_call(caller, phi),
      "Hi-DLR x Phi, vmap": bench.block_call(vmapped, phi),
      "body probes only x Phi": bench.block_call(body_probes_only, phi),
      "refresh (interleaved groups)": bench.step_call(inter, count=0),
      "forward (probe batch)": bench.forward_call(),
  }
  t = interleaved(thunks, reps)
  non, ref = speed(t, "non-refresh"), speed(t, "refresh")
  direct = speed(t, "Hi-DLR x Phi", "base x Phi")
  fwd = ms(t["forward (probe batch)"])
  base = ms(t["base"])
  n_fwd = 4 * HEADLINE_K + 2  # probes, L0, the joint check
  no_joint_ref, reuse_ref = speed(t, "refresh, joint_check=False"), speed(t, "refresh, value= reused")
  caller_non = speed(t, "non-refresh, refresh=False")
  caller_ref = speed(t, "refresh, refresh=True")
  caller_direct = speed(t, "Hi-DLR x Phi, caller's schedule", "base x Phi")
  floor = speed(t, "body probes only x Phi", "base x Phi")
  rows = [
      ["base step (adam)", ms(t["base"]), 1.0, ""],
      ["Hi-DLR, step that does not refresh", ms(t["non-refresh"]), non, ">= 0.97"],
      ["  the same, refresh=False from the caller (no conditional)",
       ms(t["non-refresh, refresh=False"]), caller_non, ">= 0.97"],
      ["  the same, probes vmapped per group (probe_batch_size=None)",
       ms(t["non-refresh, vmap"]), speed(t, "non-refresh, vmap"), ">= 0.97"],
      ["  not Hi-DLR: Adam with only a lax.cond on its direction, not firing",
       ms(t["bare cond, not firing"]), speed(t, "bare cond, not firing"), ""],
      ["  not Hi-DLR: the same, the branch recomputing the direction (not an operand)",
       ms(t["bare cond recomputing, not firing"]), speed(t, "bare cond recomputing, not firing"),
       ""],
      ["Hi-DLR, refresh step", ms(t["refresh"]), ref, ""],
      ["  the same, refresh=True from the caller", ms(t["refresh, refresh=True"]), caller_ref, ""],
      ["  the same, probes vmapped per group", ms(t["refresh, vmap"]),
       speed(t, "refresh, vmap"), ""],
      ["Hi-DLR, refresh step, interleaved groups", ms(t["refresh (interleaved groups)"]),
       speed(t, "refresh (interleaved groups)"), ""],
      ["Hi-DLR, refresh step, joint_check=False (one forward fewer)",
       ms(t["refresh, joint_check=False"]), no_joint_ref, ""],
      ["Hi-DLR, refresh step, probes on the gradient's batch with value= (no L0 forward)",
       ms(t["refresh, value= reused"]), reuse_ref, ""],
      [f"Hi-DLR, amortised over Phi={phi} steps (measured block)",
       ms(t["Hi-DLR x Phi"]) / phi, direct, ">= 0.85"],
      ["  the same, the caller's schedule (measured block)",
       ms(t["Hi-DLR x Phi, caller's schedule"]) / phi, caller_direct, ">= 0.85"],
      ["  the same, probes vmapped per group (measured block)",
       ms(t["Hi-DLR x Phi, vmap"]) / phi, speed(t, "Hi-DLR x Phi, vmap", "base x Phi"),
       ">= 0.85"],
      ["  not Hi-DLR: Adam plus 4 forwards every Phi steps, no conditional (the first"
       " group's 4 probes alone, which move the first layer; the floor of a K = 2 probe"
       " refresh; measured block)", ms(t["body probes only x Phi"]) / phi, floor, ""],
      ["Hi-DLR, amortised (from the two step ratios)", "", amortised(non, ref, phi), ""],
      ["  the same, the caller's schedule", "", amortised(caller_non, caller_ref, phi), ""],
      ["  the same, joint_check=False", "", amortised(non, no_joint_ref, phi), ""],
      ["  the same, value= reused", "", amortised(non, reuse_ref, phi), ""],
      ["one forward on the probe batch (F)", fwd, "", ""],
      [f"cost model with measured F: base / (base + {n_fwd} F / Phi)", "",
       base / (base + n_fwd * fwd / phi), ""],
      ["paper's bound, full training: 1 / (1 + 4K/(3 Phi))", "", bound_full(HEADLINE_K, phi), ""],
      ["paper's bound, PEFT: 1 / (1 + 2K/Phi)", "", bound_peft(HEADLINE_K, phi), ""],
      ["paper's measurement (ViT-base, A100)", "", PAPER_MEASURED[(HEADLINE_K, phi)], ""],
  ]
  text = table(["what", "median ms", "speed ratio", "target"], rows)
  return text, {"non_refresh": non, "amortised": direct, "refresh": ref,
                "forward_ms": fwd, "base_ms": base, "non_refresh_caller": caller_non,
                "amortised_caller": caller_direct, "amortised_floor": floor}


def grid(bench: Bench, ks: Sequence[int], estimators: Sequence[str],
         batchings: Sequence[str], phis: Sequence[int], reps: int) -> str:
  """Step ratios for every (K, estimator, batching), amortised for every Phi."""
  variants = [Variant(k=k, estimator=e, batching=b)
              for k in ks for e in estimators for b in batchings]
  thunks = {"base": bench.step_call(BASE)}
  for v in variants:
    thunks[v.label() + " non"] = bench.step_call(v, count=1)
    thunks[v.label() + " ref"] = bench.step_call(v, count=0)
  t = interleaved(thunks, reps)
  peft = bench.model.name == "lora"
  rows = []
  for v in variants:
    non, ref = speed(t, v.label() + " non"), speed(t, v.label() + " ref")
    bound = bound_peft if peft else bound_full
    cells = [f"{amortised(non, ref, p):.2f} ({bound(v.k, p):.2f})" for p in phis]
    rows.append([v.k, v.estimator, v.batching, non, ref, *cells])
  header = ["K", "estimator", "probes", "non-refresh", "refresh"] + [f"Phi={p}" for p in phis]
  return (f"base step: {ms(t['base']):.1f} ms (median). Amortised speed ratio for each"
          f" Phi, with the paper's {'PEFT' if peft else 'full-training'} bound in"
          f" brackets.\n\n" + table(header, rows))


def batching_table(bench: Bench, reps: int, batchings: Sequence[str]) -> str:
  """Refresh-step cost for each probe batching (justifies ``'auto'``)."""
  thunks = {"base": bench.step_call(BASE)}
  for b in batchings:
    thunks[b] = bench.step_call(Variant(k=HEADLINE_K, batching=b), count=0)
  t = interleaved(thunks, reps)
  rows = [[b, ms(t[b]), speed(t, b)] for b in batchings]
  return table(["probe_batch_size", "refresh step ms", "speed ratio vs base"], rows)


def fault_table(bench: Bench, steps: int = 20) -> str:
  """Minor page faults per step (``getrusage`` of this process).

  A step's temporaries are one allocation sized for its largest branch; when
  that exceeds glibc's mmap ceiling (32 MiB) every call maps fresh pages and
  faults on each page it touches, a cost the base step does not pay.
  """
  v = Variant(k=HEADLINE_K)
  rows_of = {
      "base (adam)": (BASE, 0),
      f"Hi-DLR, step that does not refresh (default: auto = {_auto_batching()})": (v, 1),
      "Hi-DLR, step that does not refresh (vmap)":
          (dataclasses.replace(v, batching="vmap"), 1),
      "Hi-DLR, step that does not refresh (chunk1)":
          (dataclasses.replace(v, batching="chunk1"), 1),
      "Hi-DLR, refresh=False from the caller": (dataclasses.replace(v, refresh=False), 0),
      "not Hi-DLR: Adam with only a lax.cond on its direction, not firing":
          (dataclasses.replace(v, bare_cond=True), 1),
  }
  rows = []
  for name, (variant, count) in rows_of.items():
    thunk = bench.step_call(variant, count=count)
    for _ in range(2):
      jax.block_until_ready(thunk())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
      jax.block_until_ready(thunk())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    memory = bench.compiled(variant)[0].memory_analysis()
    temp = memory.temp_size_in_bytes / 2**20 if memory is not None else ""
    rows.append([name, (after - before) / steps, temp])
  return table(["step", "minor page faults per step", "temporaries MiB"], rows)


def compile_times(bench: Bench, variants: dict[str, Variant], reps: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
  """Trace + lower and XLA compile wall times of fresh steps, the variants'
  repetitions interleaved, after one untimed pass (JAX's own first-use costs).

  Returns:
    ``({name: seconds (reps, 2)}, {name: (fusions, distinct fusions)})``,
    the counts from the compiled HLO (see :func:`distinct_fusions`).
  """
  for v in variants.values():
    bench.lower(v)[0].compile()
  times = {n: [] for n in variants}
  kernels = {}
  for r in range(reps):
    for n, v in variants.items():
      t0 = time.perf_counter()
      lowered, _ = bench.lower(v)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      times[n].append((t1 - t0, time.perf_counter() - t1))
      if r == 0:  # the same program every repetition
        text = compiled.as_text()
        kernels[n] = (text.count(" fusion("), distinct_fusions(text))
  return {n: np.asarray(t) for n, t in times.items()}, kernels


_HLO_NAME = re.compile(r"%[\w.\-]+")


def distinct_fusions(hlo_text: str) -> int:
  """The number of fusions of an HLO module that differ in what they compute.

  Fusion bodies are compared with their names and metadata normalised away
  (names renumbered in order of appearance), and the computations a body
  calls (a reduction's ``to_apply``) compared by their own bodies. XLA:CPU
  compiles fusions with identical bodies once (:func:`fusion_compile_costs`
  measures both kinds), so compile time follows this count, not the number
  of fusions.
  """
  bodies: dict[str, list[str]] = {}
  name = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) \(", line)
    if head:
      name = head.group(1)
      bodies[name] = []
    elif line.strip() == "}":
      name = None
    elif name:
      bodies[name].append(re.sub(r", metadata=\{.*?\}(?=,|$)", "", line.strip()))

  def canonical(comp: str) -> str:
    local: dict[str, str] = {}

    def rename(m: re.Match) -> str:
      ref = m.group(0)
      if ref in bodies and ref != comp:
        return "{" + canonical(ref) + "}"
      return local.setdefault(ref, f"%{len(local)}")

    return "\n".join(_HLO_NAME.sub(rename, line) for line in bodies[comp])

  called = set(re.findall(r" fusion\(.*?calls=(%[\w.\-]+)", hlo_text))
  return len({canonical(c) for c in called})


def fusion_compile_costs(n: int = 16, reps: int = 5) -> tuple[float, float]:
  """XLA compile seconds per small fusion on this backend, ``(distinct,
  identical)``.

  Fresh programs with ``n`` outputs, each one fusion ``2 x_i + c_i`` of an
  input of its own: with a different constant ``c_i`` in every output
  (distinct bodies), and with the same one (identical bodies). Each count
  against a program with one such output: the difference of their median
  compile times over ``n - 1``.
  """

  def seconds(outputs: int, same: bool) -> float:
    times = []
    for r in range(reps):
      xs = [jnp.ones(100 + r)] * outputs  # a new shape each time: nothing cached
      body = lambda *xs: tuple(2 * x + (1.0 if same else i + 1.0) for i, x in enumerate(xs))
      lowered = jax.jit(body).lower(*xs)
      t0 = time.perf_counter()
      lowered.compile()
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

  one = seconds(1, True)
  distinct, identical = ((seconds(n, same) - one) / (n - 1) for same in (False, True))
  return distinct, identical


def compile_table(bench: Bench, reps: int) -> tuple[str, float]:
  """Trace + lower and XLA compile wall times, fresh functions, interleaved;
  the target is on their sum for Hi-DLR's default settings. The other rows
  take the compile time apart: Hi-DLR without its joint check or with one
  group, and conditionals holding only the forwards of a refresh."""
  probes = 4 * HEADLINE_K + 1
  default = Variant(k=HEADLINE_K, batching="chunk1")
  variants = {
      "base (adam)": BASE,
      "Hi-DLR vmap": Variant(k=HEADLINE_K, batching="vmap"),
      "Hi-DLR chunk1": default,
      "  the same, joint_check=False": dataclasses.replace(default, joint_check=False),
      "  the same, K = 1": dataclasses.replace(default, k=1),
      "not Hi-DLR: Adam with a lax.cond holding one forward": Variant(
          k=HEADLINE_K, bare_cond=True),
      f"not Hi-DLR: Adam with a lax.cond holding a refresh's forwards only ({probes},"
      " then one more set by their values, in one fori_loop), no fit, rule or state": Variant(
          k=HEADLINE_K, bare_cond=True, bare_probes=probes),
  }
  targeted = f"Hi-DLR {_auto_batching()}"  # the default settings on this backend
  times, kernels = compile_times(bench, variants, reps)
  totals = {n: float(np.median(ts.sum(axis=1))) for n, ts in times.items()}
  xla = {n: float(np.median(ts[:, 1])) for n, ts in times.items()}
  base = "base (adam)"
  rows = []
  for n, ts in times.items():
    fusions, distinct = kernels[n]
    added = distinct - kernels[base][1]
    per_added = (xla[n] - xla[base]) / added * 1e3 if added > 0 else ""
    rows.append([n, float(np.median(ts[:, 0])), xla[n], totals[n], totals[n] / totals[base],
                 fusions, distinct, per_added])
  default_ratio = next(r[4] for r in rows if r[0] == targeted)
  header = ["step", "trace + lower s", "XLA compile s", "total s (median)",
            "ratio to base (target <= 2)", "fusions in the compiled HLO",
            "distinct fusions", "XLA ms per distinct fusion added to the base's"]
  distinct_cost, identical_cost = fusion_compile_costs()
  note = (f"XLA:CPU compiles each distinct fusion as a kernel of its own, and identical"
          f" ones once: {distinct_cost * 1e3:.1f} ms per added fusion with a body of its"
          f" own, {identical_cost * 1e3:.1f} ms per added copy of the same body (programs of"
          " 16 small fusions against one; `fusion_compile_costs`). So compile time follows"
          " the distinct fusions (`distinct_fusions`: bodies compared with names and metadata"
          " normalised away), however little each computes; the last column divides each"
          " step's extra XLA time by the distinct fusions it adds to the base's.")
  return table(header, rows) + "\n\n" + note, default_ratio


MEMORY_VARIANTS = {
    "base (adam)": BASE,
    "Hi-DLR vmap": Variant(k=HEADLINE_K, batching="vmap"),
    "Hi-DLR chunk1 (probe_batch_size=1)": Variant(k=HEADLINE_K, batching="chunk1"),
    "Hi-DLR chunk1, interleaved groups": Variant(
        k=HEADLINE_K, batching="chunk1", grouping="interleaved"),
    "Hi-DLR chunk1, probes on the gradient's batch (value= its loss)": Variant(
        k=HEADLINE_K, batching="chunk1", reuse_value=True),
    "not Hi-DLR: Adam with a lax.cond on its direction (one forward)": Variant(
        k=HEADLINE_K, bare_cond=True),
    "not Hi-DLR: the same, the branch recomputing the direction": Variant(
        k=HEADLINE_K, bare_cond=True, bare_recompute=True),
}
#: XLA:CPU's default scheduler orders a program for concurrency; this flag
#: makes it order for the smallest memory instead.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def tree_bytes(tree: Any) -> int:
  """Bytes of a pytree's array leaves."""
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def peak_bytes(compiled) -> int:
  """Peak memory of a compiled step by XLA's buffer assignment: arguments +
  outputs - aliased (donated) + temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def memory_sizes(bench: Bench, names: Sequence[str] = tuple(MEMORY_VARIANTS)
                 ) -> dict[str, Any]:
  """Buffer sizes in bytes by XLA's buffer assignment (deterministic).

  For each of the named :data:`MEMORY_VARIANTS`, the donated step's
  ``(arguments, temporaries, peak)``; under ``"moved forward"``, the
  temporaries of one probe forward compiled alone: the loss at ``w - c d``
  for a traced scalar ``c``, every leaf moved, i.e. the moved leaves and
  the activations that a chunk-of-1 probe holds, as XLA schedules them.
  """
  sizes = {}
  for n in names:
    step = bench.compile(MEMORY_VARIANTS[n], donate=True)[0]
    analysis = step.memory_analysis()
    sizes[n] = (analysis.argument_size_in_bytes, analysis.temp_size_in_bytes, peak_bytes(step))

  model = bench.model

  def moved_forward(params, directions, c, frozen, batch):
    moved = jax.tree.map(lambda p, d: p - c * d, params, directions)
    return model.loss(moved, frozen, batch)

  compiled = jax.jit(moved_forward).lower(
      model.params, model.params, jnp.float32(1e-3), model.frozen, bench.probe_batch).compile()
  sizes["moved forward"] = compiled.memory_analysis().temp_size_in_bytes
  return sizes


def memory_table(bench: Bench, device_peaks: bool, quick: bool) -> tuple[str, dict]:
  """XLA's buffer assignment of the donated step (deterministic); on CPU
  also under the memory-minimising scheduler, compiled in a child process
  (``quick``: the tiny model there too)."""
  sizes = memory_sizes(bench)
  low = None
  if jax.default_backend() == "cpu":
    low = _memory_minimising_sizes(bench.model.name, quick)
  base_peak = sizes["base (adam)"][2]
  rows = []
  for n, v in MEMORY_VARIANTS.items():
    args, temps, peak = sizes[n]
    row = [n, args / 2**20, temps / 2**20, peak / 2**20, peak / base_peak]
    if low:
      row += [low[n][2] / 2**20, low[n][2] / low["base (adam)"][2]]
    if device_peaks:
      row.append(_device_peak(bench.model.name, v) / 2**20)
    rows.append(row)
  header = ["step", "arguments MiB", "temporaries MiB", "peak MiB", "peak / base"]
  if low:
    header += ["peak MiB, memory-minimising scheduler", "peak / base, same scheduler"]
  if device_peaks:
    header.append("device peak_bytes_in_use MiB (own process)")
  text = table(header, rows) + "\n\n" + _memory_floor_text(bench, sizes, "default scheduler")
  if low:
    text += "\n\n" + _memory_floor_text(bench, low, f"`XLA_FLAGS={MEMORY_SCHEDULER_FLAG}`")
  ratios = {"memory_chunk1": sizes["Hi-DLR chunk1 (probe_batch_size=1)"][2] / base_peak,
            "memory_floor": memory_floor(bench, sizes) / base_peak}
  return text, ratios


def memory_floor(bench: Bench, sizes: dict[str, Any]) -> int:
  """What a step that probes on a batch of its own holds during a probe, by
  this decomposition: the base step's arguments, the probe batch, the
  direction (live until the update) and the temporaries of one probe
  forward compiled alone (:func:`memory_sizes`)."""
  return (sizes["base (adam)"][0] + tree_bytes(bench.probe_batch)
          + tree_bytes(bench.model.params) + sizes["moved forward"])


def _memory_floor_text(bench: Bench, sizes: dict[str, Any], scheduler: str) -> str:
  """:func:`memory_floor` taken apart, and how far Hi-DLR's peak is from it."""
  base_args, base_peak = sizes["base (adam)"][0], sizes["base (adam)"][2]
  batch = tree_bytes(bench.probe_batch)
  floor = memory_floor(bench, sizes)
  chunk1 = sizes["Hi-DLR chunk1 (probe_batch_size=1)"][2]
  larger = max(floor, base_peak + batch)
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  gap = lambda x: f"{x / 2**20:+.1f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:+.1f} KiB"
  return (f"Floor ({scheduler}): the base step's arguments ({mib(base_args)}) + the probe"
          f" batch ({mib(batch)}) + the direction d, live until the update"
          f" ({mib(tree_bytes(bench.model.params))}) + the temporaries of one forward at a moved"
          f" point compiled alone ({mib(sizes['moved forward'])}: its moved leaves and"
          f" activations) = {mib(floor)} = {floor / base_peak:.3f} x the base peak"
          f" ({mib(base_peak)}). Hi-DLR with chunks of 1 holds {mib(chunk1)},"
          f" {gap(chunk1 - larger)} from the larger of this floor and the"
          f" base peak plus the probe batch ({mib(base_peak + batch)}).")


def _memory_minimising_sizes(model_name: str, quick: bool) -> dict[str, Any]:
  """:func:`memory_sizes` compiled by XLA:CPU's memory-minimising scheduler,
  in a child process (XLA reads its flags once per process). Raises with
  the child's error output if it fails (e.g. an XLA without the flag)."""
  code = ("import json; from benchmarks import overhead as o;"
          f"b = o.Bench.create(o._models.build({model_name!r}, {quick}));"
          "print(json.dumps(o.memory_sizes(b)))")
  flags = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER_FLAG}".strip()
  env = dict(os.environ, XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"compiling with {MEMORY_SCHEDULER_FLAG} failed:\n{out.stderr}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _device_peak(model_name: str, v: Variant) -> float:
  """Peak device memory of one step, measured in a fresh process."""
  code = (
      "import json, jax; from benchmarks import overhead as o;"
      f"v = o.Variant(**json.loads({json.dumps(json.dumps(dataclasses.asdict(v)))}));"
      f"b = o.Bench.create(o._models.build({model_name!r}, False));"
      "f = b.step_call(v); jax.block_until_ready(f()); jax.block_until_ready(f());"
      "print(jax.devices()[0].memory_stats()['peak_bytes_in_use'])"
  )
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True)
  return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Main.


def _auto_batching() -> str:
  """What ``probe_batch_size="auto"`` resolves to here, as a batching name."""
  size = hidlr_optax._transform._resolve_batch_size("auto")
  return next(name for name, value in BATCHINGS.items() if value == size)


def _environment() -> str:
  dev = jax.devices()[0]
  malloc = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
  return (f"JAX {jax.__version__}, optax {optax.__version__}, backend"
          f" {jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s)),"
          f" {os.cpu_count()} CPU cores, Python {platform.python_version()}"
          + (f"; environment: {' '.join(malloc)}" if malloc else ""))


def run(args: argparse.Namespace) -> str:
  out = [f"Command: `{args.command}`", "",
         f"# Hi-DLR overhead ({jax.default_backend().upper()})", "", _environment(), "",
         f"Step timer: {args.clock} time. "
         "Speed ratio = median over interleaved repetitions of t(base) / t(variant);"
         " 1.0 = as fast as plain Adam. Hi-DLR probes on a different batch than"
         " the gradient's, so a refresh costs 4K probe forwards + 1 for L0 + 1 for the joint"
         " check (K > 1)."
         " Groups: contiguous blocks of layers (input to output); `interleaved` ="
         " every leaf's last axis dealt round-robin over the groups"
         " (`hidlr_optax.per_slice`), so every group touches every leaf."
         f" The default `auto` probe batching is {_auto_batching()} on this backend.", ""]
  summary = {}
  for name in args.models:
    model = _models.build(name, args.quick)
    bench = Bench.create(model)
    print(f"[{time.strftime('%X')}] {name}: {model.description}", flush=True)
    start = len(out)
    out += [f"## {name}: {model.description}", "",
            f"{model.num_params / 1e6:.2f} M trainable parameters"
            + (f", {sum(x.size for x in jax.tree.leaves(model.frozen)) / 1e6:.2f} M frozen"
               if model.frozen else "") + ".", ""]
    reps = args.reps[name]
    text, summary[name] = headline(bench, reps)
    out += [f"### K = {HEADLINE_K}, Phi = {HEADLINE_PHI}, default settings ({reps} reps)",
            "", text, ""]
    if jax.default_backend() == "cpu":
      out += [f"### Minor page faults per step, K = {HEADLINE_K} (`getrusage` of this"
              " process, which other jobs on the machine raise, so measure idle; glibc maps"
              " a fresh block for temporaries over 32 MiB)",
              "", fault_table(bench), ""]
    text, summary[name]["compile_ratio"] = compile_table(bench, args.compile_reps)
    out += [f"### Compile time (trace + lower + compile), K = 2 ({args.compile_reps} reps)",
            "", text, ""]
    text, ratios = memory_table(bench, name in args.device_peaks, args.quick)
    summary[name].update(ratios)
    out += ["### Peak memory, K = 2 (`compiled.memory_analysis()` of the step with"
            " params and state donated: arguments + outputs - aliased + temporaries)",
            "", text, ""]
    text = batching_table(bench, max(3, reps // 2), args.batchings)
    out += [f"### Probe batching on a refresh step, K = 2 ({max(3, reps // 2)} reps)", "",
            text, ""]
    if name in args.grid_models:
      grid_reps = max(3, reps // 2)
      text = grid(bench, args.ks, args.estimators, ["vmap", "chunk1"], args.phis, grid_reps)
      out += [f"### K x estimator x probe batching ({grid_reps} reps)", "", text, ""]
    print("\n".join(out[start:]), flush=True)
    _write(args.out, "\n".join(out) + "\n")  # keep what is done if killed later
  out += ["## Targets (MLP, K = 2, Phi = 8, Adam)", ""]
  if "mlp" in summary:
    s = summary["mlp"]
    out.append(table(["target", "measured", "met"], [
        ["non-refresh speed ratio >= 0.97", s["non_refresh"], s["non_refresh"] >= 0.97],
        ["  the same, refresh=False from the caller", s["non_refresh_caller"],
         s["non_refresh_caller"] >= 0.97],
        ["amortised speed ratio >= 0.85", s["amortised"], s["amortised"] >= 0.85],
        ["  the same, the caller's schedule", s["amortised_caller"],
         s["amortised_caller"] >= 0.85],
        ["  Adam plus the first group's 4 probe forwards alone (the floor)",
         s["amortised_floor"], s["amortised_floor"] >= 0.85],
        [f"compile time <= 2x base (default settings: {_auto_batching()})", s["compile_ratio"],
         s["compile_ratio"] <= 2],
        ["peak memory with probe_batch_size=1 <= 1.10x base", s["memory_chunk1"],
         s["memory_chunk1"] <= 1.10],
        ["  one chunk-of-1 probe's needs (the floor under Peak memory)", s["memory_floor"],
         s["memory_floor"] <= 1.10],
    ]))
  return "\n".join(out) + "\n"


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny models and few reps")
  p.add_argument("--models", nargs="+", default=["mlp", "lora", "transformer"])
  p.add_argument("--grid-models", nargs="*", default=None,
                 help="models that get the full K x estimator x batching grid"
                      " (default: every model of --models; none when given empty)")
  p.add_argument("--out", default=None, help="markdown file to write")
  p.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                 help="step timer: wall time, or this process's CPU time (CPU only)")
  p.add_argument("--compile-reps", type=int, default=None,
                 help="repetitions of the compile-time table (default 11, 1 with --quick)")
  p.add_argument("--device-peaks", nargs="*", default=[],
                 help="models whose device peak memory is also measured, each"
                      " variant in a child process (GPU)")
  args = p.parse_args(argv)
  args.command = " ".join(["python -m benchmarks.overhead", *map(shlex.quote, argv)])
  if args.quick:
    args.reps = {m: 3 for m in ("mlp", "lora", "transformer")}
    compile_reps, args.ks, args.phis = 1, (2,), (1, 8)
    args.batchings = ("chunk1", "vmap")
  else:
    cpu = jax.default_backend() == "cpu"
    args.reps = ({"mlp": 15, "lora": 9, "transformer": 5} if cpu
                 else {"mlp": 30, "lora": 30, "transformer": 30})
    compile_reps, args.ks, args.phis = 11, (1, 2, 4, 8), (1, 2, 4, 8, 16)
    args.batchings = ("chunk1", "chunk2", "chunk4", "vmap")
  args.compile_reps = args.compile_reps or compile_reps
  args.estimators = ("probe", "jvp")
  if args.grid_models is None:
    args.grid_models = args.models
  if args.out is None:
    args.out = f"benchmarks/results/overhead_{jax.default_backend()}.md"
  return args


def _write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> None:
  global clock
  args = parse(list(argv))
  clock = CLOCK[args.clock]
  _write(args.out, run(args))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
