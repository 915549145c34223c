"""The overhead report: every model's sections and the targets, as markdown."""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import optax

from benchmarks import _models
from benchmarks.overhead.hlo import compile_table
from benchmarks.overhead.memory import fault_table, memory_table
from benchmarks.overhead.steps import HEADLINE_K, HEADLINE_PHI, Bench, auto_batching
from benchmarks.overhead.tables import table
from benchmarks.overhead.timing import CLOCK, batching_table, grid, headline, k_scan


def environment() -> str:
  """The versions, backend and machine the report was measured with."""
  dev = jax.devices()[0]
  malloc = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
  return (f"JAX {jax.__version__}, optax {optax.__version__}, backend"
          f" {jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s)),"
          f" {os.cpu_count()} CPU cores, Python {platform.python_version()}"
          + (f"; environment: {' '.join(malloc)}" if malloc else ""))


def introduction(args: argparse.Namespace) -> list[str]:
  """The report's first lines: the command, the machine, what a speed ratio is."""
  return [f"Command: `{args.command}`", "",
         f"# Hi-DLR overhead ({jax.default_backend().upper()})", "", environment(), "",
         f"Step timer: {args.clock} time. "
         "Speed ratio = median over interleaved repetitions of t(base) / t(variant);"
         " 1.0 = as fast as plain Adam. Hi-DLR probes on a different batch than"
         " the gradient's, so a refresh costs 4K probe forwards + 1 for L0 + 1 for the joint"
         " check (K > 1)."
         " Groups: contiguous blocks of layers (input to output); `interleaved` ="
         " every leaf's last axis dealt round-robin over the groups"
         " (`hidlr_optax.per_slice`), so every group touches every leaf."
         f" The default `auto` probe batching is {auto_batching()} on this backend.", ""]


def model_section(name: str, args: argparse.Namespace) -> tuple[list[str], dict]:
  """One model's section of the report, and its figures that the targets use."""
  clock = CLOCK[args.clock]
  model = _models.build(name, args.quick)
  bench = Bench.create(model)
  print(f"[{time.strftime('%X')}] {name}: {model.description}", flush=True)
  out = [f"## {name}: {model.description}", "",
         f"{model.num_params / 1e6:.2f} M trainable parameters"
         + (f", {sum(x.size for x in jax.tree.leaves(model.frozen)) / 1e6:.2f} M frozen"
            if model.frozen else "") + ".", ""]
  reps = args.reps[name]
  text, summary = headline(bench, reps, clock)
  out += [f"### K = {HEADLINE_K}, Phi = {HEADLINE_PHI}, default settings ({reps} reps)",
          "", text, ""]
  if jax.default_backend() == "cpu":
    out += [f"### Minor page faults per step, K = {HEADLINE_K} (`getrusage` of this"
            " process, which other jobs on the machine raise, so measure idle; glibc maps"
            " a fresh block for temporaries over 32 MiB)",
            "", fault_table(bench), ""]
  text, summary["compile_ratio"] = compile_table(bench, args.compile_reps)
  out += [f"### Compile time (trace + lower + compile), K = 2 ({args.compile_reps} reps)",
          "", text, ""]
  text, ratios = memory_table(bench, name in args.device_peaks, args.quick)
  summary.update(ratios)
  out += ["### Peak memory, K = 2 (`compiled.memory_analysis()` of the step with"
          " params and state donated: arguments + outputs - aliased + temporaries)",
          "", text, ""]
  text = batching_table(bench, max(3, reps // 2), args.batchings, clock)
  out += [f"### Probe batching on a refresh step, K = 2 ({max(3, reps // 2)} reps)", "",
          text, ""]
  if name in args.grid_models:
    grid_reps = max(3, reps // 2)
    text = grid(bench, args.ks, args.estimators, ["vmap", "chunk1"], args.phis, grid_reps,
                clock)
    out += [f"### K x estimator x probe batching ({grid_reps} reps)", "", text, ""]
    text = k_scan(bench, args.scan_ks, args.estimators, grid_reps, clock)
    out += [f"### Refresh step against K, interleaved groups ({grid_reps} reps)", "", text, ""]
  return out, summary


def targets_table(s: dict) -> str:
  """The MLP's figures against the targets (``s``: its :func:`model_section`'s)."""
  return table(["target", "measured", "met"], [
      ["non-refresh speed ratio >= 0.97", s["non_refresh"], s["non_refresh"] >= 0.97],
      ["  the same, refresh=False from the caller", s["non_refresh_caller"],
       s["non_refresh_caller"] >= 0.97],
      ["amortised speed ratio >= 0.85", s["amortised"], s["amortised"] >= 0.85],
      ["  the same, the caller's schedule", s["amortised_caller"],
       s["amortised_caller"] >= 0.85],
      ["  Adam plus the first group's 4 probe forwards alone (the floor)",
       s["amortised_floor"], s["amortised_floor"] >= 0.85],
      [f"compile time <= 2x base (default settings: {auto_batching()})", s["compile_ratio"],
       s["compile_ratio"] <= 2],
      ["peak memory with probe_batch_size=1 <= 1.10x base", s["memory_chunk1"],
       s["memory_chunk1"] <= 1.10],
      ["  one chunk-of-1 probe's needs (the floor under Peak memory)", s["memory_floor"],
       s["memory_floor"] <= 1.10],
  ])


def run(args: argparse.Namespace) -> str:
  """Measures every model of ``args.models`` and returns the report; what is done
  is also written to ``args.out`` after each model (kept if a later one is killed)."""
  out, summary = introduction(args), {}
  for name in args.models:
    section, summary[name] = model_section(name, args)
    print("\n".join(section), flush=True)
    out += section
    write(args.out, "\n".join(out) + "\n")
  out += ["## Targets (MLP, K = 2, Phi = 8, Adam)", ""]
  if "mlp" in summary:
    out.append(targets_table(summary["mlp"]))
  return "\n".join(out) + "\n"


def write(path: str, text: str) -> None:
  """Writes ``text`` to ``path``, creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)

