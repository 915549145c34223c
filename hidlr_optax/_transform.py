"""Hi-DLR as an optax gradient transformation.

Reference: Xu, Bu, Zhang & Barnett, "A Hessian-informed hyperparameter
optimization for differential learning rate" (Hi-DLR). ``K = 1`` is GeN
(Bu & Xu, "Gradient descent with generalized Newton's method",
arXiv:2407.02772), which the Hi-DLR paper calls Hi-ULR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hidlr_optax import _estimators, _fit, _rule
from hidlr_optax._grouping import Label, LabelsOrFn, build_layout, initial_rates
from hidlr_optax._state import GroupFit, PerGroup, ScaleByHiDLRState

Scalar = Union[float, jax.Array]
LearningRate = Union[Scalar, Mapping[Label, Scalar]]

#: Arguments of :func:`scale_by_hidlr` that ``optax.inject_hyperparams`` must
#: treat as static (pass them as ``static_args``).
STATIC_ARGS = (
    "param_labels", "update_every", "probe_batch_size", "joint_check", "horizon",
    "ratios_only", "probe_direction",
)

_FITS = ("diagonal", "full")
_ESTIMATORS = ("probe", "jvp")
_ACCEPTS = ("all", "group")
_JOINT_CHECKS = (True, False, "combined", "cross")
_HORIZONS = ("step", "period")
_PROBE_DIRECTIONS = ("current", "previous")


def _concrete(x: Any) -> bool:
  return isinstance(x, (int, float, np.number, np.ndarray)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  )


def _check(x: Any, ok, what: str) -> None:
  """Raises ``ValueError(what)`` if ``x`` is concrete and ``ok(x)`` fails."""
  if x is not None and _concrete(x) and not ok(float(np.asarray(x))):
    raise ValueError(f"scale_by_hidlr: {what}, got {x!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"scale_by_hidlr: {name} must be one of {choices}, got {value!r}")


def _resolve_batch_size(probe_batch_size: Union[int, str, None]) -> Union[int, None]:
  """``"auto"``: chunks of 1 on CPU, one vmapped batch per group elsewhere.

  On CPU the vmapped probes make the step's block of temporaries several
  times the parameters' size, and XLA:CPU allocates that block on every call,
  also on steps that do not refresh; one probe at a time keeps it and the
  peak memory small, for a refresh step 5-25% slower (the overhead
  benchmark's three models). Accelerators run the batched forward in
  parallel and keep their memory pooled. Resolved when ``update`` is
  traced, on the default backend.
  """
  if probe_batch_size == "auto":
    return 1 if jax.default_backend() == "cpu" else None
  return probe_batch_size


def _validate(
    learning_rate, update_every, smoothing, min_r2, fit, estimator, accept,
    max_growth, min_learning_rate, max_learning_rate, probe_batch_size,
    joint_check, horizon, schedule, min_snr=2.0, probe_direction="current",
) -> None:
  """Checks hyperparameters at construction (concrete values only)."""
  _check_choice("fit", fit, _FITS)
  _check_choice("probe_direction", probe_direction, _PROBE_DIRECTIONS)
  _check_choice("estimator", estimator, _ESTIMATORS)
  _check_choice("accept", accept, _ACCEPTS)
  _check_choice("horizon", horizon, _HORIZONS)
  if horizon == "period" and estimator != "probe":
    raise ValueError("scale_by_hidlr: horizon='period' needs estimator='probe'")
  if not (schedule is None or callable(schedule) or isinstance(schedule, (int, float, np.number, np.ndarray, jax.Array))):
    raise ValueError(
        "scale_by_hidlr: schedule must be None, a callable count -> multiplier"
        f" (an optax schedule) or a number, got {schedule!r}"
    )
  if not callable(schedule):
    _check(schedule, lambda v: v >= 0 and np.isfinite(v), "schedule must be finite and >= 0")
  rates = learning_rate.values() if isinstance(learning_rate, Mapping) else [learning_rate]
  for rate in rates:
    _check(rate, lambda v: v > 0 and np.isfinite(v), "learning_rate must be > 0 and finite")
  if _concrete(update_every) and (
      int(np.asarray(update_every)) != np.asarray(update_every)
      or int(np.asarray(update_every)) < 1
  ):
    raise ValueError(f"scale_by_hidlr: update_every must be an integer >= 1, got {update_every!r}")
  _check(smoothing, lambda v: 0 <= v < 1, "smoothing must be in [0, 1)")
  _check(min_r2, lambda v: v <= 1, "min_r2 must be <= 1")
  _check(min_snr, lambda v: v >= 0, "min_snr must be >= 0")
  _check(max_growth, lambda v: v >= 1, "max_growth must be >= 1 (or None)")
  _check(min_learning_rate, lambda v: v >= 0, "min_learning_rate must be >= 0")
  _check(max_learning_rate, lambda v: v > 0, "max_learning_rate must be > 0 (or None)")
  if (
      _concrete(min_learning_rate)
      and _concrete(max_learning_rate)
      and float(min_learning_rate) > float(max_learning_rate)
  ):
    raise ValueError(
        "scale_by_hidlr: min_learning_rate must not exceed max_learning_rate,"
        f" got {min_learning_rate!r} > {max_learning_rate!r}"
    )
  if probe_batch_size not in (None, "auto") and not (
      isinstance(probe_batch_size, (int, np.integer))
      and not isinstance(probe_batch_size, bool)
      and probe_batch_size >= 1
  ):
    raise ValueError(
        "scale_by_hidlr: probe_batch_size must be None, 'auto' or a Python int"
        f" >= 1, got {probe_batch_size!r} (with optax.inject_hyperparams, list"
        f" it in static_args: hidlr_optax.STATIC_ARGS = {STATIC_ARGS})"
    )
  if isinstance(joint_check, np.bool_):
    joint_check = bool(joint_check)
  if not any(joint_check is c or (isinstance(c, str) and joint_check == c)
             for c in _JOINT_CHECKS):
    raise ValueError(
        f"scale_by_hidlr: joint_check must be one of {_JOINT_CHECKS}, got {joint_check!r}"
        f" (with optax.inject_hyperparams, list it in static_args:"
        f" hidlr_optax.STATIC_ARGS = {STATIC_ARGS})"
    )


def _rate_dtype(params: Any) -> jnp.dtype:
  """float32, or float64 when the parameters are float64."""
  return jnp.promote_types(optax.tree.dtype(params, "highest"), jnp.float32)


def _empty_fits(num_groups: int, dtype) -> GroupFit:
  nan = jnp.full((num_groups,), jnp.nan, dtype)
  no = jnp.zeros((num_groups,), bool)
  return GroupFit(nan, nan, nan, no, no, nan, jnp.zeros((num_groups,), jnp.int32), nan, nan)


def _checked_value_fn(value_fn, params, value=None) -> bool:
  """Checks at trace time that ``value_fn(params)`` is a float scalar or a
  float vector of ``B >= 2`` per-example losses, and that ``value``, if
  given, is a scalar or of that shape; returns whether it is per-example."""
  try:
    out = jax.eval_shape(value_fn, params)
  except TypeError as error:
    raise TypeError(
        "scale_by_hidlr: value_fn(params) failed. value_fn must take the"
        " parameters that tx.update receives as `params` (the pytree of"
        " arrays being optimised; with flax.nnx.Optimizer an nnx.State, so"
        " merge it back into a model inside value_fn:"
        " `lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)`), not the"
        f" model. The error was: {error}"
    ) from error
  if not (
      isinstance(out, jax.ShapeDtypeStruct)
      and (out.shape == () or (len(out.shape) == 1 and out.shape[0] >= 2))
      and jnp.issubdtype(out.dtype, jnp.floating)
  ):
    raise TypeError(
        "scale_by_hidlr: value_fn(params) must return the loss as a scalar of"
        " a float dtype, or per-example losses as a float vector of shape (B,)"
        f" with B >= 2, got {out!r} (return only the loss, not (loss, aux))"
    )
  if value is not None and jnp.shape(value) not in ((), out.shape):
    raise TypeError(
        "scale_by_hidlr: `value` must be value_fn(params), a scalar or (with"
        f" per-example losses) of shape {out.shape}, got shape {jnp.shape(value)}"
    )
  return out.shape != ()


def _step_multiplier(schedule, count: jax.Array):
  """The schedule's factor on the applied step at ``count`` (None: none)."""
  return schedule(count) if callable(schedule) else schedule


def scale_by_hidlr(
    learning_rate: LearningRate = 1e-3,
    param_labels: LabelsOrFn = None,
    *,
    update_every: int = 8,
    smoothing: Scalar = 0.9,
    min_r2: Scalar = 0.95,
    min_snr: Scalar = 2.0,
    probe_scales: Sequence[float] = (-2.0, -1.0, 1.0, 2.0),
    fit: str = "diagonal",
    estimator: str = "probe",
    accept: str = "group",
    max_growth: Union[Scalar, None] = 4.0,
    min_learning_rate: Scalar = 0.0,
    max_learning_rate: Union[Scalar, None] = None,
    probe_batch_size: Union[int, str, None] = "auto",
    joint_check: Union[bool, str] = True,
    horizon: str = "step",
    schedule: Union[Scalar, optax.Schedule, None] = None,
    ratios_only: bool = False,
    probe_direction: str = "current",
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the base direction by per-group learning rates set by Hi-DLR.

  The parameters are split into groups ``k = 1..K`` by ``param_labels``. Given
  the base optimizer's direction ``d`` as ``updates`` (e.g. the output of
  ``optax.scale_by_adam()``), this returns ``-eta_k * d_k`` for each group.
  Every ``update_every`` steps (step 0 included) the rates are refreshed from
  a second-order model of the loss along each group's step:

  .. math::

    L(w - \sum_k \eta_k d_k) - L(w) \approx -\eta^\top b
      + \tfrac12 \eta^\top A \eta, \quad
    b_k = G_k^\top d_k, \quad A_{kl} = d_k^\top H_{kl} d_l,

  whose minimiser is :math:`\eta^*_k = b_k / A_{kk}` (diagonal fit, paper eq.
  3.2) or :math:`\eta^* = A^{-1} b` (full fit, eq. 2.4). With the default
  ``estimator="probe"``, ``b_k`` and ``A_kk`` come from a closed-form
  least-squares fit of ``L(w - v_i eta_k d_k) - L(w)`` at the probe scales
  ``v_i``: ``4K`` loss values evaluated in batched forwards. A group's
  refresh is accepted when ``b_k > 0``, ``A_kk > 0``, ``R^2 >= min_r2`` and
  everything is finite; then

  .. math::

    \eta_k \leftarrow \gamma\,\eta_k + (1-\gamma)\,
      \mathrm{clip}(\eta^*_k, \eta_k / g, \eta_k g),

  with ``gamma = smoothing`` and ``g = max_growth``, except that if
  :math:`\eta_k > 2\eta^*_k` (the fit predicts that the current rate increases
  the loss) the rate drops at once, without smoothing, to
  :math:`\mathrm{clip}(\eta^*_k, \eta_k / g, \eta_k g)`: a run of such fits
  cuts ``g``-fold per refresh, and one noisy fit cannot wipe a rate out.
  A group whose probes move the loss by no more than rounding (32 units in
  the last place of ``L(w)``) has nothing to fit: its rate is held until
  its probes register again. Rates are then clipped to
  ``[min_learning_rate, max_learning_rate]``. With ``K = 1`` this is GeN.

  With ``K > 1`` and ``joint_check=True``, one more loss value, at the
  combined step ``w - sum_k eta_k d_k`` with the new rates, checks what the
  diagonal fit cannot see, the curvature between groups: if the combined step
  lands past the minimum of the quadratic through ``L(w)`` with slope
  ``-sum_k eta_k b_k`` and that value, every rate is scaled by that
  quadratic's minimiser ``t* < 1``, but by no less than ``1 / (2K)`` and
  only when the predicted decrease is above rounding (see ``joint_factor``
  in ``hidlr_optax._rule``). Groups whose directions act alike (e.g. the
  output biases of an additive model's feature networks) would otherwise
  each take the whole step and together overshoot ``K``-fold. Groups whose
  step is below the loss's resolution are left out of the check: their
  slopes are rounding, their steps cannot cause what it measures, and
  shrinking them at every refresh that overshoots would walk their rates
  down to 0.

  ``update`` needs the extra keyword argument ``value_fn``, a function
  ``params -> scalar loss``, or per-example losses ``(B,)`` whose mean is
  the loss, built inside the training step (as for optax's line
  searches). It is called only on refresh steps, inside
  ``jax.lax.cond`` (or, with ``refresh=`` from the caller, only in the
  program compiled for refresh steps). For mini-batch training, make
  ``value_fn`` evaluate a *different* batch from the one the gradient came
  from: same-batch probes overestimate ``b`` and the rates overshoot (or
  set ``probe_direction="previous"``, whose fits are unbiased on any batch).
  ``L(w)`` is evaluated in the same batched forward as the first group's
  probes (or taken from ``value=``).

  *Noise-aware fits.* When ``value_fn`` returns per-example losses
  ``L_j``, ``j = 1..B`` (e.g. ``jax.vmap`` of the loss over the probe
  batch's examples), the fit is linear in the losses, so each example's
  own coefficients ``(beta_kj, M_kkj)`` average to the fit of the mean
  loss, and their spread gives standard errors ``se = std_j / sqrt(B)``
  (with ``estimator="jvp"``, the per-example derivatives do). A group is
  then accepted only if also ``beta_k / se(beta_k) >= min_snr`` and
  ``M_kk / se(M_kk) >= min_snr``; a fit that fails this is
  *noise-dominated* (counted in the state's ``num_noisy``; the rate is
  held), and an accepted optimum is shrunk by ``snr^2 / (snr^2 + 1)``,
  ``snr = beta_k / se(beta_k)``, the step that maximises the model's
  expected decrease given the slope's noise (see
  :func:`hidlr_optax._rule.propose`). ``R^2``, the joint check, the
  resolution test and ``L(w)`` use the mean loss. With a scalar
  ``value_fn`` nothing changes (the paper's rule).

  Args:
    learning_rate: initial rate of every group, or a mapping
      ``label -> initial rate``.
    param_labels: groups, in any form ``optax.multi_transform`` accepts: a
      pytree of labels with the parameters' structure, a prefix of it, or a
      callable ``params -> labels``; ``None`` for one group (labelled
      ``"all"``). A label leaf may be :func:`hidlr_optax.per_slice` to split
      one array into a group per slice.
    update_every: refresh period ``Phi`` in steps.
    smoothing: ``gamma``, the weight of the old rate in the moving average.
    min_r2: smallest ``R^2`` of a group's fit for it to be accepted.
    min_snr: with per-example losses from ``value_fn``, the smallest
      signal-to-noise ratio of a group's fitted slope and curvature (each
      over its standard error across the batch) for the fit to be accepted;
      ignored with a scalar ``value_fn``. ``0`` keeps only the shrinkage
      of the step.
    probe_scales: the ``v_i``; probes sit at ``w - v_i eta_k d_k``.
    fit: ``"diagonal"`` (``eta*_k = b_k / A_kk``) or ``"full"`` (also probes
      pairs of groups moved together to estimate ``A_kl``, and uses
      ``A^{-1} b`` when ``A`` is positive definite and the solution positive;
      ``K(K-1)/2`` extra probe sets, so for small ``K``).
    estimator: ``"probe"`` (loss values and a least-squares fit) or
      ``"jvp"`` (exact ``b`` and ``A`` by forward-over-forward
      differentiation of ``value_fn``; ``R^2`` is reported as 1).
    accept: ``"group"``: each group whose fit passes updates on its own;
      ``"all"``: the paper's rule, every group passes or none updates.
    max_growth: bound on the factor by which ``eta*`` may differ from the
      current rate before smoothing; ``None`` for no bound.
    min_learning_rate: lower bound of every rate.
    max_learning_rate: upper bound of every rate, or ``None``.
    probe_batch_size: for ``estimator="probe"``: ``None`` evaluates each
      group's probes in one ``jax.vmap`` that moves only that group's leaves,
      so what depends on the other leaves alone is computed once per group
      (fastest on accelerators); an int evaluates all probes in one loop
      over chunks of that size, so at most that many moved copies of the
      parameters are alive whatever the number of groups (least memory:
      with chunks of 1 a refresh holds, beyond the base step's arguments
      and ``value_fn``'s batch, the direction and one forward at a moved
      point, nothing more; the joint check's forward is the loop's last
      iteration, so the step compiles one forward); ``"auto"`` is ``1``
      when the default backend is the CPU, where the vmapped probes'
      temporaries are allocated on every step and raise the peak memory
      1.5-2x over chunks of 1 for a refresh 5-25% faster, and ``None`` on
      GPU and TPU.
    joint_check: for ``K > 1``, check the combined step after each refresh
      (one extra forward per refresh) and shrink all rates when it
      overshoots: ``True`` or ``"combined"`` pulls the combined step back
      to its own one-step optimum; ``"cross"`` corrects only the curvature
      *between* groups that the diagonal fit cannot see (the measured
      curvature of the combined step against the sum of the groups' own,
      see :func:`hidlr_optax._rule.joint_factor`); ``False`` for the
      paper's rule alone.
    horizon: what the rates are fitted for. ``"step"`` (the paper's rule):
      the minimiser of the loss after one step. ``"period"``: the minimiser
      along each group's displacement over the last refresh period, ``w_k(t)
      - w_k(t - Phi)``, the rate that those ``Phi`` steps should have had
      (see :func:`hidlr_optax._rule.period_proposal`), with the one-step fit
      kept as the stability limit (a rate that it predicts raises the loss
      is still cut). Costs ``4K`` more forwards per refresh and one copy of
      the parameters in the state. Needs ``estimator="probe"``.
    schedule: a multiplier of the applied step, for warm-up and decay: an
      ``optax`` schedule ``count -> factor`` (e.g.
      ``optax.warmup_cosine_decay_schedule(0.0, 1.0, 100, 1000)``) or a
      number; ``None`` for none. The fits, the probes and the stored rates
      stay un-annealed, as in GeN's public code: the schedule scales what is
      applied, ``-schedule(t) * eta_k * d_k``, not what is learned.
    ratios_only: let the fits set only the ratios between the groups: after
      every refresh the rates are rescaled so that their geometric mean,
      weighted by the groups' sizes, stays that of the initial rates (see
      :func:`hidlr_optax._rule.keep_mean_scale`). For a direction that
      carries its own scale, e.g. Prodigy's step negated
      (``optax.chain(optax.contrib.prodigy(), optax.scale(-1.0))`` with
      initial rates 1): Prodigy then sets the overall rate and Hi-DLR the
      differential one. No effect with one group.
    probe_direction: which step each refresh fits. ``"current"`` (the
      paper's rule): this step, along ``d_t`` from ``w_t``. ``"previous"``:
      the step before, along ``d_{t-1}`` from the point it started from,
      ``w_{t-1} = w_t + tau eta d_{t-1}`` (``tau`` the schedule's factor at
      ``t - 1``): the same fits, acceptance, cuts and joint check, one step
      late. No sample of the probe batch shaped ``d_{t-1}`` or ``w_{t-1}``,
      so the fit is unbiased whatever batch ``value_fn`` evaluates, the
      gradient's own included (for SGD, ``E[g_B . d_t] = G . d_t +
      tr(Sigma) / B`` along this step's direction on its own batch). Step 0
      has no previous step and fits its own. Costs one copy of the
      direction in the state (written on every step), one moved copy of the
      parameters during a refresh, and ``L(w_{t-1})`` is evaluated with the
      probes (``value=`` is not used).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` takes
    ``(updates, state, params, *, value_fn, value=None, refresh=None,
    **extra_args)``, where ``value`` is ``value_fn(params)`` if the caller
    already has it (with per-example losses, the vector saves the forward
    at ``w``; a scalar mean is accepted but not used, since each example's
    change is measured from its own ``L_j(w)``, so ``L(w)`` is then
    evaluated with the probes), and ``refresh`` chooses the refresh steps:
    ``None`` refreshes when the state's count is a multiple of ``update_every``
    (inside ``jax.lax.cond``); a Python bool decides at trace time, so that
    a step compiled with ``refresh=False`` holds no conditional and no probe
    code and costs what the base step costs (jit the train step with
    ``refresh`` static and pass ``step % update_every == 0``); a traced bool
    decides at run time.

  Raises:
    ValueError: for a bad hyperparameter (at construction), labels that do
      not match the parameters (at ``init``), or a missing ``params`` or
      ``value_fn`` (at ``update``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, hidlr_optax
    >>> params = {'x': jnp.array(50.0), 'y': jnp.array(1.0)}
    >>> loss = lambda p: p['x'] ** 2 + 100 * p['y'] ** 2
    >>> tx = optax.chain(optax.identity(), hidlr_optax.scale_by_hidlr(
    ...     1e-3, {'x': 'x', 'y': 'y'}, smoothing=0.0, max_growth=None,
    ...     estimator='jvp'))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
    >>> {k: round(float(v), 6) for k, v in hidlr_optax.learning_rates(state).items()}
    {'x': 0.5, 'y': 0.005}
    >>> print(f"{float(loss(params)):.1e}")  # one Newton step to the minimum
    0.0e+00

  References:
    Xu, Bu, Zhang & Barnett, *A Hessian-informed hyperparameter optimization
    for differential learning rate*, 2025.
    Bu & Xu, *Gradient descent with generalized Newton's method*,
    arXiv:2407.02772, 2024.
  """
  _validate(
      learning_rate, update_every, smoothing, min_r2, fit, estimator, accept,
      max_growth, min_learning_rate, max_learning_rate, probe_batch_size,
      joint_check, horizon, schedule, min_snr, probe_direction,
  )
  scales = _fit.check_probe_scales(probe_scales)
  full = fit == "full"
  along_period = horizon == "period"
  cross_check = joint_check == "cross"
  lagged = probe_direction == "previous"

  def init_fn(params: optax.Params) -> ScaleByHiDLRState:
    layout = build_layout(param_labels, params)
    dtype = _rate_dtype(params)
    rates = jnp.asarray(initial_rates(learning_rate, layout), dtype)
    return ScaleByHiDLRState(
        count=jnp.zeros((), jnp.int32),
        learning_rates=PerGroup(layout.labels, rates),
        fits=PerGroup(layout.labels, _empty_fits(layout.num_groups, dtype)),
        num_refreshes=jnp.zeros((), jnp.int32),
        num_accepted=PerGroup(layout.labels, jnp.zeros((layout.num_groups,), jnp.int32)),
        num_noisy=PerGroup(layout.labels, jnp.zeros((layout.num_groups,), jnp.int32)),
        joint_factor=jnp.ones((), dtype),
        anchor=jax.tree.map(jnp.asarray, params) if along_period else None,
        previous_direction=jax.tree.map(jnp.zeros_like, params) if lagged else None,
    )

  def estimate(value_fn, params, directions, layout, rates, value, follow_up):
    """The model along the groups, and ``follow_up``'s point evaluated (see
    :func:`_estimators.probe_estimate`); ``value`` is ``L(w)`` or None."""
    if estimator == "jvp":
      est = _estimators.jvp_estimate(value_fn, params, directions, layout, rates, full=full)
      return est, _estimators.follow_up_after(
          value_fn, params, directions, layout, est, follow_up)
    return _estimators.probe_estimate(
        value_fn, params, directions, layout, rates, scales,
        full=full, origin=value, batch_size=_resolve_batch_size(probe_batch_size),
        follow_up=follow_up,
    )

  def check_jointly(joint_loss, slopes, curvatures, rates, origin, below):
    """Scales the rates of the groups above resolution (not ``below``) by
    :func:`_rule.joint_factor`; returns the rates and the factor."""
    separable = None
    if cross_check:
      terms = jnp.where(below | ~jnp.isfinite(curvatures), 0, rates**2 * curvatures)
      separable = 0.5 * jnp.sum(terms)
    factor = _rule.joint_factor(
        jnp.where(below, jnp.nan, slopes), rates, origin, joint_loss, separable
    )
    scaled = _rule.bound(rates * factor, min_learning_rate, max_learning_rate)
    return jnp.where(below, rates, scaled).astype(factor.dtype), factor

  def update_fn(
      updates: optax.Updates,
      state: ScaleByHiDLRState,
      params: Union[optax.Params, None] = None,
      *,
      value_fn=None,
      value: Union[jax.Array, None] = None,
      refresh: Union[bool, jax.Array, None] = None,
      **extra_args,
  ) -> tuple[optax.Updates, ScaleByHiDLRState]:
    del extra_args
    if params is None:
      raise ValueError(
          "scale_by_hidlr: update needs `params` (the current parameters) to"
          " probe the loss; call tx.update(updates, state, params, value_fn=...)"
      )
    if value_fn is None:
      raise ValueError(
          "scale_by_hidlr: update needs the keyword argument `value_fn`, a"
          " function params -> scalar loss (build it inside your training"
          " step, e.g. value_fn=lambda p: loss_fn(p, batch))"
      )
    layout = build_layout(param_labels, params)
    if tuple(state.learning_rates) != layout.labels:
      raise ValueError(
          f"scale_by_hidlr: the state has groups {list(state.learning_rates)}"
          f" but the labels of these params give {list(layout.labels)}"
      )
    if not (isinstance(refresh, (bool, np.bool_)) and not refresh):
      per_example = _checked_value_fn(value_fn, params, value)
      if per_example and value is not None and jnp.ndim(value) == 0:
        value = None  # the changes are measured from each example's own L_j(w)

    def refreshed(state: ScaleByHiDLRState) -> ScaleByHiDLRState:
      """The state after a refresh: every per-group value is set here, so
      that a step that does not refresh leaves the state untouched."""
      rates = state.learning_rates.stacked
      at, directions, origin, period = params, updates, value, None
      if lagged:  # the step before, from where it started; on step 0 this one
        at, directions = _previous_step(state, updates, params, layout, schedule)
        origin = None  # L(w_{t-1}), evaluated with the probes
      if along_period:
        period_est = _period_estimate(value_fn, params, state.anchor, layout, rates, value)
        period = _rule.period_proposal(period_est, rates, min_r2=min_r2, max_growth=max_growth)
        # Per-example changes need each L_j(w); the step's fit is at w only
        # along the current direction (the previous step's is at w_{t-1}).
        if period_est.slope_se is None and not lagged:
          origin = period_est.origin

      def decide(est: _estimators.Estimate) -> tuple[jax.Array, _rule.Proposal]:
        """The rule's next rates (the joint check's point) and proposal."""
        step = _rule.propose(
            est, rates, min_r2=min_r2, accept=accept, full=full, min_snr=min_snr
        )
        proposal = step if period is None else _rule.Proposal(
            jnp.where(period.accepted, period.optimal_rates, step.optimal_rates),
            period.accepted | step.accepted,
            step.below_resolution,
        )
        proposal = proposal._replace(noisy=step.noisy)
        new_rates = _rule.next_rates(
            rates, proposal,
            smoothing=smoothing, max_growth=max_growth,
            min_learning_rate=min_learning_rate, max_learning_rate=max_learning_rate,
            stability=None if period is None else step,
        )
        return new_rates, proposal

      checks_jointly = bool(joint_check) and layout.num_groups > 1
      est, joint = estimate(
          value_fn, at, directions, layout, rates, origin, decide if checks_jointly else None
      )
      slopes, curvatures = est.slope / rates, est.curvature / rates**2
      if checks_jointly:
        proposal = joint.aux
        new_rates, factor = check_jointly(
            joint.loss, slopes, curvatures, joint.rates, est.origin, proposal.below_resolution
        )
      else:
        new_rates, proposal = decide(est)
        factor = jnp.ones((), rates.dtype)
      uphill = _rule.uphill(est, min_r2)
      old = state.fits.stacked
      snr = (old.slope_snr, old.curvature_snr)  # NaN: no per-example losses
      num_noisy = state.num_noisy.stacked
      if est.slope_se is not None:
        snr = _rule.signal_to_noise(est)
        num_noisy = num_noisy + proposal.noisy.astype(jnp.int32)
      fit_now = GroupFit(
          slope=slopes,
          curvature=curvatures,
          r_squared=est.r_squared,
          accepted=proposal.accepted,
          below_resolution=proposal.below_resolution,
          optimal_rate=_rule.one_step_optimum(est, rates),
          uphill_refreshes=jnp.where(uphill, state.fits.stacked.uphill_refreshes + 1, 0),
          slope_snr=snr[0],
          curvature_snr=snr[1],
      )
      if ratios_only and layout.num_groups > 1:
        initial = jnp.asarray(initial_rates(learning_rate, layout), new_rates.dtype)
        new_rates = _rule.keep_mean_scale(new_rates, initial, layout.sizes(params))
      if along_period:
        state = state._replace(anchor=jax.tree.map(jnp.asarray, params))
      return state._replace(
          learning_rates=PerGroup(layout.labels, new_rates.astype(rates.dtype)),
          fits=PerGroup(layout.labels, GroupFit(*(
              x.astype(old.dtype) for x, old in zip(fit_now, state.fits.stacked)
          ))),
          num_refreshes=state.num_refreshes + 1,
          num_accepted=PerGroup(
              layout.labels, state.num_accepted.stacked + proposal.accepted.astype(jnp.int32)
          ),
          num_noisy=PerGroup(layout.labels, num_noisy),
          joint_factor=factor.astype(state.joint_factor.dtype),
      )

    if refresh is None:
      refresh = state.count % update_every == 0
    if isinstance(refresh, (bool, np.bool_)):
      state = refreshed(state) if refresh else state
    else:
      state = jax.lax.cond(refresh, refreshed, lambda s: s, state)
    rates = state.learning_rates.stacked
    multiplier = _step_multiplier(schedule, state.count)
    if multiplier is not None:
      rates = rates * jnp.asarray(multiplier, rates.dtype)
    if lagged:
      state = state._replace(previous_direction=jax.tree.map(
          lambda u, prev: u.astype(prev.dtype), updates, state.previous_direction))
    scaled = layout.scale(-rates, updates)
    updates = jax.tree.map(lambda u, p: u.astype(p.dtype), scaled, params)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _previous_step(state: ScaleByHiDLRState, updates, params, layout, schedule):
  """Where the previous step started and its direction: ``(w_{t-1}, d_{t-1})``.

  The step before moved the parameters by ``-tau eta_k d_{t-1}`` (``tau``
  the schedule's factor at ``t - 1``; the rates are still the ones it
  used, since they change only at a refresh, before the step), so ``w_{t-1}
  = w_t + tau eta d_{t-1}``, up to rounding. On step 0 there is no previous
  step: ``(w_0, d_0)``.
  """
  first = state.count == 0
  previous = jax.tree.map(
      lambda prev, u: jnp.where(first, u, prev.astype(u.dtype)), state.previous_direction, updates)
  before = _step_multiplier(schedule, jnp.maximum(state.count - 1, 0))
  taken = jnp.where(first, 0, 1 if before is None else before)
  back = -taken * state.learning_rates.stacked
  return layout.move(params, back, previous, _estimators._every_group(layout)), previous


def _period_estimate(value_fn, params, anchor, layout, rates, value) -> _estimators.Estimate:
  """The model along each group's displacement since the last refresh.

  Probes ``w + u D_k`` with ``D_k = w_k - anchor_k`` at ``u`` in
  ``PERIOD_SCALES``, in chunks of one (one forward alive at a time).
  """
  backwards = jax.tree.map(lambda a, p: (a - p).astype(p.dtype), anchor, params)
  est, _ = _estimators.probe_estimate(
      value_fn, params, backwards, layout, jnp.ones_like(rates), PERIOD_SCALES,
      full=False, origin=value, batch_size=1,
  )
  return est


#: Where the period fit probes along each group's displacement ``D_k`` over
#: the last refresh period, in units of ``D_k``: ``u = -1`` is the period's
#: start, ``u = 1`` as far again past the current point.
PERIOD_SCALES = np.asarray([-1.0, -0.5, 0.5, 1.0])


def hidlr(
    base: optax.GradientTransformation,
    learning_rate: LearningRate = 1e-3,
    param_labels: LabelsOrFn = None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
  """Hi-DLR over a base optimizer: ``optax.chain(base, scale_by_hidlr(...))``.

  Args:
    base: a transformation giving the *direction* (not yet negated or scaled
      by a learning rate), e.g. ``optax.scale_by_adam()``,
      ``optax.identity()`` for SGD, or ``optax.chain(optax.scale_by_adam(),
      optax.add_decayed_weights(1e-2))`` for AdamW.
    learning_rate: initial rate of every group, or ``{label: rate}``.
    param_labels: the groups (see :func:`scale_by_hidlr`).
    **kwargs: further arguments of :func:`scale_by_hidlr`.

  Returns:
    The chained transformation; ``update`` needs ``value_fn=``.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, {'w': 'w', 'b': 'b'})
    >>> sorted(hidlr_optax.learning_rates(tx.init(params)))
    ['b', 'w']
  """
  return optax.chain(base, scale_by_hidlr(learning_rate, param_labels, **kwargs))


def gen(
    base: optax.GradientTransformation,
    learning_rate: Scalar = 1e-3,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
  """GeN (Hi-ULR): one learning rate for all parameters, set by Hi-DLR's fit.

  Bu & Xu, *Gradient descent with generalized Newton's method*,
  arXiv:2407.02772. Same as :func:`hidlr` with ``param_labels=None``.

  Args:
    base: the direction transformation, as in :func:`hidlr`.
    learning_rate: initial learning rate.
    **kwargs: further arguments of :func:`scale_by_hidlr`.

  Returns:
    The chained transformation; ``update`` needs ``value_fn=``.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-3)
    >>> list(hidlr_optax.learning_rates(tx.init(jnp.zeros(4))))
    ['all']
  """
  if "param_labels" in kwargs:
    raise TypeError("gen() has one group; use hidlr() for param_labels")
  return hidlr(base, learning_rate, None, **kwargs)
