"""Runs ``examples/sharded_training.py`` on 8 virtual CPU devices; prints JSON.

Runs it once per estimator (the paper's probes, the secant). Started by
``tests/test_sharding.py`` in a fresh process whose environment
sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported. Prints one line ``RESULT <json>`` with what the test checks.
"""

from __future__ import annotations

import json

import jax
import numpy as np

import _ecosystem
import hidlr_optax

STEPS = 9  # update_every=4: refreshes at steps 0, 4 and 8


def _normal(spec) -> str:
  """A partition spec as a string, without trailing ``None`` entries."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return str(tuple(entries))


def _spec(x) -> str:
  sharding = x.sharding
  return "replicated" if sharding.is_fully_replicated else _normal(sharding.spec)


def summary(out: dict) -> dict:
  """What the test checks of one :func:`sharded_training.main` output."""
  runs, reference = out["runs"], out["runs"]["single"]
  ref_fits = hidlr_optax.fit_diagnostics(reference["opt_state"])
  result = {"modes": {}}
  for mode, run in runs.items():
    fits = hidlr_optax.fit_diagnostics(run["opt_state"])
    adam_mu = run["opt_state"][0].mu
    result["modes"][mode] = {
        "param_difference": out["difference"][mode],
        "separation": out["separation"][mode],
        "same_decisions": bool(np.array_equal(run["accepted"], reference["accepted"])),
        "loss_difference": _ecosystem.relative_difference(run["losses"], reference["losses"]),
        "rate_difference": _ecosystem.relative_difference(
            list(hidlr_optax.learning_rates(run["opt_state"]).values()),
            list(hidlr_optax.learning_rates(reference["opt_state"]).values()),
        ),
        "fit_difference": max(
            _ecosystem.relative_difference(getattr(fits[k], f), getattr(ref_fits[k], f))
            for k in fits for f in ("slope", "curvature", "r_squared")
        ),
        "accepted": {k: bool(f.accepted) for k, f in fits.items()},
        "refreshes": int(hidlr_optax.find_states(run["opt_state"])[0].num_refreshes),
        "loss_drop": float(run["losses"][-1] / run["losses"][0]),
        "kernel_spec_in": _normal(run["param_shardings"]["layer_1"]["kernel"].spec)
        if mode != "single" else "single",
        "kernel_spec_out": _spec(run["params"]["layer_1"]["kernel"]),
        "head_bias_spec_out": _spec(run["params"]["head"]["bias"]),
        "adam_mu_spec": _spec(adam_mu["layer_1"]["kernel"]),
        "devices": len(run["params"]["layer_1"]["kernel"].sharding.device_set),
    }
  result["memory"] = [
      {"mode": m, "probe_batch_size": c, "groups": g, "bytes": b}
      for (m, c, g), b in out["memory"].items()
  ]
  return result


def main() -> None:
  S = _ecosystem.import_example("sharded_training")
  result = {"device_count": jax.device_count()}
  for estimator in S.ESTIMATORS:
    result[estimator] = summary(S.main(["--steps", str(STEPS), "--estimator", estimator]))
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
