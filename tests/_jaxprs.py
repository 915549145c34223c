"""Reading jaxprs in the tests: which primitives a traced program holds."""

from __future__ import annotations

import jax
import jax.extend


def primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr, sub-jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= primitives(sub)
  return names
