"""Compile time: tracing, lowering and XLA compilation of the steps, and the
fusions of their compiled HLO."""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.overhead.steps import BASE, HEADLINE_K, Bench, Variant, auto_batching
from benchmarks.overhead.tables import table


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
  targeted = f"Hi-DLR {auto_batching()}"  # the default settings on this backend
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

