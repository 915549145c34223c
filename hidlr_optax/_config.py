"""The validated options of :func:`hidlr_optax.scale_by_hidlr`, in one frozen object.

Numeric options may be traced (``optax.inject_hyperparams``): they are
checked here only when concrete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import numpy as np
import optax

from hidlr_optax._jvp import JvpEstimator
from hidlr_optax._probe import ProbeEstimator
from hidlr_optax._secant import SecantEstimator
from hidlr_optax._types import Estimator, Scalar


#: Arguments of :func:`scale_by_hidlr` that ``optax.inject_hyperparams`` must
#: treat as static (pass them as ``static_args``).
STATIC_ARGS = (
    "param_labels", "update_every", "joint_check", "probe_direction", "estimator",
    "loss_guard", "total_steps",
)

#: The guard's tolerance that ``total_steps=`` turns on.
RECIPE_LOSS_GUARD = 0.5

#: ``smoothing`` when not given: GeN's 0.9 (the paper's rule), and 0.7 with
#: ``total_steps=`` (measured over 0.5-0.9 on four tasks, 5 seeds each:
#: ``docs/research/suite_findings.md``; 0.6 collapsed a California seed).
PAPER_SMOOTHING = 0.9
RECIPE_SMOOTHING = 0.7

#: The estimators named by a string.
ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "probe": ProbeEstimator, "jvp": JvpEstimator, "secant": SecantEstimator,
}

FITS = ("diagonal", "full")
ACCEPTS = ("all", "group")
PROBE_DIRECTIONS = ("current", "previous")


def _concrete(x: Any) -> bool:
  return isinstance(x, (int, float, np.number, np.ndarray)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  )


def _check(name: str, x: Any, ok: Callable[[float], bool], what: str) -> None:
  """Raises ``ValueError`` naming ``name`` if ``x`` is concrete and not ``ok``."""
  if x is not None and _concrete(x) and not ok(float(np.asarray(x))):
    raise ValueError(f"scale_by_hidlr: {name} must be {what}, got {x!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
  if not any(value is c or (isinstance(c, str) and value == c) for c in choices):
    raise ValueError(
        f"scale_by_hidlr: {name} must be one of {choices}, got {value!r} (with"
        f" optax.inject_hyperparams, list it in static_args: hidlr_optax.STATIC_ARGS ="
        f" {STATIC_ARGS})"
    )


def resolve_estimator(estimator: Union[str, Estimator]) -> Estimator:
  """An estimator object from a name in :data:`ESTIMATORS` or an object."""
  if isinstance(estimator, str):
    _check_choice("estimator", estimator, tuple(ESTIMATORS))
    return ESTIMATORS[estimator]()
  if not callable(getattr(estimator, "estimate", None)):
    raise ValueError(
        f"scale_by_hidlr: estimator must be one of {tuple(ESTIMATORS)} or an object with an"
        f" estimate(line, *, full, then) method, got {estimator!r}"
    )
  return estimator


def _schedule_peak(schedule: Callable[[Any], Any]) -> float:
  """The largest value of ``schedule`` at a few counts up to 100,000."""
  counts = [0, 1, 10, 100, 1_000, 10_000, 100_000]
  with jax.ensure_compile_time_eval():  # concrete even when built under a trace
    return max(abs(float(np.asarray(schedule(c)))) for c in counts)


def _check_schedule(schedule: Any) -> None:
  if schedule is None:
    return
  if callable(schedule):
    peak = _schedule_peak(schedule)
    if not 0.05 <= peak <= 20:
      raise ValueError(
          "scale_by_hidlr: schedule= is a multiplier of the fitted step (1 leaves it"
          f" as fitted), but this schedule peaks at {peak:.3g}; give it values near 1,"
          " e.g. optax.linear_schedule(1.0, 0.0, total_steps), and the initial rate"
          " as learning_rate="
      )
    return
  if not _concrete(schedule):
    if isinstance(schedule, jax.Array):
      return
    raise ValueError(
        "scale_by_hidlr: schedule must be None, a callable count -> multiplier"
        f" (an optax schedule) or a number, got {schedule!r}"
    )
  _check("schedule", schedule, lambda v: v >= 0 and np.isfinite(v), "finite and >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
  """The options of one :func:`hidlr_optax.scale_by_hidlr` (see its docs)."""

  learning_rate: Any = 1e-3
  update_every: Any = 8
  smoothing: Union[Scalar, None] = None
  min_r2: Scalar = 0.95
  fit: str = "diagonal"
  estimator: Union[str, Estimator] = "probe"
  accept: str = "group"
  max_growth: Union[Scalar, None] = 4.0
  min_learning_rate: Scalar = 0.0
  max_learning_rate: Union[Scalar, None] = None
  joint_check: bool = True
  schedule: Union[Scalar, optax.Schedule, None] = None
  probe_direction: str = "current"
  loss_guard: Union[float, None] = None
  total_steps: Union[int, None] = None

  def __post_init__(self):
    self._apply_total_steps()
    if self.smoothing is None:
      object.__setattr__(self, "smoothing", PAPER_SMOOTHING)
    object.__setattr__(self, "estimator", resolve_estimator(self.estimator))
    if isinstance(self.joint_check, np.bool_):
      object.__setattr__(self, "joint_check", bool(self.joint_check))
    _check_choice("fit", self.fit, FITS)
    if self.fit == "full" and not self.estimator.fits_full:
      raise ValueError(f"scale_by_hidlr: fit='full' needs an estimator of the whole M, not {self.estimator!r}")
    _check_choice("accept", self.accept, ACCEPTS)
    _check_choice("probe_direction", self.probe_direction, PROBE_DIRECTIONS)
    _check_choice("joint_check", self.joint_check, (True, False))
    self._check_learning_rate()
    _check_schedule(self.schedule)
    u = self.update_every
    if _concrete(u) and (int(np.asarray(u)) != np.asarray(u) or int(np.asarray(u)) < 1):
      raise ValueError(f"scale_by_hidlr: update_every must be an integer >= 1, got {u!r}")
    _check("smoothing", self.smoothing, lambda v: 0 <= v < 1, "in [0, 1)")
    _check("min_r2", self.min_r2, lambda v: v <= 1, "<= 1")
    guard = self.loss_guard
    if guard is not None and not (
        _concrete(guard) and np.ndim(guard) == 0 and float(np.asarray(guard)) > 0):
      raise ValueError(f"scale_by_hidlr: loss_guard must be a number > 0 (or None), got {guard!r}")
    _check("max_growth", self.max_growth, lambda v: v >= 1, ">= 1 (or None)")
    _check("min_learning_rate", self.min_learning_rate, lambda v: v >= 0, ">= 0")
    _check("max_learning_rate", self.max_learning_rate, lambda v: v > 0, "> 0 (or None)")
    low, high = self.min_learning_rate, self.max_learning_rate
    if _concrete(low) and _concrete(high) and float(low) > float(high):
      raise ValueError(
          "scale_by_hidlr: min_learning_rate must not exceed max_learning_rate,"
          f" got {low!r} > {high!r}"
      )

  def _apply_total_steps(self) -> None:
    """``total_steps=``: a linear decay of the applied step to 0, the guard
    and the recipe's smoothing (each unless given)."""
    steps = self.total_steps
    if steps is None:
      return
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
      raise ValueError(f"scale_by_hidlr: total_steps must be an integer >= 1, got {steps!r}")
    if self.schedule is not None:
      raise ValueError(
          "scale_by_hidlr: total_steps sets the schedule (a linear decay to 0 over"
          " total_steps); pass total_steps or schedule, not both")
    object.__setattr__(self, "schedule", optax.linear_schedule(1.0, 0.0, int(steps)))
    if self.loss_guard is None:
      object.__setattr__(self, "loss_guard", RECIPE_LOSS_GUARD)
    if self.smoothing is None:
      object.__setattr__(self, "smoothing", RECIPE_SMOOTHING)

  def _check_learning_rate(self) -> None:
    rate = self.learning_rate
    if callable(rate):
      raise TypeError(
          "scale_by_hidlr: learning_rate is the initial rate of every group (a number"
          " or {label: number}), not a schedule: Hi-DLR fits the rates itself. For"
          " warm-up or decay, pass the schedule as a multiplier of the fitted step,"
          " schedule=optax.linear_schedule(1.0, 0.0, total_steps)"
      )
    rates = rate.values() if isinstance(rate, Mapping) else [rate]
    for r in rates:
      _check("learning_rate", r, lambda v: v > 0 and np.isfinite(v), "> 0 and finite")

  @property
  def full(self) -> bool:
    return self.fit == "full"

  @property
  def guarded(self) -> bool:
    return self.loss_guard is not None

  @property
  def lagged(self) -> bool:
    return self.probe_direction == "previous"

  def multiplier(self, count: jax.Array) -> Any:
    """The schedule's factor on the applied step at ``count`` (None: none)."""
    return self.schedule(count) if callable(self.schedule) else self.schedule


#: The defaults, read by the factories' signatures.
DEFAULTS = Config()
