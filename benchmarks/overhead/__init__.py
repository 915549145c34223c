r"""Speed, compile time and memory of Hi-DLR against its base optimizer.

Every time here is a ratio measured in one process, with the variants'
repetitions interleaved (round-robin, rotating the order) and medians taken,
because the machines are shared and noisy. A *speed ratio* is
``median_r(t_base[r] / t_variant[r])`` over the paired repetitions ``r``
(1.0 = as fast as the base step; the paper's "relative speed").

The train step is ``jax.value_and_grad`` + ``tx.update`` + ``apply_updates``,
jitted whole. The base optimizer is ``optax.adam``; Hi-DLR is
``hidlr_optax.hidlr(optax.scale_by_adam(), ...)`` with ``value_fn`` on a
*different* batch (the recommended use, docs/getting_started.md), so a refresh
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

The package, one job a module: :mod:`~benchmarks.overhead.steps` (the variants
and their train steps), :mod:`~benchmarks.overhead.timing` (step times and
speed ratios), :mod:`~benchmarks.overhead.hlo` (compile time and the compiled
HLO's fusions), :mod:`~benchmarks.overhead.memory` (buffer sizes, peaks, page
faults), :mod:`~benchmarks.overhead.report` (the markdown report) and
``__main__`` (the command line).
"""

from benchmarks.overhead.hlo import compile_times, distinct_fusions, fusion_compile_costs
from benchmarks.overhead.memory import memory_floor, memory_sizes, peak_bytes, tree_bytes
from benchmarks.overhead.steps import BASE, Bench, Variant, optimizer, train_step
from benchmarks.overhead.timing import amortised, bound_full, bound_peft, interleaved

__all__ = [
    "BASE", "Bench", "Variant", "amortised", "bound_full", "bound_peft", "compile_times",
    "distinct_fusions", "fusion_compile_costs", "interleaved", "memory_floor",
    "memory_sizes", "optimizer", "peak_bytes", "train_step", "tree_bytes",
]
