"""When a loss change is a measurement and when it is rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: A loss change no larger than this many units in the last place of the loss
#: is taken as rounding, not as a measurement. Measured: two float32 forwards
#: of the same loss at nearby points differ from the smooth curve through
#: them by 0.5 to 1.3 ulp (standard deviation), 3.2 ulp at most, for the
#: benchmark MLP, transformer and LoRA models (tests/test_core_semantics.py
#: checks a margin of 8x over a small MLP's worst case).
RESOLUTION_ULPS = 32


def loss_resolution(origin: jax.Array, ulps: float = RESOLUTION_ULPS) -> jax.Array:
  """The smallest loss change taken as a measurement near ``L(w) = origin``.

  ``ulps`` units in the last place of ``L(w)`` in its dtype: a difference of
  two loss values below it is dominated by the rounding of the forward
  passes (their reductions round differently at every point).
  """
  return ulps * jnp.finfo(origin.dtype).eps * jnp.abs(origin)


def below_resolution(change: jax.Array, origin: jax.Array) -> jax.Array:
  """Whether a size of loss change is finite and within rounding of ``origin``."""
  return jnp.isfinite(origin) & jnp.isfinite(change) & (change <= loss_resolution(origin))


def fit_dtype(loss: jax.Array) -> jnp.dtype:
  """Fits run in float32 at least, in float64 when the loss is float64."""
  return jnp.promote_types(jnp.asarray(loss).dtype, jnp.float32)
