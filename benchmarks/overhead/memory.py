"""Memory: XLA's buffer assignment of the steps, the floor a probe needs, device
peaks and page faults per step."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.overhead.steps import BASE, HEADLINE_K, Bench, Variant, auto_batching
from benchmarks.overhead.tables import table

MEMORY_VARIANTS = {
    "base (adam)": BASE,
    "Hi-DLR vmap": Variant(k=HEADLINE_K, batching="vmap"),
    "Hi-DLR chunk1 (probe_batch_size=1)": Variant(k=HEADLINE_K, batching="chunk1"),
    "Hi-DLR chunk1, interleaved groups": Variant(
        k=HEADLINE_K, batching="chunk1", grouping="interleaved"),
    "Hi-DLR chunk1, probes on the gradient's batch (value= its loss)": Variant(
        k=HEADLINE_K, batching="chunk1", reuse_value=True),
    "Hi-DLR secant (two gradients)": Variant(k=HEADLINE_K, estimator="secant"),
    "Hi-DLR secant, the gradient's batch (value=, grad=: one gradient)": Variant(
        k=HEADLINE_K, estimator="secant", reuse_value=True),
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
  code = ("import json; from benchmarks import _models;"
          " from benchmarks.overhead import memory, steps;"
          f"b = steps.Bench.create(_models.build({model_name!r}, {quick}));"
          "print(json.dumps(memory.memory_sizes(b)))")
  flags = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER_FLAG}".strip()
  env = dict(os.environ, XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"compiling with {MEMORY_SCHEDULER_FLAG} failed:\n{out.stderr}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _device_peak(model_name: str, v: Variant) -> float:
  """Peak device memory of one step, measured in a fresh process."""
  code = (
      "import json, jax; from benchmarks import _models; from benchmarks.overhead import steps;"
      f"v = steps.Variant(**json.loads({json.dumps(json.dumps(dataclasses.asdict(v)))}));"
      f"b = steps.Bench.create(_models.build({model_name!r}, False));"
      "f = b.step_call(v); jax.block_until_ready(f()); jax.block_until_ready(f());"
      "print(jax.devices()[0].memory_stats()['peak_bytes_in_use'])"
  )
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True)
  return float(out.stdout.strip().splitlines()[-1])



def fault_table(bench: Bench, steps: int = 20) -> str:
  """Minor page faults per step (``getrusage`` of this process).

  A step's temporaries are one allocation sized for its largest branch; when
  that exceeds glibc's mmap ceiling (32 MiB) every call maps fresh pages and
  faults on each page it touches, a cost the base step does not pay.
  """
  v = Variant(k=HEADLINE_K)
  rows_of = {
      "base (adam)": (BASE, 0),
      f"Hi-DLR, step that does not refresh (default: auto = {auto_batching()})": (v, 1),
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

