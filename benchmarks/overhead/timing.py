"""Step timing: interleaved repetitions, speed ratios, the paper's cost model,
and the tables of step times."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks.overhead.steps import BASE, HEADLINE_K, HEADLINE_PHI, Bench, Variant
from benchmarks.overhead.tables import table

PAPER_MEASURED = {(2, 8): 0.81}  # paper Table 4 (ViT-base, A100): 8.5 / 10.5

#: The step timers of ``--clock``.
CLOCK = {"wall": time.perf_counter, "process": time.process_time}


def interleaved(thunks: dict[str, Callable[[], Any]], reps: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, np.ndarray]:
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



def headline(bench: Bench, reps: int, clock: Callable[[], float] = time.perf_counter,
             phi: int = HEADLINE_PHI) -> tuple[str, dict]:
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
  t = interleaved(thunks, reps, clock)
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
         batchings: Sequence[str], phis: Sequence[int], reps: int,
         clock: Callable[[], float] = time.perf_counter) -> str:
  """Step ratios for every (K, estimator, batching), amortised for every Phi
  (the batching only for the probe estimator, the one that has it; the
  secant also fed the gradient's own batch, ``value=`` and ``grad=``: one
  gradient per refresh)."""
  def feeds(k: int, e: str) -> list[Variant]:
    if e == "probe":
      return [Variant(k=k, estimator=e, batching=b) for b in batchings]
    own = [Variant(k=k, estimator=e, batching="-", reuse_value=True)] if e == "secant" else []
    return [Variant(k=k, estimator=e, batching="-"), *own]

  variants = [v for k in ks for e in estimators for v in feeds(k, e)]
  thunks = {"base": bench.step_call(BASE)}
  for v in variants:
    thunks[v.label() + " non"] = bench.step_call(v, count=1)
    thunks[v.label() + " ref"] = bench.step_call(v, count=0)
  t = interleaved(thunks, reps, clock)
  peft = bench.model.name == "lora"
  rows = []
  for v in variants:
    non, ref = speed(t, v.label() + " non"), speed(t, v.label() + " ref")
    bound = bound_peft if peft else bound_full
    cells = [f"{amortised(non, ref, p):.2f} ({bound(v.k, p):.2f})" for p in phis]
    rows.append([v.k, v.estimator, "own batch, grad=" if v.reuse_value else v.batching, non, ref,
                 *cells])
  header = ["K", "estimator", "probes", "non-refresh", "refresh"] + [f"Phi={p}" for p in phis]
  return (f"base step: {ms(t['base']):.1f} ms (median). Amortised speed ratio for each"
          f" Phi, with the paper's {'PEFT' if peft else 'full-training'} bound in"
          f" brackets.\n\n" + table(header, rows))


def k_scan(bench: Bench, ks: Sequence[int], estimators: Sequence[str], reps: int,
           clock: Callable[[], float] = time.perf_counter) -> str:
  """The refresh step against the number of groups, for every estimator.

  Groups ``interleaved`` (every leaf's last axis dealt over the K groups),
  the default probe batching; the ratio is the refresh step's time over the
  same estimator's at K = 2.
  """
  variants = {(k, e): Variant(k=k, estimator=e, grouping="interleaved") for k in ks
              for e in estimators}
  thunks = {"base": bench.step_call(BASE)}
  thunks.update({f"{k} {e}": bench.step_call(v, count=0) for (k, e), v in variants.items()})
  t = interleaved(thunks, reps, clock)
  rows = []
  for k, e in variants:
    reference = t[f"2 {e}"] if 2 in ks else t[f"{ks[0]} {e}"]
    rows.append([k, e, ms(t[f"{k} {e}"]), float(np.median(t[f"{k} {e}"]) / np.median(reference)),
                 speed(t, f"{k} {e}")])
  return (f"base step: {ms(t['base']):.1f} ms (median).\n\n"
          + table(["K", "estimator", "refresh step ms", "vs K = 2", "speed ratio vs base"], rows))


def batching_table(bench: Bench, reps: int, batchings: Sequence[str],
                   clock: Callable[[], float] = time.perf_counter) -> str:
  """Refresh-step cost for each probe batching (justifies ``'auto'``)."""
  thunks = {"base": bench.step_call(BASE)}
  for b in batchings:
    thunks[b] = bench.step_call(Variant(k=HEADLINE_K, batching=b), count=0)
  t = interleaved(thunks, reps, clock)
  rows = [[b, ms(t[b]), speed(t, b)] for b in batchings]
  return table(["probe_batch_size", "refresh step ms", "speed ratio vs base"], rows)

