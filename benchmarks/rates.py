"""Where Hi-DLR's rates sit against the tuned AdamW schedule, per group.

For each chosen task of the suite (:data:`benchmarks.suite.TASKS`) and each
seed, trains the recipe (``total_steps=``: own-batch probes, linear decay,
loss guard) with the paper's probes and with the secant estimator, and AdamW
with a linear decay over the task's grid of peak rates (the peak picked by
the mean test score over the seeds, as in the suite). Both Hi-DLR and AdamW
scale the same AdamW direction, so their *applied* rates compare directly:
Hi-DLR's stored rate times its decay ``1 - t / T`` against AdamW's ``peak (1 -
t / T)``. Writes ``<name>.md`` (per task, method and group: the applied rate
over the tuned one at 10%, 25%, 50%, 75% and 90% of the run, mean and range
over seeds, and the final test score) and ``<name>.png`` (per task, every
group's applied rate, mean over seeds with the seeds' range shaded, and the
tuned schedule dashed) to ``benchmarks/results/``. Run from the repository
root::

  python -m benchmarks.rates                                   # 4 tasks, 3 seeds
  python -m benchmarks.rates --tasks "California MLP" --seeds 5 --out /tmp/rates
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optax

from benchmarks import suite
from benchmarks.suite import RESULTS, rc

from _common import markdown_table, save_figure  # noqa: E402  (suite put examples/ on the path)

#: The Hi-DLR rows traced, by their names in :data:`benchmarks.suite.HIDLR_CONFIGS`.
RECIPES = {
    "recipe (probes)": "Hi-DLR recipe (total_steps: own batch, linear decay, guard)",
    "recipe (secant)": "Hi-DLR secant recipe (total_steps)",
}
TUNED = "AdamW linear"
#: Fractions of the run at which the rates are compared.
POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)
DEFAULT_TASKS = ("letters", "California MLP", "California additive model",
                 "MovieLens recommender")


def decay(steps: int) -> np.ndarray:
  """The recipe's decay of the applied step, ``1 - t / T``, at every step
  (the schedule ``total_steps=`` builds)."""
  return np.asarray(optax.linear_schedule(1.0, 0.0, steps)(np.arange(steps)), float)


def trace_task(spec: suite.TaskSpec, seeds: Sequence[int], quick: bool) -> dict[str, Any]:
  """Every traced method's applied rates per group and seed, and the tuned schedule.

  Returns:
    ``{"steps", "score", "tuned": {"setting", "rates", "scores"}, "methods":
    {short name: {"rates": {group: (seeds, steps)}, "scores": [...]}}}``.
  """
  args, task = spec.load(quick)
  rows = suite.all_rows(args, task, spec)
  steps, score = task.steps, task.score
  methods = {}
  for short, name in RECIPES.items():
    entry = rows[name].entry
    histories = [task.run(entry, seed) for seed in seeds]
    applied = decay(steps)
    methods[short] = {
        "rates": {
            str(group): np.stack([np.asarray(h["lr"][group], float) for h in histories])
            * applied
            for group in histories[0]["lr"]
        },
        "scores": [float(task.summarise(h)[score]) for h in histories],
    }
  tuned_entry = rows[TUNED].entry
  runs = rc.run_seeds([tuned_entry], seeds, task.run, task.summarise, score,
                      task.larger_is_better)[TUNED]
  tuned_rates = next(iter(tuned_entry.rates(np.arange(steps), runs.peak).values()))
  return {
      "steps": steps, "score": score, "larger_is_better": task.larger_is_better,
      "tuned": {"setting": runs.setting, "rates": np.asarray(tuned_rates, float),
                "scores": [float(m[score]) for m in runs.metrics]},
      "methods": methods,
  }


def ratio_table(trace: Mapping[str, Any]) -> str:
  """Applied rate over the tuned one at :data:`POINTS`, per method and group."""
  steps, tuned = trace["steps"], trace["tuned"]["rates"]
  at = [min(steps - 1, int(p * steps)) for p in POINTS]
  rows = []
  for method, m in trace["methods"].items():
    score = f"{np.mean(m['scores']):.4f} ± {np.std(m['scores']):.4f}"
    for group, rates in m["rates"].items():
      ratios = rates[:, at] / tuned[at]
      cells = [f"{np.mean(r):.2g} ({np.min(r):.2g}-{np.max(r):.2g})" for r in ratios.T]
      rows.append([method, group, *cells, score])
  t = trace["tuned"]
  rows.append([f"{TUNED} ({t['setting']})", "all", *(["1"] * len(POINTS)),
               f"{np.mean(t['scores']):.4f} ± {np.std(t['scores']):.4f}"])
  header = ["method", "group", *(f"{p:.0%} of run" for p in POINTS), trace["score"]]
  return markdown_table(header, rows)


def figure(traces: Mapping[str, Mapping[str, Any]], out: Path, name: str) -> Path:
  """Per task, every group's applied rate (mean, seeds' range) and the tuned schedule."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(traces), figsize=(4.6 * len(traces), 3.6), squeeze=False)
  for ax, (task, trace) in zip(axes[0], traces.items()):
    steps = np.arange(trace["steps"])
    for (method, m), style in zip(trace["methods"].items(), ("-", ":")):
      for group, rates in m["rates"].items():
        line, = ax.plot(steps, rates.mean(0), style, lw=1, label=f"{method}: {group}")
        ax.fill_between(steps, rates.min(0), rates.max(0), color=line.get_color(), alpha=0.15)
    ax.plot(steps, trace["tuned"]["rates"], "k--", lw=1.5,
            label=f"{TUNED} ({trace['tuned']['setting']})")
    ax.set_yscale("log")
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel("applied rate")
  return save_figure(fig, out, name)


def render(command: str, seeds: Sequence[int], traces: Mapping[str, Mapping[str, Any]]) -> str:
  lines = [
      f"Command: `{command}`", "",
      "# Hi-DLR's rates against the tuned AdamW schedule", "",
      f"{len(seeds)} seed(s) {tuple(seeds)}. Applied rate (Hi-DLR: the group's stored rate times"
      " the recipe's decay 1 - t/T) over AdamW's linear schedule at the peak picked by the mean"
      " test score over these seeds; mean over seeds, (min-max) in brackets. Both scale the"
      " same AdamW direction, so 1 is the tuned rate. The last column is each method's final"
      " test score, mean ± std over seeds.", "",
  ]
  for task, trace in traces.items():
    lines += [f"## {task}", "", ratio_table(trace), ""]
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(suite.TASKS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="the scripts' smoke sizes")
  p.add_argument("--name", default="rates", help="file name of the results")
  p.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  seeds = list(range(args.seeds))
  command = "python -m benchmarks.rates " + shlex.join(sys.argv[1:] if argv is None else argv)
  traces = {}
  for task in args.tasks:
    traces[task] = trace_task(suite.TASKS[task], seeds, args.quick)
    print(f"## {task}\n\n{ratio_table(traces[task])}\n", flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{args.name}.md").write_text(render(command.strip(), seeds, traces) + "\n")
  figure(traces, args.out, args.name)
  return traces


if __name__ == "__main__":
  main()
